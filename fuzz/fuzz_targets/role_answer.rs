//! `check::role_from_answer` on an arbitrary status, body and leader words.
//!
//! Input layout: two bytes of HTTP status, then the body. The leader words are the defaults.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roleproxy::check::role_from_answer;
use roleproxy_core::route::Role;

fuzz_target!(|data: &[u8]| {
    let Some((status, body)) = data.split_first_chunk::<2>() else {
        return;
    };
    let status = u16::from_be_bytes(*status);
    let leader = ["leader".to_string(), "primary".to_string()];
    let role = role_from_answer(status, body, &leader);
    let ok = (200..=299).contains(&status);
    let word = String::from_utf8_lossy(body).trim().to_ascii_lowercase();
    match role {
        Role::Leader => assert!(ok && leader.contains(&word)),
        Role::Maintenance => assert_eq!(status, 404),
        Role::Replica => assert!(ok && word == "replica"),
        Role::Other(detail) => assert!(ok && detail.chars().count() <= 67),
        Role::Down(detail) => {
            assert!(!ok || word.is_empty());
            assert!(detail.chars().count() <= 220);
        }
        Role::Unknown => panic!("a check answer is never Unknown"),
    }
});
