//! The slice of Pusher protocol 7 a load generator needs: building subscribe
//! frames (with locally signed private/presence auth), the signed HTTP API
//! query string, and recognising server frames without a JSON parser.
//!
//! Recognition is a byte scan, not a parse: a client receiving a million
//! events a second only needs the event name and, for benchmark events, the
//! `seq` and `t` numbers inside the data string. Anything unexpected is
//! classified as `Other` rather than rejected; correctness of the server's
//! JSON is the test suite's job, not the generator's.

use hmac::{KeyInit, Mac};
use md5::{Digest, Md5};
use sha2::Sha256;

use crate::ws::find;

/// Event name the generator publishes; the data is `{"seq":N,"t":unix_nanos}`.
pub const BENCH_EVENT: &str = "bench-event";

/// App credentials, as the server is configured.
#[derive(Debug, Clone)]
pub struct App {
    pub id: String,
    pub key: String,
    pub secret: String,
}

impl App {
    fn hmac_hex(&self, message: &str) -> String {
        // HMAC accepts keys of any length, so this cannot fail.
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(self.secret.as_bytes())
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(message.as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// `auth` for a private channel: `key:hex(HMAC(secret, "socket_id:channel"))`.
    pub fn private_auth(&self, socket_id: &str, channel: &str) -> String {
        format!(
            "{}:{}",
            self.key,
            self.hmac_hex(&format!("{socket_id}:{channel}"))
        )
    }

    /// `auth` for a presence channel, signed over the exact `channel_data` string.
    pub fn presence_auth(&self, socket_id: &str, channel: &str, channel_data: &str) -> String {
        let sig = self.hmac_hex(&format!("{socket_id}:{channel}:{channel_data}"));
        format!("{}:{sig}", self.key)
    }

    /// Query string for a signed API request (`auth_signature` last).
    /// `path` is the API path without any server prefix, e.g. `/apps/x/events`.
    pub fn signed_query(&self, method: &str, path: &str, body: &[u8], timestamp: u64) -> String {
        let body_md5 = hex::encode(Md5::digest(body));
        // Already in sorted key order, as the signature requires.
        let query = format!(
            "auth_key={}&auth_timestamp={timestamp}&auth_version=1.0&body_md5={body_md5}",
            self.key
        );
        let signature = self.hmac_hex(&format!("{method}\n{path}\n{query}"));
        format!("{query}&auth_signature={signature}")
    }
}

/// How a connection authorises its subscription.
#[derive(Debug, Clone)]
pub enum Auth {
    Public,
    Private,
    /// Presence with this user; `t` (send time) goes into user_info so
    /// observers can time `member_added`.
    Presence {
        user_id: String,
    },
}

/// Builds the text of a `pusher:subscribe` frame.
pub fn subscribe_frame(app: &App, socket_id: &str, channel: &str, auth: &Auth) -> String {
    let data = match auth {
        Auth::Public => serde_json::json!({ "channel": channel }),
        Auth::Private => serde_json::json!({
            "channel": channel,
            "auth": app.private_auth(socket_id, channel),
        }),
        Auth::Presence { user_id } => {
            let channel_data = serde_json::json!({
                "user_id": user_id,
                "user_info": { "t": unix_nanos() },
            })
            .to_string();
            serde_json::json!({
                "channel": channel,
                "auth": app.presence_auth(socket_id, channel, &channel_data),
                "channel_data": channel_data,
            })
        }
    };
    serde_json::json!({ "event": "pusher:subscribe", "data": data }).to_string()
}

pub fn unsubscribe_frame(channel: &str) -> String {
    serde_json::json!({ "event": "pusher:unsubscribe", "data": { "channel": channel } }).to_string()
}

pub const PONG_FRAME: &[u8] = br#"{"event":"pusher:pong","data":"{}"}"#;

/// The data string of one benchmark event: `{"seq":N,"t":unix_nanos}`
/// (plus `"pad"` to reach `--payload-bytes`).
pub fn event_data(seq: u64, t_nanos: u64, pad: &str) -> String {
    if pad.is_empty() {
        format!(r#"{{"seq":{seq},"t":{t_nanos}}}"#)
    } else {
        format!(r#"{{"seq":{seq},"t":{t_nanos},"pad":"{pad}"}}"#)
    }
}

/// The HTTP API body publishing `data` (a string) as `BENCH_EVENT` on `channel`.
pub fn event_body(channel: &str, data: &str) -> String {
    serde_json::json!({ "name": BENCH_EVENT, "channel": channel, "data": data }).to_string()
}

/// What a server frame is, as far as the generator cares.
#[derive(Debug, PartialEq, Eq)]
pub enum Incoming<'a> {
    Bench { seq: u64, t: u64 },
    ConnectionEstablished { socket_id: &'a str },
    SubscriptionSucceeded,
    MemberAdded { t: Option<u64> },
    MemberRemoved,
    Ping,
    Error { code: Option<u64> },
    Other,
}

/// Classifies a server text frame by its event name.
pub fn classify(frame: &[u8]) -> Incoming<'_> {
    let Some(event) = event_name(frame) else {
        return Incoming::Other;
    };
    match event {
        b"bench-event" => match (number_after(frame, b"\"seq"), number_after(frame, b"\"t")) {
            (Some(seq), Some(t)) => Incoming::Bench { seq, t },
            _ => Incoming::Other,
        },
        b"pusher:connection_established" => match socket_id(frame) {
            Some(socket_id) => Incoming::ConnectionEstablished { socket_id },
            None => Incoming::Other,
        },
        b"pusher_internal:subscription_succeeded" => Incoming::SubscriptionSucceeded,
        b"pusher_internal:member_added" => Incoming::MemberAdded {
            t: number_after(frame, b"\"t"),
        },
        b"pusher_internal:member_removed" => Incoming::MemberRemoved,
        b"pusher:ping" => Incoming::Ping,
        b"pusher:error" | b"pusher:subscription_error" => Incoming::Error {
            code: number_after(frame, b"\"code"),
        },
        _ => Incoming::Other,
    }
}

fn event_name(frame: &[u8]) -> Option<&[u8]> {
    const KEY: &[u8] = b"\"event\":\"";
    // Servers (Reverb, Belfry) put `event` first; fall back to a search.
    let start = if frame.starts_with(b"{\"event\":\"") {
        1 + KEY.len()
    } else {
        find(frame, KEY)? + KEY.len()
    };
    let len = frame[start..].iter().position(|&b| b == b'"')?;
    Some(&frame[start..start + len])
}

/// The first unsigned integer that is the value of JSON key `key` (given with
/// its opening quote, e.g. `"seq`). Matches both `"seq":5` and the escaped
/// `\"seq\":5` inside a JSON-encoded data string.
pub fn number_after(hay: &[u8], key: &[u8]) -> Option<u64> {
    let mut from = 0;
    while let Some(pos) = find(&hay[from..], key) {
        from += pos + 1;
        let rest = &hay[from - 1 + key.len()..];
        let rest = rest.strip_prefix(b"\\").unwrap_or(rest);
        let Some(rest) = rest.strip_prefix(b"\"") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = rest.trim_ascii_start();
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits > 0 && digits <= 20 {
            let mut n: u64 = 0;
            for &d in &rest[..digits] {
                n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
            }
            return Some(n);
        }
    }
    None
}

fn socket_id(frame: &[u8]) -> Option<&str> {
    let pos = find(frame, b"socket_id")? + b"socket_id".len();
    let mut i = pos;
    let limit = (i + 6).min(frame.len());
    while i < limit && matches!(frame[i], b'"' | b'\\' | b':' | b' ') {
        i += 1;
    }
    let len = frame[i..]
        .iter()
        .take_while(|b| b.is_ascii_digit() || **b == b'.')
        .count();
    std::str::from_utf8(&frame[i..i + len])
        .ok()
        .filter(|s| !s.is_empty())
}

/// Wall-clock time in nanoseconds since the Unix epoch. Latency is measured
/// between two processes on the same host, so the wall clock is shared.
pub fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            id: "3".into(),
            key: "278d425bdf160c739803".into(),
            secret: "7ad3773142a6692b25b8".into(),
        }
    }

    #[test]
    fn private_auth_matches_pusher_docs_example() {
        // Example from Pusher's "auth signatures" documentation.
        let auth = app().private_auth("1234.1234", "private-foobar");
        assert_eq!(
            auth,
            "278d425bdf160c739803:58df8b0c36d6982b82c3ecf6b4662e34fe8c25bba48f5369f135bf843651c3a4"
        );
    }

    #[test]
    fn presence_auth_matches_pusher_docs_example() {
        let data = r#"{"user_id":10,"user_info":{"name":"Mr. Channels"}}"#;
        let auth = app().presence_auth("1234.1234", "presence-foobar", data);
        assert_eq!(
            auth,
            "278d425bdf160c739803:31935e7d86dba64c2a90aed31fdc61869f9b22ba9d8863bba239c03ca481bc80"
        );
    }

    #[test]
    fn api_signature_matches_pusher_docs_example() {
        // Pusher's REST API documentation example, body md5 included.
        let body = br#"{"name":"foo","channels":["project-3"],"data":"{\"some\":\"data\"}"}"#;
        let q = app().signed_query("POST", "/apps/3/events", body, 1353088179);
        assert_eq!(
            q,
            "auth_key=278d425bdf160c739803&auth_timestamp=1353088179&auth_version=1.0\
             &body_md5=ec365a775a4cd0599faeb73354201b6f\
             &auth_signature=da454824c97ba181a32ccc17a72625ba02771f50b50e1e7430e47a1f3f457e6c"
        );
    }

    #[test]
    fn classifies_benchmark_events_with_escaped_data() {
        let frame = br#"{"event":"bench-event","data":"{\"seq\":42,\"t\":1700000000123456789}","channel":"c"}"#;
        assert_eq!(
            classify(frame),
            Incoming::Bench {
                seq: 42,
                t: 1700000000123456789
            }
        );
        let padded = br#"{"channel":"t1","event":"bench-event","data":"{\"seq\":7,\"t\":99,\"pad\":\"xx\"}"}"#;
        assert_eq!(classify(padded), Incoming::Bench { seq: 7, t: 99 });
    }

    #[test]
    fn classifies_protocol_frames() {
        let est = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"123.456\",\"activity_timeout\":30}"}"#;
        assert_eq!(
            classify(est),
            Incoming::ConnectionEstablished {
                socket_id: "123.456"
            }
        );
        let ok = br#"{"event":"pusher_internal:subscription_succeeded","data":"{}","channel":"x"}"#;
        assert_eq!(classify(ok), Incoming::SubscriptionSucceeded);
        let added = br#"{"event":"pusher_internal:member_added","data":"{\"user_id\":\"u1\",\"user_info\":{\"t\":55}}","channel":"presence-x"}"#;
        assert_eq!(classify(added), Incoming::MemberAdded { t: Some(55) });
        let err = br#"{"event":"pusher:error","data":{"code":4001,"message":"no"}}"#;
        assert_eq!(classify(err), Incoming::Error { code: Some(4001) });
        assert_eq!(
            classify(br#"{"event":"pusher:ping","data":"{}"}"#),
            Incoming::Ping
        );
        assert_eq!(classify(b"not json"), Incoming::Other);
    }

    #[test]
    fn number_after_skips_lookalike_keys() {
        assert_eq!(number_after(br#"{"type":"a","t":12}"#, b"\"t"), Some(12));
        assert_eq!(number_after(br#"{"type":"a"}"#, b"\"t"), None);
        assert_eq!(number_after(br#"{"t1":5,"t" : 6}"#, b"\"t"), Some(6));
    }

    #[test]
    fn event_body_nests_data_as_string() {
        let body = event_body("chan", &event_data(3, 44, ""));
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["name"], BENCH_EVENT);
        assert_eq!(v["channel"], "chan");
        assert_eq!(v["data"], r#"{"seq":3,"t":44}"#);
    }

    #[test]
    fn presence_subscribe_frame_signs_channel_data() {
        let a = app();
        let frame = subscribe_frame(
            &a,
            "1.2",
            "presence-x",
            &Auth::Presence {
                user_id: "u1".into(),
            },
        );
        let v: serde_json::Value = serde_json::from_str(&frame).unwrap();
        let data = &v["data"];
        let cd = data["channel_data"].as_str().unwrap();
        assert_eq!(
            data["auth"].as_str().unwrap(),
            a.presence_auth("1.2", "presence-x", cd)
        );
    }
}
