//! Repeated warnings, rate-limited: at most one line per key every [`EVERY`], and the next
//! line logged for that key says how many were suppressed since (`suppressed=N`).
//!
//! What the network does can fire the same warning many times a second: a DNS server that
//! rotates sixty multicast answers every second, a dead leader that a thousand clients fail
//! to connect to, a flood of clients refused while there is no route. Each would bury the
//! lines that matter and fill the disk. Every suppressed line is still counted, in
//! `roleproxy_log_suppressed_total{what}`.

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tokio::time::Instant;

#[cfg(test)]
use warning::{CONNECT_FAILED, DNS_DROPPED};

/// Warning lines left out by [`allow`], by [`warning`]. Its description is the proxy's, with
/// every other metric of its `/metrics`; the agent serves no metrics, and counts into nothing.
pub const LOG_SUPPRESSED_TOTAL: &str = "roleproxy_log_suppressed_total";

/// What a rate-limited warning is about: the `what` label of `roleproxy_log_suppressed_total`.
/// One list for the proxy's and the agent's, so the proxy can start each at 0.
pub mod warning {
    /// A DNS answer dropped: no node can have that address (or it is the proxy's own).
    pub const DNS_DROPPED: &str = "dns_dropped";
    /// A DNS lookup failed, and the last good answer is kept.
    pub const DNS_FAILED: &str = "dns_failed";
    /// A check could not tell: this host or the node is out of resources.
    pub const CHECK_SKIPPED: &str = "check_skipped";
    /// A probe of a node's Postgres skipped or postponed.
    pub const PROBE: &str = "probe";
    /// A connect to a backend, or a client's startup on it, failed.
    pub const CONNECT_FAILED: &str = "connect_failed";
    /// A client was refused: no route, no replica, or the backend unreachable.
    pub const CLIENT_REFUSED: &str = "client_refused";
    /// The agent could not tell whether its fence file exists.
    pub const FENCE: &str = "fence";
    pub const ALL: [&str; 7] = [
        DNS_DROPPED,
        DNS_FAILED,
        CHECK_SKIPPED,
        PROBE,
        CONNECT_FAILED,
        CLIENT_REFUSED,
        FENCE,
    ];
}

/// One line per key per this long.
pub const EVERY: Duration = Duration::from_secs(10);

/// Keys remembered at once. Keys can come from the network (addresses a DNS server names), so
/// their number is bounded too: past it, keys whose window is over are forgotten, and while
/// it is still full a new key shares one slot per `what` with every other new key.
const MAX_KEYS: usize = 1024;

/// Per-key windows of [`EVERY`].
#[derive(Debug)]
pub struct Limiter {
    every: Duration,
    keys: HashMap<(&'static str, String), Window>,
}

#[derive(Debug)]
struct Window {
    /// No line for this key before this.
    until: Instant,
    /// Lines suppressed since the last one logged.
    suppressed: u64,
}

impl Limiter {
    pub fn new(every: Duration) -> Limiter {
        Limiter {
            every,
            keys: HashMap::new(),
        }
    }

    /// Whether the warning `what` about `key` is logged at `now`: `Some(n)` when it is, `n`
    /// being how many were suppressed since the last one logged; `None` when it is suppressed.
    pub fn allow(&mut self, what: &'static str, key: &str, now: Instant) -> Option<u64> {
        let mut slot = (what, key.to_owned());
        if !self.keys.contains_key(&slot) && self.keys.len() >= MAX_KEYS {
            self.keys.retain(|_, window| now < window.until);
            if self.keys.len() >= MAX_KEYS {
                slot = (what, String::new());
            }
        }
        let every = self.every;
        let window = self.keys.entry(slot).or_insert(Window {
            until: now,
            suppressed: 0,
        });
        if now < window.until {
            window.suppressed += 1;
            return None;
        }
        window.until = now + every;
        Some(std::mem::take(&mut window.suppressed))
    }
}

/// The process's limiter.
static LIMITER: OnceLock<Mutex<Limiter>> = OnceLock::new();

/// Whether the warning `what` (one of [`warning::ALL`]) about `key` is logged now:
/// `Some(suppressed)` when it is, with how many were left out since the last one logged
/// (`None` when none were), for the line's `suppressed` field; `None` when it is left out,
/// and counted in `roleproxy_log_suppressed_total{what}`.
pub fn allow(what: &'static str, key: impl std::fmt::Display) -> Option<Option<u64>> {
    let limiter = LIMITER.get_or_init(|| Mutex::new(Limiter::new(EVERY)));
    let allowed = limiter
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .allow(what, &key.to_string(), Instant::now());
    match allowed {
        Some(suppressed) => Some((suppressed > 0).then_some(suppressed)),
        None => {
            metrics::counter!(LOG_SUPPRESSED_TOTAL, "what" => what).increment(1);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sixty addresses rotated every second for ten seconds, as the audit's DNS server did:
    /// one line per window, and the next says how many were left out.
    #[tokio::test(start_paused = true)]
    async fn one_line_per_key_per_window_then_the_count_suppressed() {
        let mut limiter = Limiter::new(EVERY);
        let mut logged = Vec::new();
        for second in 0..10 {
            // Each address is new, but the key is the name and the reason.
            for _address in 0..60 {
                let now = Instant::now();
                if let Some(n) = limiter.allow(DNS_DROPPED, "iad.app.internal multicast", now) {
                    logged.push((second, n));
                }
            }
            tokio::time::advance(Duration::from_secs(1)).await;
        }
        assert_eq!(logged, vec![(0, 0)], "one line in the first ten seconds");
        let n = limiter.allow(DNS_DROPPED, "iad.app.internal multicast", Instant::now());
        assert_eq!(n, Some(599), "then one line, saying how many were left out");
        assert_eq!(
            limiter.allow(DNS_DROPPED, "iad.app.internal multicast", Instant::now()),
            None
        );
        // Another key, or another warning about the same key, has a window of its own.
        assert_eq!(
            limiter.allow(DNS_DROPPED, "iad.app.internal broadcast", Instant::now()),
            Some(0)
        );
        assert_eq!(
            limiter.allow(CONNECT_FAILED, "iad.app.internal multicast", Instant::now()),
            Some(0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keys_from_the_network_are_bounded() {
        let mut limiter = Limiter::new(EVERY);
        for i in 0..MAX_KEYS {
            assert_eq!(
                limiter.allow(CONNECT_FAILED, &i.to_string(), Instant::now()),
                Some(0)
            );
        }
        // Full: new keys share one window.
        assert_eq!(
            limiter.allow(CONNECT_FAILED, "new-1", Instant::now()),
            Some(0)
        );
        assert_eq!(limiter.allow(CONNECT_FAILED, "new-2", Instant::now()), None);
        assert!(limiter.keys.len() <= MAX_KEYS + 1);
        // Once their windows are over, old keys make room.
        tokio::time::advance(EVERY).await;
        assert_eq!(
            limiter.allow(CONNECT_FAILED, "new-3", Instant::now()),
            Some(0)
        );
        assert!(limiter.keys.len() <= 2, "{}", limiter.keys.len());
    }
}
