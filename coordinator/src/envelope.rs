//! The bus envelope: one message on its way from a publisher to every node
//! that has subscribers for its channel.
//!
//! It is MessagePack (rmp-serde, field names included) so that a publisher in
//! another language can write it from `docs/wire-format.md` alone. `data` is
//! always the event's data *as the client receives it*: a string, which the
//! node writes into the Pusher frame once for all recipients.

use serde::{Deserialize, Serialize};

/// Bumped on any change a reader of version 1 would misread.
pub const ENVELOPE_VERSION: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvelopeKind {
    /// An event for the subscribers of `channel`.
    Event,
    /// Close every connection of `user_id` (the HTTP API's terminate_connections).
    Terminate,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub v: u8,
    pub kind: EnvelopeKind,
    pub app: String,
    #[serde(default)]
    pub channel: String,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub data: String,
    /// Event: the sender's user id on presence client events, as JSON text
    /// (`42` or `"ada"`), so its type reaches clients. Terminate: the plain
    /// id whose connections to close.
    #[serde(default)]
    pub user_id: Option<String>,
    /// The socket that must not receive this event (the publisher's own tab).
    #[serde(default)]
    pub socket_id: Option<String>,
    /// Publish time in microseconds since the Unix epoch, for the lag histogram.
    #[serde(default)]
    pub ts_us: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("envelope is not valid MessagePack for version {ENVELOPE_VERSION}: {0}")]
    Decode(#[from] rmp_serde::decode::Error),
    #[error("envelope version {0} is newer than this node understands ({ENVELOPE_VERSION})")]
    Version(u8),
}

impl Envelope {
    /// `pusher_internal:member_added` for a user who joined a presence
    /// channel. Every announcement of it, a node's or the sweep's, is built
    /// here so clients always see the same payload.
    pub fn member_added(
        app: &str,
        channel: &str,
        user_id_json: &str,
        user_info: Option<&str>,
    ) -> Self {
        let data = format!(
            "{{\"user_id\":{user_id_json},\"user_info\":{}}}",
            user_info.unwrap_or("null")
        );
        Self::event(app, channel, "pusher_internal:member_added", data)
    }

    /// `pusher_internal:member_removed` for a user whose last connection on
    /// a presence channel left.
    pub fn member_removed(app: &str, channel: &str, user_id_json: &str) -> Self {
        let data = format!("{{\"user_id\":{user_id_json}}}");
        Self::event(app, channel, "pusher_internal:member_removed", data)
    }

    pub fn event(app: &str, channel: &str, event: &str, data: String) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            kind: EnvelopeKind::Event,
            app: app.to_owned(),
            channel: channel.to_owned(),
            event: event.to_owned(),
            data,
            user_id: None,
            socket_id: None,
            ts_us: now_us(),
        }
    }

    pub fn terminate(app: &str, user_id: &str) -> Self {
        Self {
            v: ENVELOPE_VERSION,
            kind: EnvelopeKind::Terminate,
            app: app.to_owned(),
            channel: String::new(),
            event: String::new(),
            data: String::new(),
            user_id: Some(user_id.to_owned()),
            socket_id: None,
            ts_us: now_us(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        // Serializing plain strings and integers into a Vec cannot fail.
        rmp_serde::to_vec_named(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, EnvelopeError> {
        let envelope: Envelope = rmp_serde::from_slice(bytes)?;
        if envelope.v > ENVELOPE_VERSION {
            return Err(EnvelopeError::Version(envelope.v));
        }
        Ok(envelope)
    }
}

/// Laravel's Redis broadcaster payload: `{"event", "data", "socket"}`, where
/// `data` is the event's payload as an object (or a string).
#[derive(Deserialize)]
struct LaravelMessage {
    event: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    socket: Option<String>,
}

impl Envelope {
    /// The envelope for what Laravel's Redis broadcaster PUBLISHed on
    /// `channel` (the Pusher channel name, prefix already stripped).
    pub fn from_laravel(
        app: &str,
        channel: &str,
        payload: &[u8],
    ) -> Result<Self, serde_json::Error> {
        let message: LaravelMessage = serde_json::from_slice(payload)?;
        let data = match message.data {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let mut envelope = Envelope::event(app, channel, &message.event, data);
        envelope.socket_id = message.socket.filter(|s| !s.is_empty());
        Ok(envelope)
    }
}

pub fn now_us() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_events_carry_pushers_payload() {
        let added = Envelope::member_added("a", "presence-r", "\"7\"", Some("{\"n\":1}"));
        assert_eq!(added.event, "pusher_internal:member_added");
        assert_eq!(added.data, r#"{"user_id":"7","user_info":{"n":1}}"#);
        let bare = Envelope::member_added("a", "presence-r", "7", None);
        assert_eq!(bare.data, r#"{"user_id":7,"user_info":null}"#);
        let removed = Envelope::member_removed("a", "presence-r", "\"7\"");
        assert_eq!(removed.event, "pusher_internal:member_removed");
        assert_eq!(removed.data, r#"{"user_id":"7"}"#);
    }

    #[test]
    fn round_trips_with_named_fields() {
        let mut e = Envelope::event("app", "presence-room", "client-typing", "{}".into());
        e.user_id = Some("42".into());
        e.socket_id = Some("1.2".into());
        let bytes = e.encode();
        // Named encoding: a reader in another language finds fields by name.
        assert!(bytes.windows(7).any(|w| w == b"channel"));
        assert_eq!(Envelope::decode(&bytes).unwrap(), e);
    }

    #[test]
    fn refuses_a_future_version() {
        let mut e = Envelope::terminate("app", "7");
        e.v = ENVELOPE_VERSION + 1;
        assert!(matches!(
            Envelope::decode(&e.encode()),
            Err(EnvelopeError::Version(_))
        ));
    }

    #[test]
    fn refuses_garbage() {
        assert!(Envelope::decode(b"\xc1not msgpack").is_err());
    }
}
