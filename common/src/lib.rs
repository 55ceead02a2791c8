//! What the proxy (`roleproxy`) and its role agent (`roleproxy-agent`) share, so that neither
//! depends on the other:
//!
//! - [`httpd`]: the HTTP/1 server under the proxy's admin port and the agent, bounded against
//!   idle and slow clients and against request heads of any size.
//! - [`ratelimit`]: repeated warnings, one line per key every 10 s with the count left out,
//!   and the metric that counts those left out.
//! - [`error_chain`] and [`Secret`]: how errors and passwords reach a log line or an answer.

pub mod httpd;
pub mod ratelimit;

use serde::{Deserialize, Serialize, Serializer};

/// An error and all its sources on one line. Libraries such as tokio-postgres keep the useful
/// part ("connection refused", the server's FATAL message) in the source, not in `Display`.
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// A password: kept out of `Debug` output, logs and `roleproxy check`.
#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl Secret {
    /// Whether there is no password; serde's `skip_serializing_if` asks it too.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.is_empty() { "\"\"" } else { "(hidden)" })
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.is_empty() { "" } else { "(hidden)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_shows_only_whether_it_is_set() {
        assert_eq!(format!("{:?}", Secret("hunter2".to_owned())), "(hidden)");
        assert_eq!(format!("{:?}", Secret::default()), "\"\"");
    }

    #[test]
    fn the_chain_names_every_source() {
        let error = Wrapped(std::io::Error::other("connection refused"));
        assert_eq!(error_chain(&error), "wrapped: connection refused");
    }

    #[derive(Debug)]
    struct Wrapped(std::io::Error);

    impl std::fmt::Display for Wrapped {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("wrapped")
        }
    }

    impl std::error::Error for Wrapped {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
}
