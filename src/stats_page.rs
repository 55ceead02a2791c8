//! The stats page at `/`, for people, like HAProxy's `/stats`.

use roleproxy_core::printable;
use roleproxy_core::route::Target;

use crate::status::Status;
use crate::wording::{backend_row, pause_text, when, BACKEND_COLUMNS};

/// How often the stats page reloads itself.
const PAGE_REFRESH_SECS: u32 = 2;

/// The stats page for people, like HAProxy's `/stats`: plain HTML that reloads itself. Pure.
pub fn render_page(status: &Status, now_unix_ms: u64) -> String {
    let state = match status.route.target {
        Target::Leader(_) => "leader",
        Target::Held(..) => "held",
        Target::Contested(_) => "contested",
        Target::None(_) => "none",
    };
    let mut rows = String::new();
    for b in &status.backends {
        let cells: String = backend_row(b, now_unix_ms)
            .iter()
            .map(|cell| format!("<td>{}</td>", escape(cell)))
            .collect();
        rows.push_str(&format!("<tr class=\"{}\">{cells}</tr>\n", b.role.label()));
    }
    let mut listeners = String::new();
    for l in &status.listeners {
        let addresses: Vec<String> = l.addresses.iter().map(ToString::to_string).collect();
        listeners.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td></tr>\n",
            escape(&l.name),
            escape(&addresses.join(", ")),
            escape(&l.serves)
        ));
    }
    let paused = match &status.pause {
        Some(pause) => format!(
            "<p id=\"pause\">{}</p>\n",
            escape(&pause_text(pause, now_unix_ms))
        ),
        None => String::new(),
    };
    let mut changes = String::new();
    for change in status.history.iter().rev() {
        changes.push_str(&format!(
            "<li class=\"{}\"><time>{}</time> <b>{}</b> {}</li>\n",
            change.kind,
            clock(change.unix_ms),
            change.kind,
            escape(&change.text)
        ));
    }
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="refresh" content="{PAGE_REFRESH_SECS}">
<title>roleproxy: {cluster}</title>
<style>
body {{ font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #222; }}
table {{ border-collapse: collapse; }} th, td {{ padding: .3em .8em; border-bottom: 1px solid #ddd; text-align: left; }}
#route {{ font-size: 1.2em; padding: .5em; }} #route.leader {{ background: #dfd; }} #route.held {{ background: #ffd; }} #route.none {{ background: #fdd; }} #pause {{ font-size: 1.2em; padding: .5em; background: #fd9; }}
tr.leader {{ background: #efe; }} tr.down {{ background: #fee; }} time {{ font-family: monospace; color: #666; }}
</style></head>
<body>
<h1>roleproxy <small>{cluster}</small></h1>
<p id="route" class="{state}">Route {route}, for {since}.</p>
{paused}<table id="backends">
<tr>{columns}</tr>
{rows}</table>
<h2>Listeners</h2>
<table id="listeners">
<tr><th>listener</th><th>addresses</th><th>serves</th></tr>
{listeners}</table>
<h2>Recent changes</h2>
<ol id="timeline" reversed>
{changes}</ol>
<p>Reloads every {PAGE_REFRESH_SECS} s. Also: <a href="/status">/status</a> (JSON), <a href="/metrics">/metrics</a>, <a href="/ready">/ready</a>.</p>
</body></html>
"#,
        cluster = escape(&status.cluster),
        columns = BACKEND_COLUMNS.map(|c| format!("<th>{c}</th>")).concat(),
        route = escape(&status.route_text),
        since = when(now_unix_ms, Some(status.route_since_unix_ms)).replace(" ago", ""),
    )
}

/// `HH:MM:SS.mmm UTC` of a Unix time in milliseconds.
fn clock(unix_ms: u64) -> String {
    let day_ms = unix_ms % 86_400_000;
    format!(
        "{:02}:{:02}:{:02}.{:03} UTC",
        day_ms / 3_600_000,
        day_ms / 60_000 % 60,
        day_ms / 1000 % 60,
        day_ms % 1000
    )
}

/// Text made safe to put in HTML: backend errors come from the network.
fn escape(text: &str) -> String {
    let text = printable(text);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BackendStatus, Change, ListenerStatus};
    use roleproxy_core::route::Route;

    #[test]
    fn page_escapes_what_came_from_the_network() {
        let status = Status {
            cluster: "c<1>".into(),
            route: Route::initial(),
            route_text: "generation 0: no route".into(),
            route_since_unix_ms: 0,
            backends: vec![BackendStatus {
                address: "127.0.0.1:5433".parse().unwrap(),
                sources: vec!["backup".into()],
                present: true,
                role: roleproxy_core::route::Role::Down("<script>x</script>".into()),
                last_check_unix_ms: Some(1_000),
                last_check_latency_ms: Some(1.0),
                last_error: Some("<script>x</script>".into()),
                last_error_unix_ms: Some(1_000),
                unconfirmed: None,
                postgres: None,
                data_port: None,
                sessions: 2,
                operator: roleproxy_core::route::Mode::Drain,
            }],
            listeners: vec![ListenerStatus {
                name: "<ro>".into(),
                serves: "replica".into(),
                addresses: vec!["127.0.0.1:5001".parse().unwrap()],
            }],
            history: vec![Change {
                unix_ms: 3_723_004,
                kind: "route".into(),
                text: "generation 1: sessions go to a&b".into(),
            }],
            pause: Some(crate::status::PauseStatus {
                since_unix_ms: 1_000,
                limit_ms: 60_000,
                resumes_at_unix_ms: 61_000,
                held_clients: 3,
            }),
        };
        let page = render_page(&status, 2_000);
        assert!(!page.contains("<script>"), "{page}");
        assert!(page.contains("&lt;script&gt;x&lt;/script&gt;"));
        assert!(page.contains("c&lt;1&gt;"));
        assert!(page.contains("01:02:03.004 UTC"));
        assert!(page.contains("a&amp;b"));
        assert!(page.contains("http-equiv=\"refresh\""));
        assert!(page.contains("&lt;ro&gt;</td><td>127.0.0.1:5001</td><td>replica"));
        assert!(page.contains("drained by the operator"), "{page}");
        assert!(
            page.contains("<p id=\"pause\">PAUSED since 1.0s ago: leader sessions end at their next transaction boundary; 3 new clients held; resumes by itself in 59s"),
            "{page}"
        );
    }
}
