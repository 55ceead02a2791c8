//! Session framing on arbitrary client and server byte streams, in arbitrary splits: the input
//! is a byte program of what each side sends (`framing_model::events`) and, after its first
//! byte's worth, the cuts. The check never panics, never calls a point inside a message "between
//! transactions", and gives the same answer for every split (`framing_model::check`).

#![no_main]

use libfuzzer_sys::fuzz_target;
use roleproxy_core::framing_model;

fuzz_target!(|data: &[u8]| {
    // The first byte says how much of the rest is the program; what follows it is the cuts.
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let at = (split as usize * rest.len()) / 255;
    let (program, cuts) = rest.split_at(at.min(rest.len()));
    let events = framing_model::events(program);
    if let Err(disagreement) = framing_model::check(&events, cuts) {
        panic!("{disagreement}\nevents: {events:?}\ncuts: {cuts:?}");
    }
});
