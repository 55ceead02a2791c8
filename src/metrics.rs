//! Every metric name, its description and the helpers that record it, in one place.
//!
//! Prometheus conventions: `_total` counters, `_seconds` and `_bytes` units, `backend`,
//! `listener` and `result` labels.

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::leader::Role;
use crate::pgwire::Liveness;

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

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process-wide recorder once; later calls return the same handle.
/// `None` when another recorder was installed first (metrics then go there).
pub fn install() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let buckets = [
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ];
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)
                .and_then(|b| b.install_recorder());
            match handle {
                Ok(handle) => {
                    describe();
                    Some(handle)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// Prometheus text for `/metrics`.
pub fn render() -> String {
    match install() {
        Some(handle) => {
            handle.run_upkeep();
            handle.render()
        }
        None => String::new(),
    }
}

fn describe() {
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

pub fn leader_wait(waited: Duration) {
    histogram!(LEADER_WAIT).record(waited.as_secs_f64());
}

pub fn connect_failed(backend: SocketAddr) {
    counter!(CONNECT_FAILURES_TOTAL, "backend" => backend.to_string()).increment(1);
}

pub fn postgres_probe(backend: SocketAddr, liveness: &Liveness) {
    counter!(POSTGRES_PROBES_TOTAL, "backend" => backend.to_string(), "result" => liveness.label())
        .increment(1);
}

/// Registers a backend's probe counters at 0, so a rate over them works from the first probe.
pub fn postgres_probes_zero(backend: SocketAddr) {
    for result in Liveness::LABELS {
        counter!(POSTGRES_PROBES_TOTAL, "backend" => backend.to_string(), "result" => result)
            .increment(0);
    }
}

pub fn leader_unconfirmed(unconfirmed: bool) {
    gauge!(LEADER_UNCONFIRMED).set(if unconfirmed { 1.0 } else { 0.0 });
}
