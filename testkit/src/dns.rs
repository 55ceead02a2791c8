//! A small authoritative DNS server whose records a test changes at run time.
//!
//! It stands in for Fly's internal resolver (`[fdaa::3]:53`): the proxy's
//! discovery resolves the cluster name against it over UDP, falling back to
//! TCP on the same port when an answer is truncated, just as it would in
//! production. Queries are decoded and answers encoded with hickory-proto, so
//! what goes over the wire is real DNS.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hickory_proto::op::{Edns, Message, MessageType, Metadata, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, SOA};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::{accept_loop, lock, TaskGuard};

/// Payload limit for UDP answers to queries without EDNS (RFC 1035).
const CLASSIC_UDP_PAYLOAD: usize = 512;
/// Payload size advertised back to EDNS clients (the DNS flag day value).
const EDNS_UDP_PAYLOAD: u16 = 1232;
/// How many times `start` picks a new port when TCP cannot share the UDP one.
const PORT_ATTEMPTS: usize = 50;

/// How the server treats incoming queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DnsMode {
    /// Answer from the records set with [`DnsServer::set`].
    Answer,
    /// Receive queries but never reply, so resolvers time out.
    Silent,
    /// Reply SERVFAIL to every query, like a resolver whose upstream is down.
    ServFail,
    /// Reply to every query with its id and then random bytes: a reply the resolver matches
    /// to its query and cannot parse.
    Garbage,
}

/// A DNS server on one loopback address, serving UDP and TCP on one port.
///
/// Dropping it stops both listeners.
pub struct DnsServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    udp: TaskGuard,
    tcp: TaskGuard,
}

struct Shared {
    zone: Mutex<Zone>,
    queries: AtomicU64,
}

struct Zone {
    mode: DnsMode,
    /// Addresses by normalized name (see [`normalize`]).
    records: HashMap<String, Vec<IpAddr>>,
    /// Names answered with one of their addresses per query, in turn.
    rotating: HashMap<String, u64>,
}

impl DnsServer {
    /// Starts a server on `ip` with a free port, answering NXDOMAIN for every
    /// name until records are set.
    ///
    /// Panics when `ip` cannot be bound: a test without its DNS server cannot
    /// do anything useful.
    pub async fn start(ip: IpAddr) -> DnsServer {
        let (udp, tcp) = bind_pair(ip).await;
        let addr = udp.local_addr().expect("bound UDP socket has an address");
        let shared = Arc::new(Shared {
            zone: Mutex::new(Zone {
                mode: DnsMode::Answer,
                records: HashMap::new(),
                rotating: HashMap::new(),
            }),
            queries: AtomicU64::new(0),
        });
        let udp = TaskGuard::spawn(serve_udp(udp, Arc::clone(&shared)));
        let tcp_shared = Arc::clone(&shared);
        let tcp = TaskGuard::spawn(accept_loop(tcp, move |stream| {
            serve_tcp(stream, Arc::clone(&tcp_shared))
        }));
        DnsServer {
            addr,
            shared,
            udp,
            tcp,
        }
    }

    /// The address to configure as the proxy's nameserver (UDP and TCP).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Sets the addresses `name` resolves to, replacing earlier ones.
    ///
    /// IPv4 addresses answer A queries and IPv6 ones AAAA queries, all with
    /// TTL 0 so resolvers see a change on their next lookup. An empty list
    /// makes the name exist with no addresses (NOERROR, no answers). Names
    /// match case-insensitively, with or without the trailing dot.
    pub fn set(&self, name: &str, addrs: Vec<IpAddr>) {
        let mut zone = lock(&self.shared.zone);
        zone.rotating.remove(&normalize(name));
        zone.records.insert(normalize(name), addrs);
    }

    /// Forgets `name`, so it answers NXDOMAIN again.
    pub fn remove(&self, name: &str) {
        lock(&self.shared.zone).records.remove(&normalize(name));
    }

    /// Changes how queries are treated from the next query on.
    /// Sets `name`'s addresses, answered one per A query in turn: an answer that changes on
    /// every query.
    pub fn set_rotating(&self, name: &str, addrs: Vec<IpAddr>) {
        let key = normalize(name);
        let mut zone = lock(&self.shared.zone);
        zone.records.insert(key.clone(), addrs);
        zone.rotating.insert(key, 0);
    }

    pub fn set_mode(&self, mode: DnsMode) {
        lock(&self.shared.zone).mode = mode;
    }

    /// Number of queries received over UDP and TCP, in any mode, including
    /// ones that could not be decoded.
    pub fn queries(&self) -> u64 {
        self.shared.queries.load(Ordering::SeqCst)
    }

    /// Stops the server and waits until both sockets are closed.
    pub async fn stop(mut self) {
        self.udp.stop().await;
        self.tcp.stop().await;
    }
}

/// Binds UDP on `ip:0` and TCP on the same port, trying again with a new
/// port when something else already holds that port on TCP.
async fn bind_pair(ip: IpAddr) -> (UdpSocket, TcpListener) {
    for _ in 0..PORT_ATTEMPTS {
        let udp = UdpSocket::bind(SocketAddr::new(ip, 0))
            .await
            .unwrap_or_else(|e| panic!("cannot bind DNS UDP socket on {ip}: {e}"));
        let addr = udp.local_addr().expect("bound UDP socket has an address");
        match TcpListener::bind(addr).await {
            Ok(tcp) => return (udp, tcp),
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => continue,
            Err(e) => panic!("cannot bind DNS TCP listener on {addr}: {e}"),
        }
    }
    panic!("no port on {ip} was free for both UDP and TCP after {PORT_ATTEMPTS} attempts");
}

async fn serve_udp(socket: UdpSocket, shared: Arc<Shared>) {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let (len, peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            // A failed receive concerns one datagram; keep serving.
            Err(_) => continue,
        };
        if let Some(garbage) = shared.garbage(&buf[..len]) {
            let _ = socket.send_to(&garbage, peer).await;
            continue;
        }
        let Some(response) = shared.respond(&buf[..len]) else {
            continue;
        };
        let limit = response
            .edns
            .as_ref()
            .map_or(CLASSIC_UDP_PAYLOAD, |edns| usize::from(edns.max_payload()));
        let Some(mut bytes) = encode(&response) else {
            continue;
        };
        if bytes.len() > limit {
            // Too big for UDP: send the header and question with TC set so
            // the resolver retries over TCP, as a real server would.
            match encode(&response.truncate()) {
                Some(truncated) => bytes = truncated,
                None => continue,
            }
        }
        // A lost reply looks like packet loss to the resolver; nothing to do.
        let _ = socket.send_to(&bytes, peer).await;
    }
}

/// Serves length-prefixed DNS messages (RFC 1035 4.2.2) until the peer
/// closes; several queries may arrive on one connection.
async fn serve_tcp(mut stream: TcpStream, shared: Arc<Shared>) {
    let mut buf = vec![0u8; usize::from(u16::MAX)];
    loop {
        let Ok(len) = stream.read_u16().await else {
            return;
        };
        let packet = &mut buf[..usize::from(len)];
        if stream.read_exact(packet).await.is_err() {
            return;
        }
        // In Silent mode the connection stays open with no reply, so the
        // resolver's TCP attempt times out too.
        let reply = match shared.garbage(packet) {
            Some(garbage) => Some(garbage),
            None => shared.respond(packet).as_ref().and_then(encode),
        };
        let Some(bytes) = reply else {
            continue;
        };
        let Ok(len) = u16::try_from(bytes.len()) else {
            continue;
        };
        let mut framed = Vec::with_capacity(bytes.len() + 2);
        framed.extend_from_slice(&len.to_be_bytes());
        framed.extend_from_slice(&bytes);
        if stream.write_all(&framed).await.is_err() {
            return;
        }
    }
}

impl Shared {
    /// In [`DnsMode::Garbage`], the reply to `packet` (counted as a query): its id, then
    /// random bytes. `None` in every other mode.
    fn garbage(&self, packet: &[u8]) -> Option<Vec<u8>> {
        if lock(&self.zone).mode != DnsMode::Garbage {
            return None;
        }
        self.queries.fetch_add(1, Ordering::SeqCst);
        let mut reply = packet.get(..2)?.to_vec();
        let mut noise = [0u8; 30];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut noise);
        reply.extend_from_slice(&noise);
        Some(reply)
    }

    /// Counts the query and builds the reply the current mode calls for;
    /// `None` means stay silent.
    fn respond(&self, packet: &[u8]) -> Option<Message> {
        self.queries.fetch_add(1, Ordering::SeqCst);
        // Undecodable packets and stray responses get no reply, as from most
        // servers.
        let request = Message::from_vec(packet).ok()?;
        if request.metadata.message_type != MessageType::Query {
            return None;
        }
        let mut zone = lock(&self.zone);
        let mut response = reply_to(&request);
        match zone.mode {
            DnsMode::Silent => return None,
            DnsMode::ServFail => {
                // A failing server speaks for no zone.
                response.metadata.authoritative = false;
                response.metadata.response_code = ResponseCode::ServFail;
            }
            // Answered before a reply is built (`Shared::garbage`); a mode switch in between
            // leaves this query unanswered.
            DnsMode::Garbage => return None,
            DnsMode::Answer => match (request.metadata.op_code, request.queries.as_slice()) {
                (OpCode::Query, [query]) => zone.answer(query, &mut response),
                (OpCode::Query, _) => response.metadata.response_code = ResponseCode::FormErr,
                _ => response.metadata.response_code = ResponseCode::NotImp,
            },
        }
        Some(response)
    }
}

impl Zone {
    /// Fills in the answer to one question: the matching records, or an SOA
    /// with TTL 0 for a negative answer so resolvers do not cache it.
    fn answer(&mut self, query: &Query, response: &mut Message) {
        let key = normalize(&query.name().to_ascii());
        let Some(all) = self.records.get(&key) else {
            response.metadata.response_code = ResponseCode::NXDomain;
            response.add_authority(negative_soa());
            return;
        };
        let addrs: Vec<IpAddr> = match self.rotating.get_mut(&key) {
            Some(turn) if !all.is_empty() && query.query_type() == RecordType::A => {
                *turn += 1;
                vec![all[*turn as usize % all.len()]]
            }
            _ => all.clone(),
        };
        let name = query.name();
        let records: Vec<Record> = addrs
            .iter()
            .filter_map(|addr| match (query.query_type(), addr) {
                (RecordType::A, IpAddr::V4(v4)) => Some(RData::A(A(*v4))),
                (RecordType::AAAA, IpAddr::V6(v6)) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|rdata| Record::from_rdata(name.clone(), 0, rdata))
            .collect();
        if records.is_empty() {
            response.add_authority(negative_soa());
        } else {
            response.add_answers(records);
        }
    }
}

/// Starts a response to `request`: same id, opcode, RD/CD flags and question,
/// with AA (this server is the authority for its names) and RA (so stub
/// resolvers accept it as their recursive server). EDNS is echoed because
/// RFC 6891 requires it when the query carried it.
fn reply_to(request: &Message) -> Message {
    let mut response = Message::response(request.metadata.id, request.metadata.op_code);
    response.metadata = Metadata::response_from_request(&request.metadata);
    response.metadata.authoritative = true;
    response.metadata.recursion_available = true;
    response.add_queries(request.queries.iter().cloned());
    if request.edns.is_some() {
        let mut edns = Edns::new();
        edns.set_max_payload(EDNS_UDP_PAYLOAD);
        response.set_edns(edns);
    }
    response
}

/// The SOA for negative answers (RFC 2308), with TTL and minimum 0 so no
/// resolver caches "no such name" while a test is about to add it.
fn negative_soa() -> Record {
    let soa = SOA::new(Name::root(), Name::root(), 1, 0, 0, 0, 0);
    Record::from_rdata(Name::root(), 0, RData::SOA(soa))
}

/// Encodes a message; `None` only if hickory-proto rejects it, which the
/// caller treats as a dropped reply.
fn encode(message: &Message) -> Option<Vec<u8>> {
    message.to_vec().ok()
}

/// The lookup key for a name: lowercase, without the trailing dot.
fn normalize(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}
