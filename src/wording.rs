//! How times, errors and text from the network read for people, the same on the stats page and
//! in `roleproxy status`.

/// How long ago, for people: `0.4s ago`, `42s ago`, `3 min ago`, `2 h ago`, `5 days ago`.
pub fn ago(now_unix_ms: u64, then_unix_ms: u64) -> String {
    let secs = now_unix_ms.saturating_sub(then_unix_ms) as f64 / 1000.0;
    match secs {
        s if s < 10.0 => format!("{s:.1}s ago"),
        s if s < 120.0 => format!("{s:.0}s ago"),
        s if s < 7200.0 => format!("{:.0} min ago", s / 60.0),
        s if s < 172_800.0 => format!("{:.0} h ago", s / 3600.0),
        s => format!("{:.0} days ago", s / 86_400.0),
    }
}

/// [`ago`], or `never`.
pub fn when(now_unix_ms: u64, at: Option<u64>) -> String {
    at.map_or_else(|| "never".to_string(), |at| ago(now_unix_ms, at))
}

/// A pause in words, as the page and the terminal show it.
pub fn pause_text(pause: &crate::status::PauseStatus, now_unix_ms: u64) -> String {
    let left_ms = pause.resumes_at_unix_ms.saturating_sub(now_unix_ms);
    format!(
        "PAUSED since {}: leader sessions end at their next transaction boundary; {} new client{} held; resumes by itself in {:.0}s (proxy.pause_limit {:.0}s) unless POST /resume comes first",
        ago(now_unix_ms, pause.since_unix_ms),
        pause.held_clients,
        if pause.held_clients == 1 { "" } else { "s" },
        left_ms as f64 / 1000.0,
        pause.limit_ms as f64 / 1000.0,
    )
}

/// What an operator set for a backend, beside its role: nothing while it is ready.
pub fn operator_text(mode: roleproxy_core::route::Mode) -> &'static str {
    match mode {
        roleproxy_core::route::Mode::Ready => "",
        roleproxy_core::route::Mode::Drain => ", drained by the operator",
        roleproxy_core::route::Mode::Maintenance => ", in maintenance by the operator",
    }
}

/// A backend's last error with its time. While it is the outcome of the latest check (or the
/// probe after it) it reads as current, `connection refused (4.0s ago)`; once a later check
/// has answered, as history, `recovered; 3 min ago: connection refused`, so a healthy node
/// never looks faulty for an error it had once.
pub fn error_text(
    error: Option<&str>,
    error_unix_ms: Option<u64>,
    last_check_unix_ms: Option<u64>,
    now_unix_ms: u64,
) -> String {
    let Some(error) = error else {
        return String::new();
    };
    match error_unix_ms {
        Some(at) if last_check_unix_ms.is_some_and(|check| check > at) => {
            format!("recovered; {}: {error}", ago(now_unix_ms, at))
        }
        Some(at) => format!("{error} ({})", ago(now_unix_ms, at)),
        None => error.to_string(),
    }
}

/// A backend's last error as [`error_text`] words it; while its Postgres port fails, the error
/// is current whatever its role endpoint answered since: it has not recovered.
pub fn backend_error_text(backend: &crate::status::BackendStatus, now_unix_ms: u64) -> String {
    let last_check = backend
        .last_check_unix_ms
        .filter(|_| backend.data_port.is_none());
    error_text(
        backend.last_error.as_deref(),
        backend.last_error_unix_ms,
        last_check,
        now_unix_ms,
    )
}

/// The columns of the backends table, the same on the stats page and in `roleproxy status`.
pub const BACKEND_COLUMNS: [&str; 7] = [
    "backend",
    "sources",
    "role",
    "last check",
    "latency",
    "sessions",
    "last error",
];

/// One row of the backends table, in plain text that each renderer escapes its own way. The
/// role cell adds why a leader is unconfirmed, a failing Postgres port, a node that left DNS
/// and an operator's state; a failed check's error is in its own cell, not beside the role.
pub fn backend_row(backend: &crate::status::BackendStatus, now_unix_ms: u64) -> [String; 7] {
    use roleproxy_core::route::Role;
    let mut role = match (&backend.unconfirmed, &backend.role) {
        (Some(u), _) => unconfirmed_text(
            u.since_unix_ms,
            &u.check_error,
            backend.postgres.as_deref(),
            u.expired,
            now_unix_ms,
        ),
        (None, other @ Role::Other(_)) => other.to_string(),
        (None, role) => role.label().to_string(),
    };
    if let Some(d) = &backend.data_port {
        role.push_str(&data_port_text(d.since_unix_ms, &d.error, now_unix_ms));
    }
    if !backend.present {
        role.push_str(", left DNS");
    }
    role.push_str(operator_text(backend.operator));
    [
        backend.address.to_string(),
        backend.sources.join(","),
        role,
        when(now_unix_ms, backend.last_check_unix_ms),
        backend
            .last_check_latency_ms
            .map_or_else(|| "-".into(), |ms| format!("{ms:.1} ms")),
        backend.sessions.to_string(),
        backend_error_text(backend, now_unix_ms),
    ]
}

/// "leader, unconfirmed (since …, check failing: …; Postgres answers (…))", for people (rule 7).
pub fn unconfirmed_text(
    since_unix_ms: u64,
    check_error: &str,
    postgres: Option<&str>,
    expired: bool,
    now_unix_ms: u64,
) -> String {
    format!(
        "leader, unconfirmed (since {}, check failing: {check_error}; {}){}",
        ago(now_unix_ms, since_unix_ms),
        postgres.unwrap_or("Postgres not asked yet"),
        if expired {
            ", past check.unconfirmed_limit: new clients wait"
        } else {
            ""
        }
    )
}

/// ", Postgres port fails (since …): …", for people: why a node that says leader is not
/// routed.
pub fn data_port_text(since_unix_ms: u64, error: &str, now_unix_ms: u64) -> String {
    format!(
        ", Postgres port fails (since {}): {error}",
        ago(now_unix_ms, since_unix_ms)
    )
}

/// Whether log lines on stderr get colour codes: only on a terminal, and never when
/// `NO_COLOR` is set to anything but empty (no-color.org), so a log file, a pipe or a journal
/// gets plain lines.
pub fn stderr_colours() -> bool {
    use std::io::IsTerminal;
    colours(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

/// [`stderr_colours`]' rule. Pure.
pub fn colours(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colours_only_on_a_terminal_without_no_color() {
        let set = std::ffi::OsStr::new("1");
        let empty = std::ffi::OsStr::new("");
        for (terminal, no_color, expected) in [
            (true, None, true),
            (true, Some(empty), true),
            (true, Some(set), false),
            (false, None, false),
            (false, Some(set), false),
        ] {
            assert_eq!(
                colours(terminal, no_color),
                expected,
                "{terminal} {no_color:?}"
            );
        }
    }
    use crate::status_cli::render_status;

    /// `printable` itself is tested where it lives; here, that the terminal's table uses it.
    #[test]
    fn a_status_renders_with_its_control_characters_written_out() {
        let status = serde_json::json!({
            "cluster": "c\u{1b}[2J",
            "route": {"generation": 1, "target": {"state": "none", "detail": {"reason": "no_leader"}}},
            "route_text": "generation 1: no route\u{1b}[H",
            "backends": [{"address": "127.0.0.1:5433", "sources": ["dns\u{1b}[31m"],
                "present": true, "role": {"role": "down", "detail": "x"}, "last_error": "HTTP 500: \u{1b}]0;pwned\u{7}\u{1b}[2J\r\n"}],
            "listeners": [{"name": "l\u{1b}[1m", "addresses": ["127.0.0.1:1"], "serves": "leader"}]
        });
        let status = serde_json::from_value(status).expect("a /status document");
        let text = render_status(&status, 0);
        assert!(
            !text.chars().any(|c| c.is_control() && c != '\n'),
            "{text:?}"
        );
        assert_eq!(text.lines().count(), 4, "one line per row: {text}");
        assert!(
            text.contains("HTTP 500: \\u{1b}]0;pwned\\u{7}\\u{1b}[2J\\u{d}\\u{a}"),
            "{text}"
        );
    }

    #[test]
    fn ages_read_in_units_people_use() {
        for (ms, text) in [
            (400, "0.4s ago"),
            (42_000, "42s ago"),
            (180_000, "3 min ago"),
            (7_200_000, "2 h ago"),
            (5 * 86_400_000, "5 days ago"),
        ] {
            assert_eq!(ago(10 * 86_400_000, 10 * 86_400_000 - ms), text);
        }
    }
}
