//! Fuzz entry points for the parsers a client or an API caller can reach:
//! the WebSocket frame decoder, the Pusher client messages (through the
//! sans-IO session, so channel names, auth and `channel_data` are parsed as a
//! connection parses them), and the HTTP API's query and signature checks.
//!
//! They live in the crate, not in `fuzz/`, so that `cargo test` replays every
//! corpus in `fuzz/corpus/<target>` on the stable toolchain, and the cargo-fuzz
//! targets are one-line wrappers. Each entry point checks properties beyond
//! "no panic": a stream decodes the same however it is chunked, what the
//! decoder holds stays within its bound, every frame the session sends back is
//! JSON with an `event`, and a request signed as the SDKs sign it verifies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use md5::{Digest, Md5};

use crate::api::signature;
use crate::config::{AppConfig, ClientEvents};
use crate::protocol::frame::{self, ClientMessage};
use crate::protocol::session::{Action, Cache, JoinOutcome, PresenceJoin, Session};
use crate::protocol::{auth, SocketId};
use crate::websocket::{Decoder, Incoming, Violation};

/// Where a decode stopped: a close frame or a violation ends the stream.
#[derive(Debug, PartialEq)]
enum End {
    Open,
    Closed,
    Violated(u16),
}

fn decode_stream<'a>(chunks: impl Iterator<Item = &'a [u8]>, max: usize) -> (Vec<Incoming>, End) {
    let mut decoder = Decoder::default();
    let mut out = Vec::new();
    for chunk in chunks {
        if let Err(v) = decoder.feed(chunk, max, &mut out) {
            return (out, End::Violated(Violation::code(&v)));
        }
        // A frame's header is at most 14 bytes, and a message is refused
        // before it passes `max`, so this is all a client can make us hold.
        assert!(
            decoder.held_bytes() <= 2 * (max + 14),
            "decoder holds {} bytes with max {max}",
            decoder.held_bytes()
        );
        if out.last() == Some(&Incoming::Close) {
            return (out, End::Closed);
        }
    }
    (out, End::Open)
}

/// Input: a limit byte, then segments `[len][bytes]`, each segment one read
/// from the socket. The same bytes fed in one read must decode to the same
/// messages and the same outcome.
pub fn websocket_frames(data: &[u8]) {
    let Some((&limit, mut rest)) = data.split_first() else {
        return;
    };
    let max = 1 + limit as usize * 64;
    let mut chunks = Vec::new();
    while let Some((&len, tail)) = rest.split_first() {
        let n = (len as usize).min(tail.len());
        chunks.push(&tail[..n]);
        rest = &tail[n..];
    }
    let whole: Vec<u8> = chunks.concat();
    let split = decode_stream(chunks.iter().copied(), max);
    let single = decode_stream(std::iter::once(whole.as_slice()), max);
    assert_eq!(split, single, "chunking changed what was decoded");
}

fn fuzz_app() -> Arc<AppConfig> {
    Arc::new(AppConfig {
        id: "fuzz".into(),
        key: "fuzz-key".into(),
        secret: "fuzz-secret".into(),
        client_events: ClientEvents::All,
        max_channels_per_connection: 20,
        ..AppConfig::default()
    })
}

/// A subscribe or signin with a valid signature in place of whatever the
/// input carried, so the fuzzer reaches what comes after auth (presence
/// `channel_data`, `user_data`) without forging HMACs.
fn with_valid_auth(message: &ClientMessage, app: &AppConfig, socket_id: &str) -> Option<String> {
    let sign = |text: &str| format!("{}:{}", app.key, auth::sign(&app.secret, text));
    let value = match message {
        ClientMessage::Subscribe {
            channel,
            channel_data,
            ..
        } => {
            let text = auth::channel_message(socket_id, channel, channel_data.as_deref());
            serde_json::json!({"event": "pusher:subscribe", "data": {
                "channel": channel, "auth": sign(&text), "channel_data": channel_data,
            }})
        }
        ClientMessage::Signin { user_data, .. } => {
            let text = auth::signin_message(socket_id, user_data);
            serde_json::json!({"event": "pusher:signin", "data": {
                "auth": sign(&text), "user_data": user_data,
            }})
        }
        _ => return None,
    };
    Some(value.to_string())
}

/// Input: client frames separated by newlines, fed to one session as its
/// connection would feed them. Every frame it sends back must be JSON with
/// an `event` string, whatever the client sent.
pub fn client_messages(data: &[u8]) {
    let app = fuzz_app();
    let socket = SocketId(1234, 5678);
    let socket_id = socket.to_string();
    let start = Instant::now();
    let mut session = Session::new(socket, app.clone(), start);
    for (i, line) in data.split(|&b| b == b'\n').take(64).enumerate() {
        let text = String::from_utf8_lossy(line);
        let now = start + Duration::from_millis(i as u64 * 37);
        let mut inputs = vec![text.to_string()];
        if let Ok(message) = frame::parse(&text) {
            inputs.extend(with_valid_auth(&message, &app, &socket_id));
        }
        for input in inputs {
            for action in session.on_text(&input, now) {
                match action {
                    Action::Send(frame) => assert_readable(&frame),
                    // Every other subscription fails, as a full node would
                    // answer it, so both paths of the session are exercised;
                    // every answer must be a frame a client can read.
                    Action::Subscribe { channel, member } => {
                        let outcome = if i % 2 == 1 {
                            JoinOutcome::Unavailable("fuzzing".into())
                        } else {
                            JoinOutcome::Joined {
                                presence: member.as_ref().map(|m| PresenceJoin {
                                    members: vec![m.clone()],
                                    user_added: true,
                                }),
                                cache: if channel.is_cache() {
                                    Cache::Miss
                                } else {
                                    Cache::None
                                },
                            }
                        };
                        let frames = match session.on_joined(&channel, member, outcome) {
                            Ok(done) => done.first,
                            Err(frame) => vec![frame],
                        };
                        frames.iter().for_each(assert_readable);
                    }
                    _ => {}
                }
            }
        }
    }
}

/// A frame the session sends must be JSON with an `event`, or no client reads it.
fn assert_readable(frame: &tokio_tungstenite::tungstenite::Utf8Bytes) {
    let v: serde_json::Value = serde_json::from_str(frame.as_str())
        .unwrap_or_else(|e| panic!("sent a frame that is not JSON ({e}): {frame}"));
    assert!(
        v["event"].is_string(),
        "sent a frame without an event: {frame}"
    );
}

/// Percent-encodes everything but unreserved characters, as the SDKs do.
fn encode_component(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Input: method, path, query and body separated by NUL bytes. Checks the
/// request as given (it must not panic), then the same request signed the
/// way the Pusher SDKs sign it, which must verify.
pub fn api_signature(data: &[u8]) {
    let mut parts = data.splitn(4, |&b| b == 0);
    let mut next = || String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let (method, path, query) = (next(), next(), next());
    let body = data.splitn(4, |&b| b == 0).nth(3).unwrap_or_default();
    let app = fuzz_app();
    let now = 1_700_000_000;
    let given = signature::query_pairs(&query);
    let _ = signature::verify(&app, &method, &path, &given, body, now);

    // The SDKs sign lower-cased keys sorted, each once; keep the first of
    // any key the input repeats and drop the ones the signer sets.
    let mut params: Vec<(String, String)> = Vec::new();
    for (k, v) in given {
        let k = k.to_lowercase();
        if k.is_empty()
            || k.starts_with("auth_")
            || k == "body_md5"
            || params.iter().any(|(seen, _)| *seen == k)
        {
            continue;
        }
        params.push((k, v));
    }
    params.push(("auth_key".into(), app.key.clone()));
    params.push(("auth_timestamp".into(), now.to_string()));
    params.push(("auth_version".into(), "1.0".into()));
    if !body.is_empty() {
        params.push(("body_md5".into(), hex::encode(Md5::digest(body))));
    }
    params.sort();
    let signed: Vec<String> = params.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let message = format!("{method}\n{path}\n{}", signed.join("&"));
    params.push(("auth_signature".into(), auth::sign(&app.secret, &message)));
    let wire: Vec<String> = params
        .iter()
        .map(|(k, v)| format!("{}={}", encode_component(k), encode_component(v)))
        .collect();
    let decoded = signature::query_pairs(&wire.join("&"));
    if let Err(e) = signature::verify(&app, &method, &path, &decoded, body, now) {
        panic!("a correctly signed request was refused: {e:?} ({wire:?})");
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    /// Feeds every file of `fuzz/corpus/<target>` to `run`. The corpora are
    /// the fuzzers' findings plus hand-written seeds; replaying them here
    /// keeps every input that once mattered passing on stable Rust.
    pub fn replay(target: &str, run: fn(&[u8])) {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("../fuzz/corpus")
            .join(target);
        let entries = std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
        let mut count = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            let data = std::fs::read(&path).unwrap();
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{} failed on {}", target, path.display());
            count += 1;
        }
        assert!(
            count >= 10,
            "{target}: only {count} corpus files in {}",
            dir.display()
        );
    }

    #[test]
    fn websocket_frames_corpus() {
        replay("websocket_frames", super::websocket_frames);
    }

    #[test]
    fn client_messages_corpus() {
        replay("client_messages", super::client_messages);
    }

    #[test]
    fn api_signature_corpus() {
        replay("api_signature", super::api_signature);
    }
}
