//! A fake cluster for proxy tests: a DNS server, and per node a role endpoint a test flips and
//! a tagged TCP backend, each test on its own `127.N.0.0/24`.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backend::{FullPostgres, TaggedBackend};
use crate::dns::DnsServer;
use crate::harness::{Client, ConfigBuilder, RunningProxy};
use crate::loopback;
use crate::role::{RoleEndpoint, RoleReply};

/// The name the fake DNS server answers.
pub const NAME: &str = "iad.test.internal";

pub struct FakeNode {
    pub ip: IpAddr,
    pub role: RoleEndpoint,
    pub backend: TaggedBackend,
}

impl FakeNode {
    pub fn tag(&self) -> String {
        format!("n{}", self.octet())
    }

    pub fn octet(&self) -> u8 {
        match self.ip {
            IpAddr::V4(v4) => v4.octets()[3],
            IpAddr::V6(_) => 0,
        }
    }

    pub fn addr(&self) -> String {
        SocketAddr::new(self.ip, 5433).to_string()
    }
}

/// A fake cluster: DNS on 127.N.0.1, node i on 127.N.0.(11+i), every node answering `replica`.
pub struct FakeCluster {
    pub net: u8,
    pub dns: DnsServer,
    pub nodes: Vec<FakeNode>,
}

impl FakeCluster {
    pub async fn start(net: u8, count: u8) -> FakeCluster {
        let dns = DnsServer::start(loopback(net, 0, 1)).await;
        let mut nodes = Vec::new();
        for i in 0..count {
            let ip = loopback(net, 0, 11 + i);
            let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
            let backend =
                TaggedBackend::start(SocketAddr::new(ip, 5433), &format!("n{}", 11 + i)).await;
            nodes.push(FakeNode { ip, role, backend });
        }
        let cluster = FakeCluster { net, dns, nodes };
        cluster.dns_nodes(&(0..count as usize).collect::<Vec<_>>());
        cluster
    }

    /// DNS answers the cluster name with these nodes.
    pub fn dns_nodes(&self, which: &[usize]) {
        self.dns
            .set(NAME, which.iter().map(|&i| self.nodes[i].ip).collect());
    }

    pub fn config(&self) -> ConfigBuilder {
        ConfigBuilder::new(&loopback(self.net, 0, 1).to_string(), self.dns.addr(), NAME)
    }

    pub async fn proxy(&self) -> RunningProxy {
        RunningProxy::start(self.config().config()).await
    }
}

/// The tag of the backend a new client reaches through `proxy`, if any within `wait`.
pub async fn served_by(proxy: &RunningProxy, wait: Duration) -> Option<String> {
    Client::connect(proxy.addr, wait).await.map(|c| c.tag)
}

/// A node whose role endpoint answers `leader` and whose Postgres is alive but full
/// ([`FullPostgres`]): what a probe of a leader finds when its check fails for load.
pub struct FullNode {
    pub ip: IpAddr,
    pub role: RoleEndpoint,
    _postgres: FullPostgres,
}

/// An SSLRequest: the first bytes a session sends, which [`FullPostgres`] echoes.
pub const HELLO: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

impl FakeCluster {
    /// Starts a [`FullNode`] on `127.N.0.OCTET` (not in DNS until the test says so).
    pub async fn full_node(&self, octet: u8) -> FullNode {
        let ip = loopback(self.net, 0, octet);
        let role = RoleEndpoint::start(SocketAddr::new(ip, 5500)).await;
        role.set(RoleReply::leader());
        let postgres = FullPostgres::start(SocketAddr::new(ip, 5433)).await;
        FullNode {
            ip,
            role,
            _postgres: postgres,
        }
    }
}

impl FullNode {
    pub fn addr(&self) -> String {
        SocketAddr::new(self.ip, 5433).to_string()
    }
}

/// Opens a session through `proxy` to an echoing backend, speaking first; `None` if not served.
pub async fn echo_session(proxy: SocketAddr) -> Option<TcpStream> {
    let mut session = TcpStream::connect(proxy).await.ok()?;
    echoes(&mut session, &HELLO).await.then_some(session)
}

/// Sends `bytes` on a session and reads them back from the echoing backend; false if the
/// session is gone.
pub async fn echoes(session: &mut TcpStream, bytes: &[u8]) -> bool {
    if session.write_all(bytes).await.is_err() {
        return false;
    }
    let mut back = vec![0u8; bytes.len()];
    matches!(
        tokio::time::timeout(Duration::from_secs(20), session.read_exact(&mut back)).await,
        Ok(Ok(_))
    ) && back == bytes
}
