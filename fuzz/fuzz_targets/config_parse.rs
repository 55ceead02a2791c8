//! `Config::parse` on arbitrary text: an error or a config, never a panic.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roleproxy::Config;

/// The variables of a Fly node, plus an empty one for the `${VAR:-default}` paths.
fn env(name: &str) -> Option<String> {
    match name {
        "PRIMARY_REGION" => Some("iad".into()),
        "FLY_APP_NAME" => Some("app".into()),
        "PG_LISTEN_ADDRESS" => Some("fdaa::7".into()),
        "EMPTY" => Some(String::new()),
        _ => None,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::parse(text, &env) {
        Ok(config) => {
            assert!(!config.listen.addresses.is_empty());
            assert!(!config.check.leader.is_empty());
            assert!(config.check.rise >= 1 && config.check.fall >= 1);
            let _ = config.cluster_name();
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
});
