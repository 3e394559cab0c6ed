//! cargo-fuzz target; the property checks are in `belfry_node::fuzzing::websocket_frames`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| belfry_node::fuzzing::websocket_frames(data));
