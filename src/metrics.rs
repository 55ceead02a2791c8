//! Every metric name, its description and the helpers that record it, in one place.
//!
//! Prometheus conventions: `_total` counters, `_seconds` and `_bytes` units, `backend`,
//! `listener` and `result` labels.
//!
//! Series labelled by backend ([`PER_BACKEND`]) live in a recorder of their own that removes
//! a series once it has not changed for `admin.metrics_expiry`: backends come and go with
//! every deploy, and a departed one must not keep its ~30 series forever. The series of every
//! backend still known are touched by [`keep_alive`], so only departed ones expire. Every other
//! series is kept for the life of the process.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use metrics_exporter_prometheus::{
    Matcher, PrometheusBuilder, PrometheusHandle, PrometheusRecorder,
};
use metrics_util::MetricKindMask;

use roleproxy_core::route::{Liveness, Mode, Role};

pub const SESSIONS_ACTIVE: &str = "roleproxy_sessions_active";
pub const SESSIONS_TOTAL: &str = "roleproxy_sessions_total";
pub const BYTES_TOTAL: &str = "roleproxy_bytes_total";
pub const CHECKS_TOTAL: &str = "roleproxy_checks_total";
pub const CHECK_DURATION: &str = "roleproxy_check_duration_seconds";
pub const BACKEND_ROLE: &str = "roleproxy_backend_role";
pub const LEADER_CHANGES_TOTAL: &str = "roleproxy_leader_changes_total";
pub const ROUTE_GENERATION: &str = "roleproxy_route_generation";
pub const SPLIT_BRAIN_TOTAL: &str = "roleproxy_split_brain_total";
pub const DNS_RESOLUTIONS_TOTAL: &str = "roleproxy_dns_resolutions_total";
pub const LEADER_WAIT: &str = "roleproxy_leader_wait_seconds";
pub const CONNECT_FAILURES_TOTAL: &str = "roleproxy_backend_connect_failures_total";
pub const POSTGRES_PROBES_TOTAL: &str = "roleproxy_postgres_probes_total";
pub const LEADER_UNCONFIRMED: &str = "roleproxy_leader_unconfirmed";
pub const ROUTE_UP: &str = "roleproxy_route_up";
pub const MAX_CONNECTIONS: &str = "roleproxy_max_connections";
pub const DISCOVERY_DROPPED_TOTAL: &str = "roleproxy_discovery_dropped_total";
pub const LOCAL_SHORTAGES_TOTAL: &str = "roleproxy_local_shortages_total";
pub const STARTUP_RETRIES_TOTAL: &str = "roleproxy_startup_retries_total";
/// Counted where warnings are rate-limited, which the agent shares.
pub use roleproxy_common::ratelimit::LOG_SUPPRESSED_TOTAL;
pub const CANCEL_REQUESTS_TOTAL: &str = "roleproxy_cancel_requests_total";
pub const BUILD_INFO: &str = "roleproxy_build_info";
pub const PAUSED: &str = "roleproxy_paused";
pub const PAUSE_HELD_CLIENTS: &str = "roleproxy_pause_held_clients";
pub const PAUSE_EVENTS_TOTAL: &str = "roleproxy_pause_events_total";
pub const PAUSE_CUT_SESSIONS_TOTAL: &str = "roleproxy_pause_cut_sessions_total";
pub const BACKEND_OPERATOR_STATE: &str = "roleproxy_backend_operator_state";

/// What happened to the pause: `POST /pause`, `POST /resume`, or `proxy.pause_limit` ran out.
pub const PAUSE_EVENTS: [&str; 3] = ["pause", "resume", "auto_resume"];

/// A replica listener's CancelRequest, sent to the backend of the session whose key it
/// carries ...
pub const CANCEL_TO_SESSION_BACKEND: &str = "session_backend";
/// ... to every replica, its key unknown here (a TLS session, another proxy, evicted) ...
pub const CANCEL_TO_EVERY_REPLICA: &str = "every_replica";
/// ... or nowhere: its key unknown, and no replica.
pub const CANCEL_TO_NONE: &str = "none";

/// Why a leader failed a client's startup, which was then held for the next leader.
pub const STARTUP_FAILURES: [&str; 3] = ["closed", "refusing", "timed_out"];

/// Where this host's own shortage was met: never counted against a node.
pub const SHORTAGE_DURING: [&str; 3] = ["session", "check", "probe"];

/// Every `result` a session or a refused client can end with, so each listener's counters
/// exist at 0 from its start.
pub const SESSION_RESULTS: [&str; 14] = [
    "closed",
    "error",
    "drained",
    "transaction_end",
    "contest_lost",
    "grace_over",
    "idle_timeout",
    "shutdown",
    "no_leader",
    "unreachable",
    "limit",
    "silent",
    "half_closed",
    "loop",
];

/// Every `result` of a DNS lookup (`ok`, or the error's label).
pub const DNS_RESULTS: [&str; 6] = [
    "ok",
    "timeout",
    "nxdomain",
    "no_records",
    "resolver",
    "error",
];

/// The metrics labelled by backend: they expire once a backend is gone.
pub const PER_BACKEND: [&str; 6] = [
    CHECKS_TOTAL,
    CHECK_DURATION,
    BACKEND_ROLE,
    CONNECT_FAILURES_TOTAL,
    POSTGRES_PROBES_TOTAL,
    BACKEND_OPERATOR_STATE,
];

/// What a rate-limited warning is about, with the agent's own: the `what` label of
/// `roleproxy_log_suppressed_total`.
pub use roleproxy_common::ratelimit::warning;

/// Reasons a discovered or configured backend address is dropped.
pub const DROP_REASONS: [&str; 4] = ["unspecified", "multicast", "broadcast", "own_address"];

/// The two recorders: one keeps its series, the other lets per-backend series expire.
struct Recorders {
    kept: PrometheusRecorder,
    expiring: PrometheusRecorder,
}

impl Recorders {
    fn pick(&self, name: &str) -> &PrometheusRecorder {
        if PER_BACKEND.contains(&name) {
            &self.expiring
        } else {
            &self.kept
        }
    }
}

impl Recorder for Recorders {
    fn describe_counter(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.pick(key.as_str())
            .describe_counter(key, unit, description)
    }

    fn describe_gauge(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.pick(key.as_str())
            .describe_gauge(key, unit, description)
    }

    fn describe_histogram(&self, key: KeyName, unit: Option<Unit>, description: SharedString) {
        self.pick(key.as_str())
            .describe_histogram(key, unit, description)
    }

    fn register_counter(&self, key: &Key, metadata: &Metadata<'_>) -> Counter {
        self.pick(key.name()).register_counter(key, metadata)
    }

    fn register_gauge(&self, key: &Key, metadata: &Metadata<'_>) -> Gauge {
        self.pick(key.name()).register_gauge(key, metadata)
    }

    fn register_histogram(&self, key: &Key, metadata: &Metadata<'_>) -> Histogram {
        self.pick(key.name()).register_histogram(key, metadata)
    }
}

struct Handles {
    kept: PrometheusHandle,
    expiring: PrometheusHandle,
    /// Renders of the expiring recorder take turns. Two at once can leave an expired histogram
    /// behind for good: one removes it while the other, working from an older list, puts its
    /// buckets back where nothing will ever remove them again.
    rendering: Mutex<()>,
}

impl Handles {
    /// The expiring recorder's text; also when its expired series are removed.
    fn render_expiring(&self) -> String {
        let _turn = self
            .rendering
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        self.expiring.run_upkeep();
        self.expiring.render()
    }
}

static HANDLES: OnceLock<Option<Handles>> = OnceLock::new();

/// Installs the process-wide recorder once, with per-backend series expiring after `expiry`
/// without change; later calls keep the first. Does nothing when another recorder was
/// installed first (metrics then go there).
pub fn install(expiry: Duration) {
    HANDLES.get_or_init(|| {
        let buckets = [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
        ];
        let builder = || {
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
        };
        let recorders = builder().and_then(|kept| {
            let expiring = builder()?.idle_timeout(MetricKindMask::ALL, Some(expiry));
            Ok(Recorders {
                kept: kept.build_recorder(),
                expiring: expiring.build_recorder(),
            })
        });
        let recorders = match recorders {
            Ok(recorders) => recorders,
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                return None;
            }
        };
        let handles = Handles {
            kept: recorders.kept.handle(),
            expiring: recorders.expiring.handle(),
            rendering: Mutex::new(()),
        };
        match metrics::set_global_recorder(recorders) {
            Ok(()) => {
                describe();
                process_series_at_zero();
                Some(handles)
            }
            Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed");
                None
            }
        }
    });
}

/// Prometheus text for `/metrics`, each family's series in label order. Rendering is also
/// when expired series are removed.
pub fn render() -> String {
    match HANDLES.get() {
        Some(Some(handles)) => {
            handles.kept.run_upkeep();
            let mut text = handles.kept.render();
            text.push_str(&handles.render_expiring());
            sort_series(&text)
        }
        _ => String::new(),
    }
}

/// Touches every series of the backends still known (at 0 where a series did not exist yet),
/// then removes the series that expired: those of departed backends. Call it several times per
/// `admin.metrics_expiry`. A latency histogram cannot be touched without a sample; a live
/// backend records one at every check.
pub fn keep_alive(backends: impl IntoIterator<Item = SocketAddr>) {
    for addr in backends {
        backend_joined(addr);
        let backend = addr.to_string();
        for label in Role::LABELS {
            gauge!(BACKEND_ROLE, "backend" => backend.clone(), "role" => label).increment(0.0);
        }
    }
    if let Some(Some(handles)) = HANDLES.get() {
        handles.render_expiring();
    }
}

/// Sorts the series of each metric family by their labels, so `/metrics` reads the same from
/// scrape to scrape (the exporter keeps them in hash order). A histogram's lines for one label
/// set stay together and in order: the key leaves out `le`, and the sort is stable. Pure.
pub fn sort_series(text: &str) -> String {
    fn labels_without_le(line: &str) -> String {
        let Some((_, rest)) = line.split_once('{') else {
            return String::new();
        };
        let labels = rest.split_once('}').map_or(rest, |(labels, _)| labels);
        labels
            .split(',')
            .filter(|label| !label.starts_with("le="))
            .collect::<Vec<_>>()
            .join(",")
    }
    let mut out = String::with_capacity(text.len());
    let mut family: Vec<&str> = Vec::new();
    let flush = |family: &mut Vec<&str>, out: &mut String| {
        family.sort_by_cached_key(|line| labels_without_le(line));
        for line in family.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    for line in text.lines() {
        if line.starts_with('#') || line.is_empty() {
            flush(&mut family, &mut out);
            out.push_str(line);
            out.push('\n');
        } else {
            family.push(line);
        }
    }
    flush(&mut family, &mut out);
    out
}

/// The series that belong to the process rather than to a backend or a listener, at their
/// starting values: an alert or a rate over them works from the first scrape, not from the
/// first event.
fn process_series_at_zero() {
    gauge!(BUILD_INFO, "version" => crate::VERSION, "commit" => crate::COMMIT).set(1.0);
    counter!(SPLIT_BRAIN_TOTAL).increment(0);
    counter!(LEADER_CHANGES_TOTAL).increment(0);
    gauge!(ROUTE_GENERATION).set(0.0);
    gauge!(ROUTE_UP).set(0.0);
    gauge!(LEADER_UNCONFIRMED).set(0.0);
    for direction in ["client_to_backend", "backend_to_client"] {
        counter!(BYTES_TOTAL, "direction" => direction).increment(0);
    }
    for reason in DROP_REASONS {
        counter!(DISCOVERY_DROPPED_TOTAL, "reason" => reason).increment(0);
    }
    for during in SHORTAGE_DURING {
        counter!(LOCAL_SHORTAGES_TOTAL, "during" => during).increment(0);
    }
    for reason in STARTUP_FAILURES {
        counter!(STARTUP_RETRIES_TOTAL, "reason" => reason).increment(0);
    }
    for sent_to in [
        CANCEL_TO_SESSION_BACKEND,
        CANCEL_TO_EVERY_REPLICA,
        CANCEL_TO_NONE,
    ] {
        counter!(CANCEL_REQUESTS_TOTAL, "sent_to" => sent_to).increment(0);
    }
    for what in warning::ALL {
        counter!(LOG_SUPPRESSED_TOTAL, "what" => what).increment(0);
    }
    gauge!(PAUSED).set(0.0);
    gauge!(PAUSE_HELD_CLIENTS).set(0.0);
    for event in PAUSE_EVENTS {
        counter!(PAUSE_EVENTS_TOTAL, "event" => event).increment(0);
    }
    counter!(PAUSE_CUT_SESSIONS_TOTAL).increment(0);
    // Registered, not recorded: an empty histogram until the first client waits.
    let _ = histogram!(LEADER_WAIT);
}

/// A listener's series at 0, from the moment it starts.
pub fn listener_started(listener: &Arc<str>) {
    gauge!(SESSIONS_ACTIVE, "listener" => Arc::clone(listener)).increment(0.0);
    for result in SESSION_RESULTS {
        counter!(SESSIONS_TOTAL, "listener" => Arc::clone(listener), "result" => result)
            .increment(0);
    }
}

/// A DNS name's lookup counters at 0, from the moment it is resolved.
pub fn dns_name_configured(name: &str) {
    for result in DNS_RESULTS {
        counter!(DNS_RESOLUTIONS_TOTAL, "name" => name.to_string(), "result" => result)
            .increment(0);
    }
}

/// `proxy.max_connections`, so the share in use can be alerted on.
pub fn set_max_connections(limit: usize) {
    gauge!(MAX_CONNECTIONS).set(limit as f64);
}

/// 1 while new sessions have a leader to go to.
pub fn route_up(up: bool) {
    gauge!(ROUTE_UP).set(if up { 1.0 } else { 0.0 });
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; its labels name the running version and the commit it was built from"
    );
    describe_gauge!(
        SESSIONS_ACTIVE,
        "Client sessions currently open, by listener"
    );
    describe_counter!(
        SESSIONS_TOTAL,
        "Client sessions ended, by listener and result"
    );
    describe_counter!(BYTES_TOTAL, Unit::Bytes, "Bytes copied, by direction");
    describe_counter!(CHECKS_TOTAL, "Role checks, by backend and result");
    describe_histogram!(
        CHECK_DURATION,
        Unit::Seconds,
        "Role check latency, by backend"
    );
    describe_gauge!(
        BACKEND_ROLE,
        "1 for the backend's confirmed role, 0 otherwise"
    );
    describe_counter!(
        LEADER_CHANGES_TOTAL,
        "Route changes (new leader or leader lost)"
    );
    describe_gauge!(ROUTE_GENERATION, "Current route generation");
    describe_counter!(
        SPLIT_BRAIN_TOTAL,
        "Times several backends claimed leader at once"
    );
    describe_counter!(DNS_RESOLUTIONS_TOTAL, "DNS lookups, by name and result");
    describe_histogram!(
        LEADER_WAIT,
        Unit::Seconds,
        "Time new clients waited for a route"
    );
    describe_counter!(CONNECT_FAILURES_TOTAL, "Failed connects to a backend");
    describe_counter!(
        POSTGRES_PROBES_TOTAL,
        "Liveness probes of a backend's Postgres after a failed check or connect, by backend and result (alive, refusing, gone)"
    );
    describe_gauge!(
        LEADER_UNCONFIRMED,
        "1 while the route's leader fails its checks but its Postgres answers"
    );
    describe_gauge!(
        ROUTE_UP,
        "1 while new sessions have a leader to go to, 0 while they wait (no route, or held)"
    );
    describe_gauge!(
        MAX_CONNECTIONS,
        "proxy.max_connections, the limit on open sessions"
    );
    describe_counter!(
        DISCOVERY_DROPPED_TOTAL,
        "Backend addresses dropped: unspecified, multicast or broadcast DNS answers, or the proxy's own listener"
    );
    describe_counter!(
        STARTUP_RETRIES_TOTAL,
        "Client startups a leader failed before answering them (closed, refusing with 57P03, timed out), held and replayed on the next leader within proxy.leader_wait, by reason"
    );
    describe_counter!(
        CANCEL_REQUESTS_TOTAL,
        "CancelRequests on replica listeners, by where they were sent: the backend of the session whose key they carry, every replica (key unknown: TLS, another proxy, evicted), or none"
    );
    describe_counter!(
        LOG_SUPPRESSED_TOTAL,
        "Warning lines left out of the log by the rate limit of one line per key every 10 s, by what they were about"
    );
    describe_gauge!(
        PAUSED,
        "1 while the proxy is paused (POST /pause): leader sessions end at their next transaction boundary, new clients are held"
    );
    describe_gauge!(
        PAUSE_HELD_CLIENTS,
        "New clients held by the pause, waiting for it to lift"
    );
    describe_counter!(
        PAUSE_EVENTS_TOTAL,
        "Pauses begun (pause), lifted by POST /resume (resume), or lifted when proxy.pause_limit ran out (auto_resume)"
    );
    describe_counter!(
        PAUSE_CUT_SESSIONS_TOTAL,
        "Leader sessions a pause closed part-way: still in a transaction when proxy.pause_grace ran out, or encrypted or not Postgres, so that their boundaries cannot be seen"
    );
    describe_gauge!(
        BACKEND_OPERATOR_STATE,
        "What an operator set for the backend: 0 ready, 1 drain (no new sessions, open ones end at their next transaction boundary), 2 maintenance (no new sessions, open ones stay)"
    );
    describe_counter!(
        LOCAL_SHORTAGES_TOTAL,
        "Times this host ran short of descriptors, memory, socket buffers or ephemeral ports, by what met it (session connect, check, probe); never counted against a node"
    );
}

pub fn session_started(listener: &Arc<str>) {
    gauge!(SESSIONS_ACTIVE, "listener" => Arc::clone(listener)).increment(1.0);
}

/// Ends a session that was counted by [`session_started`].
pub fn session_ended(
    listener: &Arc<str>,
    result: &'static str,
    client_to_backend: u64,
    backend_to_client: u64,
) {
    gauge!(SESSIONS_ACTIVE, "listener" => Arc::clone(listener)).decrement(1.0);
    session_result(listener, result);
    counter!(BYTES_TOTAL, "direction" => "client_to_backend").increment(client_to_backend);
    counter!(BYTES_TOTAL, "direction" => "backend_to_client").increment(backend_to_client);
}

/// Counts a client that never became a session (refused, or gave up waiting).
pub fn session_result(listener: &Arc<str>, result: &'static str) {
    counter!(SESSIONS_TOTAL, "listener" => Arc::clone(listener), "result" => result).increment(1);
}

pub fn check_result(backend: SocketAddr, role: &Role, latency: Duration) {
    let backend = backend.to_string();
    counter!(CHECKS_TOTAL, "backend" => backend.clone(), "result" => role.label()).increment(1);
    histogram!(CHECK_DURATION, "backend" => backend).record(latency.as_secs_f64());
}

/// Sets the role gauge: 1 for `current`, 0 for every other role; `None` (the backend left)
/// zeroes them all.
pub fn backend_role(backend: SocketAddr, current: Option<&Role>) {
    let backend = backend.to_string();
    for label in Role::LABELS {
        let value = if current.map(Role::label) == Some(label) {
            1.0
        } else {
            0.0
        };
        gauge!(BACKEND_ROLE, "backend" => backend.clone(), "role" => label).set(value);
    }
}

pub fn route_changed(generation: u64) {
    counter!(LEADER_CHANGES_TOTAL).increment(1);
    set_route_generation(generation);
}

pub fn set_route_generation(generation: u64) {
    gauge!(ROUTE_GENERATION).set(generation as f64);
}

pub fn split_brain() {
    counter!(SPLIT_BRAIN_TOTAL).increment(1);
}

pub fn dns_resolution(name: &str, result: &'static str) {
    counter!(DNS_RESOLUTIONS_TOTAL, "name" => name.to_string(), "result" => result).increment(1);
}

pub fn backend_wait(waited: Duration) {
    histogram!(LEADER_WAIT).record(waited.as_secs_f64());
}

pub fn discovery_dropped(reason: &'static str) {
    counter!(DISCOVERY_DROPPED_TOTAL, "reason" => reason).increment(1);
}

/// This host ran short (`during` is one of [`SHORTAGE_DURING`]).
pub fn local_shortage(during: &'static str) {
    counter!(LOCAL_SHORTAGES_TOTAL, "during" => during).increment(1);
}

/// A leader failed a client's startup before answering it (`reason`: one of
/// [`STARTUP_FAILURES`]); the startup is held for the next leader.
pub fn startup_retried(reason: &'static str) {
    counter!(STARTUP_RETRIES_TOTAL, "reason" => reason).increment(1);
}

/// A replica listener's CancelRequest, by where it was sent (`CANCEL_TO_*`).
pub fn cancel_request(sent_to: &'static str) {
    counter!(CANCEL_REQUESTS_TOTAL, "sent_to" => sent_to).increment(1);
}

pub fn connect_failed(backend: SocketAddr) {
    counter!(CONNECT_FAILURES_TOTAL, "backend" => backend.to_string()).increment(1);
}

pub fn postgres_probe(backend: SocketAddr, liveness: &Liveness) {
    counter!(POSTGRES_PROBES_TOTAL, "backend" => backend.to_string(), "result" => liveness.label())
        .increment(1);
}

/// Registers a backend's counters at 0 when it joins, so a rate or an alert over them works
/// from its first check, probe or failed connect. [`keep_alive`] calls it again while the
/// backend is known; once it is gone, these series expire with the rest of its series.
pub fn backend_joined(backend: SocketAddr) {
    let backend = backend.to_string();
    for result in Liveness::LABELS {
        counter!(POSTGRES_PROBES_TOTAL, "backend" => backend.clone(), "result" => result)
            .increment(0);
    }
    for result in Role::LABELS {
        counter!(CHECKS_TOTAL, "backend" => backend.clone(), "result" => result).increment(0);
    }
    counter!(CONNECT_FAILURES_TOTAL, "backend" => backend.clone()).increment(0);
    // Added to, not set: 0 (ready) for a new backend, and an operator's drain or maintenance
    // is kept.
    gauge!(BACKEND_OPERATOR_STATE, "backend" => backend).increment(0.0);
}

/// 1 while paused.
pub fn paused(paused: bool) {
    gauge!(PAUSED).set(if paused { 1.0 } else { 0.0 });
}

pub fn pause_held_clients(held: u64) {
    gauge!(PAUSE_HELD_CLIENTS).set(held as f64);
}

/// `event` is one of [`PAUSE_EVENTS`].
pub fn pause_event(event: &'static str) {
    counter!(PAUSE_EVENTS_TOTAL, "event" => event).increment(1);
}

/// A leader session the pause closed part-way.
pub fn pause_cut_session() {
    counter!(PAUSE_CUT_SESSIONS_TOTAL).increment(1);
}

/// What an operator set for `backend` ([`Mode::gauge`]).
pub fn backend_operator_state(backend: SocketAddr, mode: Mode) {
    gauge!(BACKEND_OPERATOR_STATE, "backend" => backend.to_string()).set(mode.gauge());
}

pub fn leader_unconfirmed(unconfirmed: bool) {
    gauge!(LEADER_UNCONFIRMED).set(if unconfirmed { 1.0 } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::sort_series;

    #[test]
    fn series_are_sorted_by_labels_within_each_family() {
        let text = "# TYPE a gauge\na{role=\"replica\"} 0\na{role=\"down\"} 1\n\
                    # TYPE h histogram\nh_bucket{b=\"2\",le=\"1\"} 0\nh_bucket{b=\"2\",le=\"+Inf\"} 0\nh_sum{b=\"2\"} 0\n\
                    h_bucket{b=\"1\",le=\"1\"} 0\nh_bucket{b=\"1\",le=\"+Inf\"} 0\nh_sum{b=\"1\"} 0\n";
        let sorted = sort_series(text);
        assert_eq!(
            sorted,
            "# TYPE a gauge\na{role=\"down\"} 1\na{role=\"replica\"} 0\n\
             # TYPE h histogram\nh_bucket{b=\"1\",le=\"1\"} 0\nh_bucket{b=\"1\",le=\"+Inf\"} 0\nh_sum{b=\"1\"} 0\n\
             h_bucket{b=\"2\",le=\"1\"} 0\nh_bucket{b=\"2\",le=\"+Inf\"} 0\nh_sum{b=\"2\"} 0\n"
        );
    }
}
