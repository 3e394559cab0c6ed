//! cargo-fuzz target; the property checks are in `belfry_node::fuzzing::client_messages`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| belfry_node::fuzzing::client_messages(data));
