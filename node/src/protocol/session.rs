//! One connection's protocol state, without the socket: it takes the client's
//! frames and returns `Action`s (frames to send back, subscriptions to make,
//! events to publish) for the connection task to carry out. It also takes
//! what carrying out a subscription found (`JoinOutcome`) and says what the
//! client is told (`Completion`), and it keeps the ping and pong timers
//! (`on_activity`, `on_tick`): the connection task only waits for the
//! deadline it is given.
//!
//! Everything a client can get wrong is decided here (auth, channel rules,
//! client-event policy and rate, a silent socket), so it is all unit-tested
//! without a network or a clock.

use std::sync::Arc;
use std::time::Instant;

use belfry_coordinator::PresenceMember;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use super::auth;
use super::channel::{ChannelKind, ChannelName};
use super::code;
use super::frame::{self, ClientMessage, Encode};
use super::SocketId;
use crate::config::{AppConfig, ClientEvents};

/// Watchlists above this size are refused with 4302 (Pusher's limit).
pub const MAX_WATCHLIST: usize = 100;

#[derive(Debug)]
pub enum Action {
    /// Send this frame to this client.
    Send(Utf8Bytes),
    /// Join `channel`; for presence, as `member`. The connection answers with
    /// `subscription_succeeded` once the subscription is in place.
    Subscribe {
        channel: ChannelName,
        member: Option<PresenceMember>,
    },
    /// Leave `channel`.
    Unsubscribe {
        channel: ChannelName,
        presence: bool,
    },
    /// Publish a client event to every other subscriber.
    ClientEvent {
        channel: ChannelName,
        event: String,
        data: String,
        user_id: Option<String>,
    },
    /// The connection now belongs to this user (`pusher:signin`); a second
    /// signin replaces the `previous` user and their watchlist. The
    /// connection hears when the users on its `watchlist` come and go.
    SignedIn {
        user_id: String,
        previous: Option<String>,
        watchlist: Vec<String>,
        previous_watchlist: Vec<String>,
    },
}

/// What the node found when it carried out an `Action::Subscribe`.
#[derive(Debug)]
pub enum JoinOutcome {
    /// The subscription is in place (the bus confirmed it).
    Joined {
        /// Presence channels: who is on it now, and whether this connection
        /// is its user's first (so the others are told `member_added`).
        presence: Option<PresenceJoin>,
        /// What a cache channel held.
        cache: Cache,
    },
    /// The presence channel already has its most members.
    Full(usize),
    /// Something the subscription needs is unreachable (the bus, presence).
    Unavailable(String),
}

#[derive(Debug)]
pub struct PresenceJoin {
    pub members: Vec<PresenceMember>,
    pub user_added: bool,
}

/// A cache channel's last event, as the joiner is to get it.
#[derive(Debug)]
pub enum Cache {
    /// Not a cache channel.
    None,
    Hit {
        event: String,
        data: String,
        user_id: Option<String>,
    },
    Miss,
}

/// What the connection does once a subscription is complete.
#[derive(Debug)]
pub struct Completion {
    /// Queued together with the connection's place on the channel, so that
    /// no event published after `subscription_succeeded` arrives before it.
    pub first: Vec<Utf8Bytes>,
    /// Announce this member to the channel's other subscribers.
    pub member_added: Option<PresenceMember>,
    /// The channel was an empty cache channel (the `cache_miss` webhook).
    pub cache_miss: bool,
}

/// What a timer deadline asks of the connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Tick {
    /// The client was silent for the ping interval: send this ping.
    Ping(Utf8Bytes),
    /// No reply to the ping in time: close with this code and message.
    Close(u16, String),
    /// Woken before the deadline; wait again.
    Wait,
}

/// What the session remembers about one joined channel.
#[derive(Debug, Clone)]
pub struct Joined {
    /// The presence user this connection joined as, as the JSON text of its
    /// id (client events carry it with its type: Laravel ids are integers).
    pub presence_user: Option<String>,
}

/// Client events allowed per second, refilled continuously.
#[derive(Debug)]
struct RateLimit {
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl RateLimit {
    fn new(per_second: u32, now: Instant) -> Self {
        Self {
            per_second: per_second as f64,
            tokens: per_second as f64,
            last: now,
        }
    }

    fn allow(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The channels a connection joined. Most connections join one to a few,
/// so a vector grown one entry at a time costs an idle connection 40 bytes
/// where a hash map cost 180; the limit (`max_channels_per_connection`,
/// 500 by default) keeps a linear search short.
#[derive(Default)]
struct Channels(Vec<(ChannelName, Joined)>);

impl Channels {
    fn position(&self, channel: &ChannelName) -> Option<usize> {
        self.0.iter().position(|(c, _)| c == channel)
    }

    fn contains_key(&self, channel: &ChannelName) -> bool {
        self.position(channel).is_some()
    }

    fn get(&self, channel: &ChannelName) -> Option<&Joined> {
        self.position(channel).map(|i| &self.0[i].1)
    }

    fn len(&self) -> usize {
        self.0.len()
    }

    fn insert(&mut self, channel: ChannelName, joined: Joined) {
        match self.position(&channel) {
            Some(i) => self.0[i].1 = joined,
            None => {
                self.0.reserve_exact(1);
                self.0.push((channel, joined));
            }
        }
    }

    fn remove(&mut self, channel: &ChannelName) -> Option<Joined> {
        let i = self.position(channel)?;
        let joined = self.0.swap_remove(i).1;
        if self.0.is_empty() {
            self.0 = Vec::new();
        }
        Some(joined)
    }

    fn drain(&mut self) -> std::vec::Drain<'_, (ChannelName, Joined)> {
        self.0.drain(..)
    }
}

/// Who a signed-in connection is and whom it watches.
struct Signin {
    user_id: String,
    watchlist: Vec<String>,
}

pub struct Session {
    socket_id: SocketId,
    app: Arc<AppConfig>,
    channels: Channels,
    /// Boxed: most connections never sign in, and an idle connection keeps
    /// its session for its whole life.
    signin: Option<Box<Signin>>,
    rate: RateLimit,
    rate_limited: u64,
    /// When the ping (or, once pinged, the close) is due.
    deadline: Instant,
    pinged: bool,
}

/// The string form and JSON text of a presence `user_id`, which may be a
/// string or a number.
fn user_id_of(value: &serde_json::Value) -> Option<(String, String)> {
    match value {
        serde_json::Value::String(s) if !s.is_empty() => Some((s.clone(), value.to_string())),
        serde_json::Value::Number(n) => Some((n.to_string(), n.to_string())),
        _ => None,
    }
}

impl Session {
    pub fn new(socket_id: SocketId, app: Arc<AppConfig>, now: Instant) -> Self {
        let rate = RateLimit::new(app.client_event_rate, now);
        let deadline = now + crate::config::Config::ping_after(&app);
        Self {
            socket_id,
            app,
            channels: Channels::default(),
            signin: None,
            rate,
            rate_limited: 0,
            deadline,
            pinged: false,
        }
    }

    /// When the connection should call `on_tick` next.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// A whole frame arrived: the client is alive. (A frame trickled byte by
    /// byte does not count until it is whole, so it cannot keep a socket open.)
    pub fn on_activity(&mut self, now: Instant) {
        self.deadline = now + crate::config::Config::ping_after(&self.app);
        self.pinged = false;
    }

    /// The deadline passed: ping a silent client, or close one that did not
    /// answer the ping within `pong_timeout`.
    pub fn on_tick(&mut self, now: Instant) -> Tick {
        if now < self.deadline {
            return Tick::Wait;
        }
        if self.pinged {
            return Tick::Close(code::PONG_TIMEOUT, "Pong reply not received in time".into());
        }
        self.pinged = true;
        self.deadline = now + std::time::Duration::from_secs(self.app.pong_timeout);
        Tick::Ping(Encode::ping())
    }

    /// What the client is told once its subscription to `channel` was
    /// carried out (`member` is the one `Action::Subscribe` carried). On a
    /// failure the channel is forgotten, so the client may try again, and
    /// the `Err` is the `subscription_error` to send.
    pub fn on_joined(
        &mut self,
        channel: &ChannelName,
        member: Option<PresenceMember>,
        outcome: JoinOutcome,
    ) -> Result<Completion, Utf8Bytes> {
        let name = channel.as_str();
        let (code, status, message) = match outcome {
            JoinOutcome::Joined { presence, cache } => {
                return Ok(Self::completion(name, member, presence, cache))
            }
            JoinOutcome::Full(max) => (
                code::OVER_QUOTA,
                403,
                format!("Presence channel is full ({max} members)"),
            ),
            JoinOutcome::Unavailable(why) => (
                code::OVER_CAPACITY,
                503,
                format!("Subscription failed: {why}"),
            ),
        };
        self.channels.remove(channel);
        Err(Encode::subscription_error(name, code, &message, status))
    }

    /// The first frames of a subscription that is in place, and who to announce.
    fn completion(
        name: &str,
        member: Option<PresenceMember>,
        presence: Option<PresenceJoin>,
        cache: Cache,
    ) -> Completion {
        let mut first = Vec::with_capacity(2);
        let mut member_added = None;
        match presence {
            Some(joined) => {
                first.push(Encode::presence_succeeded(
                    name,
                    joined.members.iter().map(|m| {
                        (
                            m.user_id.as_str(),
                            m.user_id_json.as_str(),
                            m.user_info.as_deref(),
                        )
                    }),
                ));
                if joined.user_added {
                    member_added = member;
                }
            }
            None => first.push(Encode::subscription_succeeded(name)),
        }
        let cache_miss = matches!(cache, Cache::Miss);
        match cache {
            Cache::None => {}
            Cache::Hit {
                event,
                data,
                user_id,
            } => first.push(Encode::event_with_user(
                &event,
                Some(name),
                &data,
                user_id.as_deref(),
            )),
            Cache::Miss => first.push(Encode::cache_miss(name)),
        }
        Completion {
            first,
            member_added,
            cache_miss,
        }
    }

    /// Client events refused by the rate limit so far.
    pub fn rate_limited(&self) -> u64 {
        self.rate_limited
    }

    pub fn user_id(&self) -> Option<&str> {
        self.signin.as_ref().map(|s| s.user_id.as_str())
    }

    /// The users this connection watches (from its signin's `watchlist`).
    pub fn watchlist(&self) -> &[String] {
        self.signin.as_ref().map_or(&[], |s| &s.watchlist)
    }

    /// Channels joined (or being joined), for cleanup when the socket closes.
    pub fn take_channels(&mut self) -> Vec<(ChannelName, Joined)> {
        self.channels.drain().collect()
    }

    pub fn on_text(&mut self, text: &str, now: Instant) -> Vec<Action> {
        match frame::parse(text) {
            Ok(message) => self.on_message(message, now),
            Err(e) => vec![Action::Send(Encode::error(None, &e.to_string()))],
        }
    }

    fn on_message(&mut self, message: ClientMessage, now: Instant) -> Vec<Action> {
        match message {
            ClientMessage::Ping => vec![Action::Send(Encode::pong())],
            ClientMessage::Pong => Vec::new(),
            ClientMessage::Subscribe {
                channel,
                auth,
                channel_data,
            } => self.subscribe(&channel, auth.as_deref(), channel_data.as_deref()),
            ClientMessage::Unsubscribe { channel } => self.unsubscribe(&channel),
            ClientMessage::Signin { auth, user_data } => self.signin(&auth, &user_data),
            ClientMessage::ClientEvent {
                event,
                channel,
                data,
            } => self.client_event(event, &channel, data, now),
            ClientMessage::Unknown(event) => vec![Action::Send(Encode::error(
                None,
                &format!("Unsupported event: {event}"),
            ))],
        }
    }

    fn subscribe(
        &mut self,
        name: &str,
        auth: Option<&str>,
        channel_data: Option<&str>,
    ) -> Vec<Action> {
        let refuse = |code: u16, status: u16, message: String| {
            vec![Action::Send(Encode::subscription_error(
                name, code, &message, status,
            ))]
        };
        let channel = match ChannelName::parse(name) {
            Ok(c) => c,
            Err(e) => {
                return refuse(
                    code::UNAUTHORIZED,
                    400,
                    format!("Invalid channel name: {e}"),
                )
            }
        };
        if self.channels.contains_key(&channel) {
            // pusher-js re-subscribes after a reconnect only; a duplicate on the
            // same socket changes nothing.
            return Vec::new();
        }
        if self.channels.len() >= self.app.max_channels_per_connection {
            return refuse(
                code::OVER_QUOTA,
                429,
                format!(
                    "This connection is already on {} channels, the most allowed",
                    self.app.max_channels_per_connection
                ),
            );
        }
        let kind = channel.kind();
        if kind == ChannelKind::ServerToUser && channel.server_to_user_id() != self.user_id() {
            return refuse(
                code::UNAUTHORIZED,
                403,
                "Only the signed-in user may join their #server-to-user channel".into(),
            );
        }
        let presence_data = if kind == ChannelKind::Presence {
            channel_data
        } else {
            None
        };
        if channel.needs_auth() {
            let message = auth::channel_message(&self.socket_id.to_string(), name, presence_data);
            if !auth.is_some_and(|a| {
                auth::verify_key_signature(&self.app.key, &self.app.secret, &message, a)
            }) {
                return refuse(
                    code::UNAUTHORIZED,
                    401,
                    format!("Invalid signature for channel {name}"),
                );
            }
        }
        let member = if kind == ChannelKind::Presence {
            match self.presence_member(channel_data) {
                Ok(m) => Some(m),
                Err(message) => return refuse(code::UNAUTHORIZED, 400, message),
            }
        } else {
            None
        };
        self.channels.insert(
            channel.clone(),
            Joined {
                presence_user: member.as_ref().map(|m| m.user_id_json.clone()),
            },
        );
        vec![Action::Subscribe { channel, member }]
    }

    fn presence_member(&self, channel_data: Option<&str>) -> Result<PresenceMember, String> {
        let data = channel_data.ok_or("Presence channels need channel_data")?;
        let value: serde_json::Value =
            serde_json::from_str(data).map_err(|e| format!("channel_data is not JSON: {e}"))?;
        let (user_id, user_id_json) = value
            .get("user_id")
            .and_then(user_id_of)
            .ok_or("channel_data needs a user_id (string or number)")?;
        let user_info = match value.get("user_info") {
            None | Some(serde_json::Value::Null) => None,
            Some(info) => {
                let text = info.to_string();
                if text.len() > self.app.max_user_info_bytes {
                    return Err(format!(
                        "user_info is larger than {} bytes",
                        self.app.max_user_info_bytes
                    ));
                }
                Some(text)
            }
        };
        Ok(PresenceMember {
            user_id,
            user_id_json,
            user_info,
        })
    }

    fn unsubscribe(&mut self, name: &str) -> Vec<Action> {
        let Ok(channel) = ChannelName::parse(name) else {
            return Vec::new();
        };
        match self.channels.remove(&channel) {
            Some(joined) => vec![Action::Unsubscribe {
                channel,
                presence: joined.presence_user.is_some(),
            }],
            None => Vec::new(),
        }
    }

    fn signin(&mut self, auth: &str, user_data: &str) -> Vec<Action> {
        let error =
            |code: u16, message: &str| vec![Action::Send(Encode::error(Some(code), message))];
        let message = auth::signin_message(&self.socket_id.to_string(), user_data);
        if !auth::verify_key_signature(&self.app.key, &self.app.secret, &message, auth) {
            return error(code::UNAUTHORIZED, "Invalid signin signature");
        }
        let Ok(value) = serde_json::from_str::<serde_json::Value>(user_data) else {
            return error(code::UNAUTHORIZED, "user_data is not JSON");
        };
        let Some((user_id, _)) = value.get("id").and_then(user_id_of) else {
            return error(code::UNAUTHORIZED, "user_data needs an id");
        };
        let watchlist: Vec<String> = match value.get("watchlist") {
            None | Some(serde_json::Value::Null) => Vec::new(),
            Some(serde_json::Value::Array(ids)) => {
                if ids.len() > MAX_WATCHLIST {
                    return error(code::WATCHLIST_LIMIT, "Watchlist is longer than 100 users");
                }
                let mut ids: Vec<String> = ids
                    .iter()
                    .filter_map(user_id_of)
                    .map(|(id, _)| id)
                    .collect();
                ids.sort();
                ids.dedup();
                ids
            }
            Some(_) => return error(code::UNAUTHORIZED, "watchlist must be a list of user ids"),
        };
        let (previous, previous_watchlist) = match self.signin.replace(Box::new(Signin {
            user_id: user_id.clone(),
            watchlist: watchlist.clone(),
        })) {
            Some(old) => (Some(old.user_id), old.watchlist),
            None => (None, Vec::new()),
        };
        vec![
            Action::Send(Encode::signin_success(user_data)),
            Action::SignedIn {
                user_id,
                previous,
                watchlist,
                previous_watchlist,
            },
        ]
    }

    fn client_event(
        &mut self,
        event: String,
        name: &str,
        data: String,
        now: Instant,
    ) -> Vec<Action> {
        let refuse = |message: String| {
            vec![Action::Send(Encode::error(
                Some(code::UNAUTHORIZED),
                &message,
            ))]
        };
        let Ok(channel) = ChannelName::parse(name) else {
            return refuse(format!("Invalid channel name {name:?}"));
        };
        let Some(joined) = self.channels.get(&channel) else {
            return refuse(format!(
                "Client event on {name}, which this connection has not joined"
            ));
        };
        let allowed = match (self.app.client_events, channel.kind()) {
            (ClientEvents::None, _) => false,
            (_, ChannelKind::PrivateEncrypted | ChannelKind::ServerToUser) => false,
            (_, ChannelKind::Private | ChannelKind::Presence) => true,
            (ClientEvents::All, ChannelKind::Public) => true,
            (ClientEvents::Members, ChannelKind::Public) => false,
        };
        if !allowed {
            return refuse(format!("Client events are not allowed on {name}"));
        }
        let user_id = joined.presence_user.clone();
        if !self.rate.allow(now) {
            self.rate_limited += 1;
            return vec![Action::Send(Encode::error(
                Some(code::CLIENT_EVENT_RATE),
                &format!(
                    "Client event rate limit exceeded: at most {} per second",
                    self.app.client_event_rate
                ),
            ))];
        }
        vec![Action::ClientEvent {
            channel,
            event,
            data,
            user_id,
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn app(policy: ClientEvents) -> Arc<AppConfig> {
        Arc::new(AppConfig {
            id: "1".into(),
            key: "key".into(),
            secret: "secret".into(),
            client_events: policy,
            ..AppConfig::default()
        })
    }

    fn session() -> Session {
        Session::new(SocketId(1, 2), app(ClientEvents::Members), Instant::now())
    }

    fn sent(actions: &[Action]) -> Vec<serde_json::Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(b) => Some(serde_json::from_str(b.as_str()).unwrap()),
                _ => None,
            })
            .collect()
    }

    fn subscribe_frame(channel: &str, auth: Option<String>, channel_data: Option<&str>) -> String {
        serde_json::json!({"event":"pusher:subscribe","data":{"channel":channel,"auth":auth,"channel_data":channel_data}})
            .to_string()
    }

    fn sign(msg: &str) -> String {
        format!("key:{}", auth::sign("secret", msg))
    }

    #[test]
    fn public_subscribe_needs_no_auth() {
        let mut s = session();
        let actions = s.on_text(&subscribe_frame("orders", None, None), Instant::now());
        assert!(matches!(
            &actions[..],
            [Action::Subscribe { member: None, .. }]
        ));
        // A second subscribe on the same socket does nothing.
        assert!(s
            .on_text(&subscribe_frame("orders", None, None), Instant::now())
            .is_empty());
    }

    #[test]
    fn private_subscribe_checks_the_signature() {
        let mut s = session();
        let bad = s.on_text(
            &subscribe_frame("private-a", Some("key:00".into()), None),
            Instant::now(),
        );
        let frames = sent(&bad);
        assert_eq!(frames[0]["event"], "pusher:subscription_error");
        assert_eq!(frames[0]["data"]["status"], 401);
        let good = s.on_text(
            &subscribe_frame("private-a", Some(sign("1.2:private-a")), None),
            Instant::now(),
        );
        assert!(matches!(&good[..], [Action::Subscribe { .. }]));
        // Another app's key with a valid signature for this secret is still refused.
        let other = format!("other:{}", auth::sign("secret", "1.2:private-b"));
        let refused = s.on_text(
            &subscribe_frame("private-b", Some(other), None),
            Instant::now(),
        );
        assert_eq!(sent(&refused)[0]["event"], "pusher:subscription_error");
    }

    #[test]
    fn presence_subscribe_signs_channel_data_and_keeps_the_id_type() {
        let mut s = session();
        let data = r#"{"user_id":42,"user_info":{"name":"Ada"}}"#;
        let actions = s.on_text(
            &subscribe_frame(
                "presence-room",
                Some(sign(&format!("1.2:presence-room:{data}"))),
                Some(data),
            ),
            Instant::now(),
        );
        match &actions[..] {
            [Action::Subscribe {
                member: Some(m), ..
            }] => {
                assert_eq!(m.user_id, "42");
                assert_eq!(m.user_id_json, "42");
                assert_eq!(m.user_info.as_deref(), Some(r#"{"name":"Ada"}"#));
            }
            other => panic!("{other:?}"),
        }
        // Signed without channel_data: refused.
        let actions = s.on_text(
            &subscribe_frame("presence-b", Some(sign("1.2:presence-b")), Some(data)),
            Instant::now(),
        );
        assert_eq!(sent(&actions)[0]["event"], "pusher:subscription_error");
    }

    #[test]
    fn oversized_user_info_is_refused() {
        let mut s = session();
        let data = format!(r#"{{"user_id":"u","user_info":"{}"}}"#, "x".repeat(2000));
        let actions = s.on_text(
            &subscribe_frame(
                "presence-r",
                Some(sign(&format!("1.2:presence-r:{data}"))),
                Some(&data),
            ),
            Instant::now(),
        );
        assert!(sent(&actions)[0]["data"]["message"]
            .as_str()
            .unwrap()
            .contains("user_info"));
    }

    #[test]
    fn a_connection_has_a_channel_limit() {
        let now = Instant::now();
        let app = Arc::new(AppConfig {
            key: "key".into(),
            secret: "secret".into(),
            max_channels_per_connection: 2,
            ..AppConfig::default()
        });
        let mut s = Session::new(SocketId(1, 2), app, now);
        s.on_text(&subscribe_frame("a", None, None), now);
        s.on_text(&subscribe_frame("b", None, None), now);
        let frames = sent(&s.on_text(&subscribe_frame("c", None, None), now));
        assert_eq!(frames[0]["event"], "pusher:subscription_error");
        assert_eq!(frames[0]["data"]["status"], 429);
        s.on_text(
            r#"{"event":"pusher:unsubscribe","data":{"channel":"a"}}"#,
            now,
        );
        assert!(matches!(
            &s.on_text(&subscribe_frame("c", None, None), now)[..],
            [Action::Subscribe { .. }]
        ));
    }

    #[test]
    fn invalid_channel_names_get_a_subscription_error() {
        let mut s = session();
        let frames = sent(&s.on_text(&subscribe_frame("bad name!", None, None), Instant::now()));
        assert_eq!(frames[0]["event"], "pusher:subscription_error");
        assert_eq!(frames[0]["channel"], "bad name!");
    }

    #[test]
    fn server_to_user_is_only_for_that_user() {
        let mut s = session();
        let frames = sent(&s.on_text(
            &subscribe_frame("#server-to-user-7", None, None),
            Instant::now(),
        ));
        assert_eq!(frames[0]["data"]["status"], 403);
        let user_data = r#"{"id":"7"}"#;
        let signin = serde_json::json!({"event":"pusher:signin","data":{"auth":sign(&format!("1.2::user::{user_data}")),"user_data":user_data}}).to_string();
        let actions = s.on_text(&signin, Instant::now());
        assert_eq!(sent(&actions)[0]["event"], "pusher:signin_success");
        assert!(
            matches!(&actions[1], Action::SignedIn { user_id, previous: None, .. } if user_id == "7")
        );
        let ok = s.on_text(
            &subscribe_frame("#server-to-user-7", None, None),
            Instant::now(),
        );
        assert!(matches!(&ok[..], [Action::Subscribe { .. }]));
        let frames = sent(&s.on_text(
            &subscribe_frame("#server-to-user-8", None, None),
            Instant::now(),
        ));
        assert_eq!(frames[0]["event"], "pusher:subscription_error");
    }

    #[test]
    fn signin_carries_the_watchlist_as_strings() {
        let mut s = session();
        let user_data = r#"{"id":"1","watchlist":[2,"3",2]}"#;
        let signin = serde_json::json!({"event":"pusher:signin","data":{"auth":sign(&format!("1.2::user::{user_data}")),"user_data":user_data}}).to_string();
        let actions = s.on_text(&signin, Instant::now());
        assert!(
            matches!(&actions[1], Action::SignedIn { watchlist, .. } if watchlist == &["2", "3"])
        );
        assert_eq!(s.watchlist(), ["2", "3"]);
    }

    #[test]
    fn signin_with_a_bad_signature_or_long_watchlist_is_refused() {
        let mut s = session();
        let frames = sent(&s.on_text(
            r#"{"event":"pusher:signin","data":{"auth":"key:00","user_data":"{\"id\":\"1\"}"}}"#,
            Instant::now(),
        ));
        assert_eq!(frames[0]["data"]["code"], 4009);
        let ids: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let user_data = serde_json::json!({"id":"1","watchlist":ids}).to_string();
        let signin = serde_json::json!({"event":"pusher:signin","data":{"auth":sign(&format!("1.2::user::{user_data}")),"user_data":user_data}}).to_string();
        assert_eq!(
            sent(&s.on_text(&signin, Instant::now()))[0]["data"]["code"],
            4302
        );
        assert_eq!(s.user_id(), None);
    }

    fn client_event(channel: &str) -> String {
        serde_json::json!({"event":"client-typing","channel":channel,"data":{"a":1}}).to_string()
    }

    #[test]
    fn client_events_follow_the_policy() {
        let now = Instant::now();
        let mut s = session();
        s.on_text(&subscribe_frame("public", None, None), now);
        s.on_text(
            &subscribe_frame("private-a", Some(sign("1.2:private-a")), None),
            now,
        );
        s.on_text(
            &subscribe_frame(
                "private-encrypted-a",
                Some(sign("1.2:private-encrypted-a")),
                None,
            ),
            now,
        );
        assert_eq!(
            sent(&s.on_text(&client_event("public"), now))[0]["event"],
            "pusher:error"
        );
        assert_eq!(
            sent(&s.on_text(&client_event("private-encrypted-a"), now))[0]["event"],
            "pusher:error"
        );
        assert_eq!(
            sent(&s.on_text(&client_event("private-b"), now))[0]["event"],
            "pusher:error"
        );
        assert!(matches!(
            &s.on_text(&client_event("private-a"), now)[..],
            [Action::ClientEvent { user_id: None, .. }]
        ));

        let mut all = Session::new(SocketId(1, 2), app(ClientEvents::All), now);
        all.on_text(&subscribe_frame("public", None, None), now);
        assert!(matches!(
            &all.on_text(&client_event("public"), now)[..],
            [Action::ClientEvent { .. }]
        ));

        let mut none = Session::new(SocketId(1, 2), app(ClientEvents::None), now);
        none.on_text(
            &subscribe_frame("private-a", Some(sign("1.2:private-a")), None),
            now,
        );
        assert_eq!(
            sent(&none.on_text(&client_event("private-a"), now))[0]["event"],
            "pusher:error"
        );
    }

    #[test]
    fn client_events_are_rate_limited_per_second() {
        let start = Instant::now();
        let mut s = session();
        s.on_text(
            &subscribe_frame("private-a", Some(sign("1.2:private-a")), None),
            start,
        );
        for _ in 0..10 {
            assert!(matches!(
                &s.on_text(&client_event("private-a"), start)[..],
                [Action::ClientEvent { .. }]
            ));
        }
        let over = sent(&s.on_text(&client_event("private-a"), start));
        assert_eq!(over[0]["data"]["code"], 4301);
        let later = start + Duration::from_millis(150);
        assert!(matches!(
            &s.on_text(&client_event("private-a"), later)[..],
            [Action::ClientEvent { .. }]
        ));
    }

    #[test]
    fn presence_client_events_carry_the_user_id() {
        let now = Instant::now();
        let mut s = session();
        let data = r#"{"user_id":"u1"}"#;
        s.on_text(
            &subscribe_frame(
                "presence-r",
                Some(sign(&format!("1.2:presence-r:{data}"))),
                Some(data),
            ),
            now,
        );
        assert!(matches!(
            &s.on_text(&client_event("presence-r"), now)[..],
            [Action::ClientEvent { user_id: Some(u), .. }] if u == "\"u1\""
        ));
    }

    #[test]
    fn unsubscribe_reports_presence_and_forgets() {
        let now = Instant::now();
        let mut s = session();
        s.on_text(&subscribe_frame("orders", None, None), now);
        let actions = s.on_text(
            r#"{"event":"pusher:unsubscribe","data":{"channel":"orders"}}"#,
            now,
        );
        assert!(matches!(
            &actions[..],
            [Action::Unsubscribe {
                presence: false,
                ..
            }]
        ));
        assert!(s
            .on_text(
                r#"{"event":"pusher:unsubscribe","data":{"channel":"orders"}}"#,
                now
            )
            .is_empty());
    }

    #[test]
    fn ping_gets_pong_and_garbage_gets_an_error() {
        let mut s = session();
        assert_eq!(
            sent(&s.on_text(r#"{"event":"pusher:ping","data":{}}"#, Instant::now()))[0]["event"],
            "pusher:pong"
        );
        assert_eq!(
            sent(&s.on_text("{not json", Instant::now()))[0]["event"],
            "pusher:error"
        );
        assert_eq!(
            sent(&s.on_text(r#"{"event":"pusher:bogus"}"#, Instant::now()))[0]["event"],
            "pusher:error"
        );
    }

    fn member(id: &str) -> PresenceMember {
        PresenceMember {
            user_id: id.into(),
            user_id_json: format!("\"{id}\""),
            user_info: Some(format!("{{\"name\":\"{id}\"}}")),
        }
    }

    fn frames(first: &[Utf8Bytes]) -> Vec<serde_json::Value> {
        first
            .iter()
            .map(|f| serde_json::from_str(f.as_str()).unwrap())
            .collect()
    }

    /// Subscribes to `name` (public or cache: no auth) and returns what the
    /// session asked for.
    fn subscribe_public(s: &mut Session, name: &str) -> ChannelName {
        match &s.on_text(&subscribe_frame(name, None, None), Instant::now())[..] {
            [Action::Subscribe { channel, .. }] => channel.clone(),
            other => panic!("no subscribe: {other:?}"),
        }
    }

    #[test]
    fn a_completed_join_sends_success_then_the_cached_event() {
        let mut s = session();
        let channel = subscribe_public(&mut s, "cache-prices");
        let cache = Cache::Hit {
            event: "Price".into(),
            data: "{\"v\":1}".into(),
            user_id: None,
        };
        let outcome = JoinOutcome::Joined {
            presence: None,
            cache,
        };
        let done = s.on_joined(&channel, None, outcome).unwrap();
        let got = frames(&done.first);
        assert_eq!(got[0]["event"], "pusher_internal:subscription_succeeded");
        assert_eq!(
            (got[1]["event"].as_str(), got[1]["channel"].as_str()),
            (Some("Price"), Some("cache-prices"))
        );
        assert!(!done.cache_miss && done.member_added.is_none());

        let empty = subscribe_public(&mut s, "cache-empty");
        let done = s
            .on_joined(
                &empty,
                None,
                JoinOutcome::Joined {
                    presence: None,
                    cache: Cache::Miss,
                },
            )
            .unwrap();
        let got = frames(&done.first);
        assert_eq!(got[1]["event"], "pusher:cache_miss");
        assert!(done.cache_miss, "the cache_miss webhook is asked for");
    }

    #[test]
    fn a_presence_join_lists_the_members_and_announces_only_a_new_user() {
        let mut s = session();
        let data = r#"{"user_id":"u1","user_info":{"name":"u1"}}"#;
        let auth = sign(&format!("1.2:presence-room:{data}"));
        let actions = s.on_text(
            &subscribe_frame("presence-room", Some(auth), Some(data)),
            Instant::now(),
        );
        let [Action::Subscribe {
            channel,
            member: Some(m),
        }] = &actions[..]
        else {
            panic!("no presence subscribe: {actions:?}");
        };
        let members = vec![member("u0"), m.clone()];
        let outcome = JoinOutcome::Joined {
            presence: Some(PresenceJoin {
                members,
                user_added: true,
            }),
            cache: Cache::None,
        };
        let done = s.on_joined(channel, Some(m.clone()), outcome).unwrap();
        let got = frames(&done.first);
        assert_eq!(got[0]["event"], "pusher_internal:subscription_succeeded");
        let presence: serde_json::Value =
            serde_json::from_str(got[0]["data"].as_str().unwrap()).unwrap();
        assert_eq!(presence["presence"]["count"], 2);
        assert_eq!(presence["presence"]["ids"], serde_json::json!(["u0", "u1"]));
        assert_eq!(done.member_added.map(|m| m.user_id), Some("u1".to_owned()));

        // A second tab of a user already on the channel: no member_added.
        let mut tab = session();
        let actions = tab.on_text(
            &subscribe_frame(
                "presence-room",
                Some(sign(&format!("1.2:presence-room:{data}"))),
                Some(data),
            ),
            Instant::now(),
        );
        let [Action::Subscribe { channel, member }] = &actions[..] else {
            panic!()
        };
        let outcome = JoinOutcome::Joined {
            presence: Some(PresenceJoin {
                members: vec![member.clone().unwrap()],
                user_added: false,
            }),
            cache: Cache::None,
        };
        assert!(tab
            .on_joined(channel, member.clone(), outcome)
            .unwrap()
            .member_added
            .is_none());
    }

    #[test]
    fn a_failed_join_answers_an_error_and_forgets_the_channel() {
        let mut s = session();
        let channel = subscribe_public(&mut s, "orders");
        let err = s
            .on_joined(
                &channel,
                None,
                JoinOutcome::Unavailable("Redis is unreachable".into()),
            )
            .unwrap_err();
        let err: serde_json::Value = serde_json::from_str(err.as_str()).unwrap();
        assert_eq!(err["event"], "pusher:subscription_error");
        assert_eq!(err["data"]["status"], 503);
        assert!(err["data"]["error"]
            .as_str()
            .unwrap()
            .contains("Redis is unreachable"));
        // Forgotten: the client may subscribe again (not ignored as a duplicate).
        subscribe_public(&mut s, "orders");
        let err = s
            .on_joined(&channel, None, JoinOutcome::Full(100))
            .unwrap_err();
        let err: serde_json::Value = serde_json::from_str(err.as_str()).unwrap();
        assert_eq!(err["data"]["status"], 403);
        assert!(err["data"]["error"].as_str().unwrap().contains("100"));
        // And client events on it are refused: it is not joined.
        let whisper = s.on_text(
            r#"{"event":"client-x","channel":"orders","data":{}}"#,
            Instant::now(),
        );
        assert_eq!(sent(&whisper)[0]["event"], "pusher:error");
    }

    #[test]
    fn a_silent_client_is_pinged_then_closed_and_any_frame_resets_the_timer() {
        let start = Instant::now();
        let app = Arc::new(AppConfig {
            activity_timeout: 30,
            ping_interval: 0,
            pong_timeout: 10,
            ..AppConfig::default()
        });
        let mut s = Session::new(SocketId(1, 2), app, start);
        assert_eq!(s.deadline(), start + Duration::from_secs(30));
        assert_eq!(
            s.on_tick(start + Duration::from_secs(29)),
            Tick::Wait,
            "woken early"
        );
        let at = start + Duration::from_secs(30);
        let Tick::Ping(frame) = s.on_tick(at) else {
            panic!("no ping")
        };
        assert!(frame.as_str().contains("pusher:ping"));
        assert_eq!(
            s.deadline(),
            at + Duration::from_secs(10),
            "the pong timeout runs"
        );
        // The reply (any whole frame) makes the client alive again.
        let reply = at + Duration::from_secs(3);
        s.on_activity(reply);
        assert_eq!(s.deadline(), reply + Duration::from_secs(30));
        assert!(matches!(
            s.on_tick(reply + Duration::from_secs(30)),
            Tick::Ping(_)
        ));
        // No reply this time: closed with 4201.
        match s.on_tick(reply + Duration::from_secs(40)) {
            Tick::Close(code, message) => {
                assert_eq!(code, code::PONG_TIMEOUT);
                assert!(message.contains("Pong"));
            }
            other => panic!("not closed: {other:?}"),
        }
    }

    #[test]
    fn ping_interval_overrides_the_activity_timeout_for_the_server_ping() {
        let start = Instant::now();
        let app = Arc::new(AppConfig {
            activity_timeout: 120,
            ping_interval: 15,
            ..AppConfig::default()
        });
        let s = Session::new(SocketId(1, 2), app, start);
        assert_eq!(s.deadline(), start + Duration::from_secs(15));
    }
}
