//! Frames on the wire: parsing what a client sends, and encoding what the
//! server sends. Outgoing frames are built once as bytes and shared by every
//! recipient, so encoding writes JSON by hand in the key order Reverb uses
//! (event, data, channel) without an intermediate value tree.

use serde::Deserialize;
use serde_json::value::RawValue;
use tokio_tungstenite::tungstenite::Utf8Bytes;

/// A frame as a client sent it.
#[derive(Debug, Deserialize)]
struct RawFrame<'a> {
    event: String,
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    channel: Option<String>,
}

/// What a client asked for, with the fields each event needs.
#[derive(Debug, PartialEq)]
pub enum ClientMessage {
    Ping,
    Pong,
    Subscribe {
        channel: String,
        auth: Option<String>,
        channel_data: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Signin {
        auth: String,
        user_data: String,
    },
    ClientEvent {
        event: String,
        channel: String,
        /// The data as recipients will see it (a string, see `data_string`).
        data: String,
    },
    /// An event name the server does not handle; answered with an error.
    Unknown(String),
}

#[derive(Debug, PartialEq, thiserror::Error)]
pub enum FrameError {
    #[error("frame is not a JSON object with an \"event\" string: {0}")]
    NotJson(String),
    #[error("{event}: {problem}")]
    BadData { event: String, problem: String },
}

#[derive(Deserialize)]
struct SubscribeData {
    channel: String,
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    channel_data: Option<String>,
}

#[derive(Deserialize)]
struct UnsubscribeData {
    channel: String,
}

#[derive(Deserialize)]
struct SigninData {
    auth: String,
    user_data: String,
}

/// pusher-js sends `data` as an object; some clients send it as a JSON
/// string holding the object. Accept both.
fn parse_data<T: for<'de> Deserialize<'de>>(
    event: &str,
    data: Option<&RawValue>,
) -> Result<T, FrameError> {
    let bad = |problem: String| FrameError::BadData {
        event: event.to_owned(),
        problem,
    };
    let raw = data.ok_or_else(|| bad("missing data".into()))?;
    let text = raw.get();
    if text.starts_with('"') {
        let inner: String = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        serde_json::from_str(&inner).map_err(|e| bad(e.to_string()))
    } else {
        serde_json::from_str(text).map_err(|e| bad(e.to_string()))
    }
}

/// A client event's data as a string: a JSON string is taken as is, any
/// other JSON value as its text. pusher-js parses string data back into
/// JSON, so recipients see what the sender sent either way.
pub fn data_string(data: Option<&RawValue>) -> String {
    match data {
        None => String::new(),
        Some(raw) if raw.get().starts_with('"') => {
            serde_json::from_str::<String>(raw.get()).unwrap_or_default()
        }
        Some(raw) => raw.get().to_owned(),
    }
}

pub fn parse(text: &str) -> Result<ClientMessage, FrameError> {
    let frame: RawFrame =
        serde_json::from_str(text).map_err(|e| FrameError::NotJson(e.to_string()))?;
    let event = frame.event.as_str();
    Ok(match event {
        "pusher:ping" => ClientMessage::Ping,
        "pusher:pong" => ClientMessage::Pong,
        "pusher:subscribe" => {
            let d: SubscribeData = parse_data(event, frame.data)?;
            ClientMessage::Subscribe {
                channel: d.channel,
                auth: d.auth,
                channel_data: d.channel_data,
            }
        }
        "pusher:unsubscribe" => {
            let d: UnsubscribeData = parse_data(event, frame.data)?;
            ClientMessage::Unsubscribe { channel: d.channel }
        }
        "pusher:signin" => {
            let d: SigninData = parse_data(event, frame.data)?;
            ClientMessage::Signin {
                auth: d.auth,
                user_data: d.user_data,
            }
        }
        _ if event.starts_with("client-") => {
            let channel = frame.channel.ok_or_else(|| FrameError::BadData {
                event: frame.event.clone(),
                problem: "client events need a channel".into(),
            })?;
            ClientMessage::ClientEvent {
                data: data_string(frame.data),
                event: frame.event,
                channel,
            }
        }
        _ => ClientMessage::Unknown(frame.event),
    })
}

/// Whether `s` is the JSON text of a number or a string, safe to embed as is.
fn is_json_id(s: &str) -> bool {
    matches!(
        serde_json::from_str::<serde_json::Value>(s),
        Ok(serde_json::Value::Number(_) | serde_json::Value::String(_))
    )
}

/// Encodes frames. Every function returns ready-to-send bytes.
pub struct Encode;

fn push_str(buf: &mut Vec<u8>, s: &str) {
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *buf, s);
}

fn finish(buf: Vec<u8>) -> Utf8Bytes {
    // Only JSON text went in, and JSON text is UTF-8.
    Utf8Bytes::from(String::from_utf8(buf).unwrap_or_default())
}

impl Encode {
    /// `{"event":E,"data":"<data>","channel":C}` with data as a JSON string.
    pub fn event(event: &str, channel: Option<&str>, data: &str) -> Utf8Bytes {
        Self::event_with_user(event, channel, data, None)
    }

    /// A client event on a presence channel carries the sender's `user_id`.
    pub fn event_with_user(
        event: &str,
        channel: Option<&str>,
        data: &str,
        user_id: Option<&str>,
    ) -> Utf8Bytes {
        let mut buf =
            Vec::with_capacity(48 + event.len() + data.len() + channel.map_or(0, str::len));
        buf.extend_from_slice(b"{\"event\":");
        push_str(&mut buf, event);
        buf.extend_from_slice(b",\"data\":");
        push_str(&mut buf, data);
        if let Some(channel) = channel {
            buf.extend_from_slice(b",\"channel\":");
            push_str(&mut buf, channel);
        }
        if let Some(user_id) = user_id {
            buf.extend_from_slice(b",\"user_id\":");
            if is_json_id(user_id) {
                buf.extend_from_slice(user_id.as_bytes());
            } else {
                // An external publisher sent a bare id: make it a JSON string.
                push_str(&mut buf, user_id);
            }
        }
        buf.push(b'}');
        finish(buf)
    }

    /// Like `event`, but `data` is raw JSON placed as is (an object).
    fn event_object(event: &str, channel: Option<&str>, data_json: &str) -> Utf8Bytes {
        let mut buf = Vec::with_capacity(48 + event.len() + data_json.len());
        buf.extend_from_slice(b"{\"event\":");
        push_str(&mut buf, event);
        buf.extend_from_slice(b",\"data\":");
        buf.extend_from_slice(data_json.as_bytes());
        if let Some(channel) = channel {
            buf.extend_from_slice(b",\"channel\":");
            push_str(&mut buf, channel);
        }
        buf.push(b'}');
        finish(buf)
    }

    pub fn connection_established(socket_id: &str, activity_timeout: u64) -> Utf8Bytes {
        let data =
            format!("{{\"socket_id\":\"{socket_id}\",\"activity_timeout\":{activity_timeout}}}");
        Self::event("pusher:connection_established", None, &data)
    }

    /// `pusher:error` with data as an object, as Pusher sends it.
    pub fn error(code: Option<u16>, message: &str) -> Utf8Bytes {
        let code = code.map_or("null".to_owned(), |c| c.to_string());
        let mut data = format!("{{\"code\":{code},\"message\":");
        let mut msg = Vec::new();
        push_str(&mut msg, message);
        data.push_str(&String::from_utf8_lossy(&msg));
        data.push('}');
        Self::event_object("pusher:error", None, &data)
    }

    /// `pusher:subscription_error`: the reference's code and message, and the
    /// type, error and status fields pusher-js's own auth errors carry.
    pub fn subscription_error(channel: &str, code: u16, message: &str, status: u16) -> Utf8Bytes {
        let mut msg = Vec::new();
        push_str(&mut msg, message);
        let msg = String::from_utf8_lossy(&msg);
        let data = format!(
            "{{\"code\":{code},\"message\":{msg},\"type\":\"AuthError\",\"error\":{msg},\"status\":{status}}}"
        );
        Self::event_object("pusher:subscription_error", Some(channel), &data)
    }

    pub fn pong() -> Utf8Bytes {
        Utf8Bytes::from_static("{\"event\":\"pusher:pong\",\"data\":\"{}\"}")
    }

    pub fn ping() -> Utf8Bytes {
        Utf8Bytes::from_static("{\"event\":\"pusher:ping\",\"data\":\"{}\"}")
    }

    pub fn subscription_succeeded(channel: &str) -> Utf8Bytes {
        Self::event(
            "pusher_internal:subscription_succeeded",
            Some(channel),
            "{}",
        )
    }

    /// Presence: `{"presence":{"count":N,"ids":[..],"hash":{id:info}}}` as a string.
    pub fn presence_succeeded<'a>(
        channel: &str,
        members: impl Iterator<Item = (&'a str, &'a str, Option<&'a str>)>,
    ) -> Utf8Bytes {
        // (user_id string form, user_id JSON, user_info JSON)
        let mut ids = String::from("[");
        let mut hash = String::from("{");
        let mut count = 0usize;
        for (id, id_json, info) in members {
            if count > 0 {
                ids.push(',');
                hash.push(',');
            }
            count += 1;
            ids.push_str(id_json);
            let mut key = Vec::new();
            push_str(&mut key, id);
            hash.push_str(&String::from_utf8_lossy(&key));
            hash.push(':');
            hash.push_str(info.unwrap_or("null"));
        }
        ids.push(']');
        hash.push('}');
        let data = format!("{{\"presence\":{{\"count\":{count},\"ids\":{ids},\"hash\":{hash}}}}}");
        Self::event(
            "pusher_internal:subscription_succeeded",
            Some(channel),
            &data,
        )
    }

    pub fn cache_miss(channel: &str) -> Utf8Bytes {
        Self::event("pusher:cache_miss", Some(channel), "{}")
    }

    /// `pusher_internal:watchlist_events` for one change, `name` being
    /// "online" or "offline".
    pub fn watchlist_event(name: &str, user_ids: &[String]) -> Utf8Bytes {
        let data = serde_json::json!({ "events": [{ "name": name, "user_ids": user_ids }] });
        Self::event("pusher_internal:watchlist_events", None, &data.to_string())
    }

    pub fn signin_success(user_data: &str) -> Utf8Bytes {
        let mut json = Vec::new();
        push_str(&mut json, user_data);
        let data = format!("{{\"user_data\":{}}}", String::from_utf8_lossy(&json));
        Self::event("pusher:signin_success", None, &data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_accepts_object_or_string_data() {
        let want = ClientMessage::Subscribe {
            channel: "private-a".into(),
            auth: Some("k:s".into()),
            channel_data: None,
        };
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":{"channel":"private-a","auth":"k:s"}}"#)
                .unwrap(),
            want
        );
        assert_eq!(
            parse(r#"{"event":"pusher:subscribe","data":"{\"channel\":\"private-a\",\"auth\":\"k:s\"}"}"#).unwrap(),
            want
        );
    }

    #[test]
    fn malformed_frames_are_errors_not_panics() {
        for bad in [
            "",
            "nope",
            "[]",
            "{}",
            r#"{"event":5}"#,
            r#"{"event":"pusher:subscribe"}"#,
            r#"{"event":"pusher:subscribe","data":{"channel":7}}"#,
            r#"{"event":"client-x","data":{}}"#,
            r#"{"event":"pusher:signin","data":"not json"}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse(r#"{"event":"pusher:nope"}"#).unwrap(),
            ClientMessage::Unknown("pusher:nope".into())
        );
    }

    #[test]
    fn client_event_data_is_kept_as_sent() {
        let m =
            parse(r#"{"event":"client-typing","channel":"private-a","data":{"x":"y"}}"#).unwrap();
        assert_eq!(
            m,
            ClientMessage::ClientEvent {
                event: "client-typing".into(),
                channel: "private-a".into(),
                data: r#"{"x":"y"}"#.into()
            }
        );
        let m = parse(r#"{"event":"client-a","channel":"private-a","data":"plain"}"#).unwrap();
        assert!(matches!(m, ClientMessage::ClientEvent { data, .. } if data == "plain"));
    }

    #[test]
    fn frames_are_encoded_as_reverb_does() {
        assert_eq!(
            Encode::event("my-event", Some("orders"), "{\"id\":1}").as_str(),
            r#"{"event":"my-event","data":"{\"id\":1}","channel":"orders"}"#
        );
        assert_eq!(
            Encode::connection_established("1.2", 30).as_str(),
            r#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":30}"}"#
        );
        assert_eq!(
            Encode::error(Some(4001), "Application does not exist").as_str(),
            r#"{"event":"pusher:error","data":{"code":4001,"message":"Application does not exist"}}"#
        );
        assert_eq!(
            Encode::event_with_user("client-a", Some("presence-r"), "x", Some("7")).as_str(),
            r#"{"event":"client-a","data":"x","channel":"presence-r","user_id":7}"#
        );
        assert_eq!(
            Encode::event_with_user("client-a", Some("presence-r"), "x", Some("\"u\"")).as_str(),
            r#"{"event":"client-a","data":"x","channel":"presence-r","user_id":"u"}"#
        );
        assert_eq!(
            Encode::event_with_user("client-a", Some("presence-r"), "x", Some("bare id")).as_str(),
            r#"{"event":"client-a","data":"x","channel":"presence-r","user_id":"bare id"}"#
        );
    }

    #[test]
    fn presence_success_keeps_id_types() {
        let frame = Encode::presence_succeeded(
            "presence-r",
            [("1", "1", Some(r#"{"name":"a"}"#)), ("b", "\"b\"", None)].into_iter(),
        );
        let v: serde_json::Value = serde_json::from_str(frame.as_str()).unwrap();
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        assert_eq!(data["presence"]["count"], 2);
        assert_eq!(data["presence"]["ids"], serde_json::json!([1, "b"]));
        assert_eq!(data["presence"]["hash"]["1"]["name"], "a");
        assert!(data["presence"]["hash"]["b"].is_null());
    }
}
