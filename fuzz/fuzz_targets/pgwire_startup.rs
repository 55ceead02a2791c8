//! The startup-phase wire parsing on arbitrary bytes: `parse_startup` on the bytes as one packet
//! body, and `read_startup` on the bytes as everything a client sent before closing.

#![no_main]

use libfuzzer_sys::fuzz_target;
use roleproxy::pgwire_io::read_startup;
use roleproxy_core::pgwire::{check_length, parse_startup, StartupPacket};

fuzz_target!(|data: &[u8]| {
    match parse_startup(data) {
        Ok(StartupPacket::SslRequest | StartupPacket::GssEncRequest) => assert_eq!(data.len(), 4),
        Ok(StartupPacket::Cancel { .. }) => assert_eq!(data.len(), 12),
        Ok(StartupPacket::Startup { .. }) => assert_eq!(data.last(), Some(&0)),
        Err(_) => {}
    }
    if let Some(len) = data.first_chunk::<4>() {
        let len = u32::from_be_bytes(*len);
        if let Ok(body) = check_length(len) {
            assert_eq!(body + 4, len as usize);
        }
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let mut stream = tokio::io::join(data, Vec::new());
    let result = runtime.block_on(read_startup(&mut stream));
    let (rest, written) = stream.into_inner();
    // Only `N`s are ever written, at most three, and nothing is read that was not sent.
    assert!(written.len() <= 3 && written.iter().all(|b| *b == b'N'));
    assert!(rest.len() <= data.len());
    if result.is_ok() {
        // A packet was read whole: at least one length and a four-byte code.
        assert!(data.len() - rest.len() >= 8);
    }
});
