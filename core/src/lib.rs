//! roleproxy's core: the routing rules and the Postgres wire, with no I/O and no runtime.
//!
//! Everything here is a pure function of its arguments, so it is read, tested and
//! mutation-tested on its own; the proxy crate does the sockets, the clock and the tasks.
//!
//! - [`route`]: **the routing rules** ([`route::decide_with`]) and their vocabulary: roles,
//!   each backend's evidence, the route, a session's fate. Start reading here.
//! - [`pgwire`]: the Postgres messages the proxy reads or answers itself: a client's first
//!   packet, a FATAL ErrorResponse, a liveness probe's startup and its answer.
//! - [`framing`]: where a session stands in the Postgres protocol (between transactions or
//!   not), followed from the bytes both sides send.
//! - [`printable`]: text from the network made safe for a log line or a terminal.

pub mod framing;
#[cfg(any(test, fuzzing))]
pub mod framing_model;
pub mod pgwire;
pub mod route;

/// Text from the network with its control characters written out (`\u{1b}`), so an error body
/// cannot move a terminal's cursor, clear its screen or set its title, nor reorder a line with
/// bidirectional overrides.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let unsafe_char = |c: char| {
        // C0, DEL and C1; then the bidirectional embeddings, overrides and isolates.
        c.is_control() || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(unsafe_char) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut out = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if unsafe_char(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_written_out() {
        assert_eq!(printable("HTTP 500: plain"), "HTTP 500: plain");
        assert_eq!(
            printable("a\u{1b}]0;title\u{7}b\u{7f}c\u{9b}2Jd\u{202e}e\nf"),
            "a\\u{1b}]0;title\\u{7}b\\u{7f}c\\u{9b}2Jd\\u{202e}e\\u{a}f"
        );
    }
}
