//! cargo-fuzz target; the property checks are in `belfry_coordinator::fuzzing::envelopes`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| belfry_coordinator::fuzzing::envelopes(data));
