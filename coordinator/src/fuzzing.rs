//! Fuzz entry point for what arrives from Redis: bus envelopes (MessagePack,
//! from any publisher) and Laravel's Redis broadcaster payloads (JSON).
//!
//! It lives in the crate so that `cargo test` replays `fuzz/corpus/envelopes`
//! on stable Rust; the cargo-fuzz target only calls it. Beyond "no panic",
//! whatever decodes must survive a round trip: a node that re-publishes an
//! envelope (the leader's announcements, history replays) sends what it got.

use crate::channel::check_channel_name;
use crate::envelope::Envelope;

/// Input: bytes off a Redis channel, read as an envelope, as a Laravel
/// payload, and as a channel name.
pub fn envelopes(rest: &[u8]) {
    if let Ok(envelope) = Envelope::decode(rest) {
        let again = Envelope::decode(&envelope.encode()).expect("a decoded envelope re-encodes");
        assert_eq!(again, envelope);
    }
    if let Ok(envelope) = Envelope::from_laravel("app", "private-orders.1", rest) {
        let again = Envelope::decode(&envelope.encode()).expect("a Laravel envelope encodes");
        assert_eq!(again, envelope);
        assert!(envelope.socket_id.as_deref() != Some(""));
    }
    let name = String::from_utf8_lossy(rest);
    if check_channel_name(&name).is_ok() {
        assert!(!name.is_empty() && name.len() <= crate::channel::MAX_CHANNEL_NAME);
    }
}

#[cfg(test)]
mod tests {
    /// Every file of `fuzz/corpus/envelopes` (seeds and the fuzzer's
    /// findings) still passes.
    #[test]
    fn envelopes_corpus() {
        let dir =
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/envelopes");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| super::envelopes(&data));
            assert!(outcome.is_ok(), "envelopes failed on {}", path.display());
            count += 1;
        }
        assert!(
            count >= 10,
            "only {count} corpus files in {}",
            dir.display()
        );
    }
}
