//! One client's WebSocket, from `connection_established` to close.
//!
//! A single task owns the socket. It reads frames into the `Session`, carries
//! out the actions that come back, and drains the connection's bounded send
//! queue, writing everything queued so far with one flush. A client whose
//! queue overflows is a slow consumer and is closed with 4100 rather than
//! buffered without bound. Silent sockets are pinged and closed with 4201.

use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::{Envelope, PresenceError, PresenceMember};
use futures_util::{SinkExt, StreamExt};
use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use crate::node::Node;
use crate::protocol::frame::Encode;
use crate::protocol::session::Joined;
use crate::protocol::{code, Action, ChannelKind, ChannelName, Session, SocketId};
use crate::registry::AppRegistry;
use crate::telemetry::AppMetrics;

/// Frames written per flush at most; bounds one write's latency for others.
const WRITE_BATCH: usize = 256;
/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks a connection to close, from anywhere (slow consumer, terminate, drain).
#[derive(Default)]
struct Closer {
    code: AtomicU16,
    reason: Mutex<(String, &'static str)>,
    notify: Notify,
}

/// A cheap handle to a connection: its id, its send queue and its closer.
#[derive(Clone)]
pub struct ConnHandle {
    pub socket_id: SocketId,
    metrics: Arc<AppMetrics>,
    tx: mpsc::Sender<Utf8Bytes>,
    closer: Arc<Closer>,
}

impl ConnHandle {
    /// Queues a frame. A full queue means the client is not reading: it is
    /// closed as a slow consumer and the frame is dropped for it alone.
    pub fn send(&self, frame: Utf8Bytes) -> bool {
        match self.tx.try_send(frame) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.close(
                    code::OVER_CAPACITY,
                    "Slow consumer: send queue full",
                    "slow_consumer",
                ) {
                    self.metrics.slow_consumers.increment(1);
                }
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Asks the connection to close with `code`. Only the first request
    /// counts; returns whether this was it.
    pub fn close(&self, code: u16, message: &str, reason: &'static str) -> bool {
        if self
            .closer
            .code
            .compare_exchange(0, code, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            return false;
        }
        *self.closer.reason.lock() = (message.to_owned(), reason);
        self.closer.notify.notify_one();
        true
    }
}

/// Refuses a connection that was upgraded only to be told why: the
/// `pusher:error` frame, then the matching close code.
pub async fn refuse<S>(mut ws: WebSocketStream<S>, code: u16, message: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = ws
        .send(Message::Text(Encode::error(Some(code), message)))
        .await;
    close(&mut ws, code, message).await;
}

async fn close<S>(ws: &mut WebSocketStream<S>, code: u16, message: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: message.chars().take(120).collect::<String>().into(),
    };
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        if ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Wait for the client's close reply, so the close code is not lost
        // to a TCP reset when unread data is still in flight.
        while let Some(Ok(_)) = ws.next().await {}
    })
    .await;
}

/// Why a connection ended, for the log and the closed-connections counter.
enum End {
    Client,
    Error,
    Closed(u16, String, &'static str),
}

/// Runs an accepted connection to its end.
pub async fn run<S>(node: Arc<Node>, app: Arc<AppRegistry>, mut ws: WebSocketStream<S>)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let socket_id = SocketId::random();
    let (tx, mut rx) = mpsc::channel(node.config.send_queue_frames);
    let handle = ConnHandle {
        socket_id,
        metrics: app.metrics.clone(),
        tx,
        closer: Arc::new(Closer::default()),
    };
    let activity = Duration::from_secs(app.config.activity_timeout);
    let pong_wait = Duration::from_secs(app.config.pong_timeout);
    let mut session = Session::new(socket_id, app.config.clone(), Instant::now());
    let mut conn = Conn {
        node: node.clone(),
        app: app.clone(),
        handle: handle.clone(),
    };
    node.track(handle.clone());

    let established =
        Encode::connection_established(&socket_id.to_string(), app.config.activity_timeout);
    let mut end = match ws.send(Message::Text(established)).await {
        Ok(()) => None,
        Err(_) => Some(End::Error),
    };
    let mut batch = Vec::with_capacity(16);
    let idle = tokio::time::sleep(activity);
    tokio::pin!(idle);
    let mut pinged = false;

    while end.is_none() {
        tokio::select! {
            biased;
            _ = handle.closer.notify.notified() => {
                let (message, reason) = handle.closer.reason.lock().clone();
                let code = handle.closer.code.load(Ordering::Acquire);
                end = Some(End::Closed(code, message, reason));
            }
            n = rx.recv_many(&mut batch, WRITE_BATCH) => {
                if n == 0 {
                    end = Some(End::Error);
                    continue;
                }
                let mut failed = false;
                for frame in batch.drain(..) {
                    if ws.feed(Message::Text(frame)).await.is_err() {
                        failed = true;
                        break;
                    }
                }
                if failed || ws.flush().await.is_err() {
                    end = Some(End::Error);
                }
            }
            message = ws.next() => {
                idle.as_mut().reset(tokio::time::Instant::now() + activity);
                pinged = false;
                end = match message {
                    Some(Ok(Message::Text(text))) => {
                        app.metrics.messages_in.increment(1);
                        app.metrics.bytes_in.increment(text.len() as u64);
                        let limited = session.rate_limited();
                        let actions = session.on_text(text.as_str(), Instant::now());
                        if session.rate_limited() > limited {
                            app.metrics.client_event_rate_limited.increment(1);
                        }
                        conn.carry_out(&mut session, actions).await;
                        None
                    }
                    Some(Ok(Message::Binary(_))) => {
                        handle.send(Encode::error(None, "Binary frames are not part of the Pusher protocol"));
                        None
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => None,
                    Some(Ok(Message::Close(_))) | None => Some(End::Client),
                    Some(Err(WsError::Capacity(_))) => Some(End::Closed(
                        code::TOO_BIG,
                        format!("Message larger than {} bytes", app.config.max_message_bytes),
                        "too_large",
                    )),
                    Some(Err(_)) => Some(End::Error),
                };
            }
            _ = &mut idle => {
                if pinged {
                    end = Some(End::Closed(code::PONG_TIMEOUT, "Pong reply not received in time".into(), "ping_timeout"));
                } else {
                    pinged = true;
                    handle.send(Encode::ping());
                    idle.as_mut().reset(tokio::time::Instant::now() + pong_wait);
                }
            }
        }
    }

    let reason = match end {
        Some(End::Closed(code, message, reason)) => {
            if code >= 4000 {
                let _ = tokio::time::timeout(
                    CLOSE_TIMEOUT,
                    ws.send(Message::Text(Encode::error(Some(code), &message))),
                )
                .await;
            }
            close(&mut ws, code, &message).await;
            reason
        }
        Some(End::Client) => {
            // Sends tungstenite's queued reply to the client's close frame.
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, ws.flush()).await;
            "client"
        }
        Some(End::Error) | None => "error",
    };
    conn.leave_all(&mut session).await;
    node.untrack(socket_id);
    node.release(&app, reason);
    tracing::debug!(app = %app.config.id, socket_id = %socket_id, reason, "connection closed");
}

/// The parts of a connection that actions need.
struct Conn {
    node: Arc<Node>,
    app: Arc<AppRegistry>,
    handle: ConnHandle,
}

impl Conn {
    async fn carry_out(&mut self, session: &mut Session, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(frame) => {
                    self.handle.send(frame);
                }
                Action::Subscribe { channel, member } => {
                    if let Err(frame) = self.join(&channel, member).await {
                        session.subscription_failed(&channel);
                        self.handle.send(frame);
                    }
                }
                Action::Unsubscribe { channel, presence } => self.leave(&channel, presence).await,
                Action::ClientEvent {
                    channel,
                    event,
                    data,
                    user_id,
                } => {
                    let mut envelope =
                        Envelope::event(&self.app.config.id, channel.as_str(), &event, data);
                    envelope.socket_id = Some(self.handle.socket_id.to_string());
                    envelope.user_id = user_id;
                    self.app.metrics.client_events.increment(1);
                    if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                        self.handle.send(Encode::error(
                            None,
                            &format!("Client event not delivered: {e}"),
                        ));
                    }
                }
                Action::SignedIn { user_id, previous } => {
                    if let Some(previous) = previous {
                        self.app.remove_user(&previous, self.handle.socket_id);
                    }
                    self.app.add_user(&user_id, self.handle.clone());
                }
            }
        }
    }

    /// Subscribes this connection: bus first (so nothing published after
    /// `subscription_succeeded` can be missed), then presence, then the
    /// local registry together with the first frames.
    async fn join(
        &self,
        channel: &ChannelName,
        member: Option<PresenceMember>,
    ) -> Result<(), Utf8Bytes> {
        let app_id = self.app.config.id.as_str();
        let name = channel.as_str();
        let socket = self.handle.socket_id.to_string();
        let unavailable = |e: String| {
            Encode::subscription_error(
                name,
                code::OVER_CAPACITY,
                &format!("Subscription failed: {e}"),
                503,
            )
        };
        self.node
            .bus
            .subscribe(app_id, name)
            .await
            .map_err(|e| unavailable(e.to_string()))?;

        let mut first = Vec::with_capacity(2);
        let mut added = None;
        if let Some(member) = member {
            let joined = self
                .node
                .presence
                .join(
                    app_id,
                    name,
                    &socket,
                    member.clone(),
                    self.app.config.max_presence_members,
                )
                .await;
            let joined = match joined {
                Ok(j) => j,
                Err(PresenceError::Full(max)) => {
                    self.release_bus(name);
                    return Err(Encode::subscription_error(
                        name,
                        code::OVER_QUOTA,
                        &format!("Presence channel is full ({max} members)"),
                        403,
                    ));
                }
                Err(e) => {
                    self.release_bus(name);
                    return Err(unavailable(e.to_string()));
                }
            };
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
                self.app.metrics.presence_members.increment(1.0);
                added = Some(member);
            }
        } else {
            first.push(Encode::subscription_succeeded(name));
        }
        if let Err(e) = self.node.subscription_added(app_id, name).await {
            if let Some(m) = &added {
                self.rollback_presence(name, m).await;
            }
            self.release_bus(name);
            return Err(unavailable(e));
        }
        if channel.is_cache() {
            match self.node.bus.cached(app_id, name).await {
                Ok(Some(e)) => first.push(Encode::event_with_user(
                    &e.event,
                    Some(name),
                    &e.data,
                    e.user_id.as_deref(),
                )),
                Ok(None) => first.push(Encode::cache_miss(name)),
                Err(e) => tracing::warn!(error = %e, "cache lookup failed; sending cache_miss"),
            }
            if first.len() == 1 {
                first.push(Encode::cache_miss(name));
            }
        }
        self.app.add_subscriber(name, self.handle.clone(), &first);

        if let Some(member) = added {
            let data = Encode::member_added_data(&member.user_id_json, member.user_info.as_deref());
            let mut envelope = Envelope::event(app_id, name, "pusher_internal:member_added", data);
            envelope.socket_id = Some(socket);
            if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                tracing::warn!(error = %e, "member_added not published");
            }
        }
        Ok(())
    }

    /// Undoes a presence join whose subscription could not complete.
    async fn rollback_presence(&self, channel: &str, _member: &PresenceMember) {
        let socket = self.handle.socket_id.to_string();
        if let Ok(Some(_)) = self.node.presence.leave(&self.app.config.id, channel, &socket).await {
            self.app.metrics.presence_members.decrement(1.0);
        }
    }

    /// Unsubscribes from the bus if no local subscriber is left on `channel`.
    fn release_bus(&self, channel: &str) {
        if self.app.occupancy(channel).subscriptions == 0 {
            self.node.bus.unsubscribe(&self.app.config.id, channel);
        }
    }

    async fn leave(&self, channel: &ChannelName, presence: bool) {
        let app_id = self.app.config.id.as_str();
        let name = channel.as_str();
        if self.app.remove_subscriber(name, self.handle.socket_id) {
            self.node.bus.unsubscribe(app_id, name);
        }
        self.node.subscription_removed(app_id, name).await;
        if !presence {
            return;
        }
        let socket = self.handle.socket_id.to_string();
        match self.node.presence.leave(app_id, name, &socket).await {
            Ok(Some(member)) => {
                self.app.metrics.presence_members.decrement(1.0);
                let data = Encode::member_removed_data(&member.user_id_json);
                let envelope =
                    Envelope::event(app_id, name, "pusher_internal:member_removed", data);
                if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                    tracing::warn!(error = %e, "member_removed not published");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "presence leave failed"),
        }
    }

    async fn leave_all(&self, session: &mut Session) {
        if let Some(user_id) = session.user_id() {
            self.app.remove_user(user_id, self.handle.socket_id);
        }
        for (channel, Joined { presence_user }) in session.take_channels() {
            let presence = presence_user.is_some() && channel.kind() == ChannelKind::Presence;
            self.leave(&channel, presence).await;
        }
    }
}
