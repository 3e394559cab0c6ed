//! One client's WebSocket, from `connection_established` to close.
//!
//! A single task owns the socket's reading: it decodes frames, feeds the
//! text to the `Session` and carries out the actions that come back. Writes
//! go through the connection's `Outbox`, which fan-outs fill directly; this
//! task only finishes a write when the socket was full, and closes the
//! socket when asked (slow consumer, terminate, drain). Silent sockets are
//! pinged and closed with 4201.

use std::cell::RefCell;
use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::tls::Socket;
use belfry_coordinator::webhook::Job;
use belfry_coordinator::{Envelope, PresenceError, PresenceMember};
use bytes::Bytes;

use crate::node::Node;
use crate::outbox::{ConnHandle, Outbox};
use crate::protocol::frame::Encode;
use crate::protocol::session::{Cache, Completion, JoinOutcome, Joined, PresenceJoin, Tick};
use crate::protocol::{code, Action, ChannelKind, ChannelName, Session, SocketId};
use crate::registry::{AppRegistry, ONLINE_CHANNEL};
use crate::websocket::{self, Decoder, Incoming, Violation};

/// How long a closing handshake may take before the socket is dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Read buffer shared by the connections of one worker thread, so an idle
/// connection owns no read buffer of its own.
const SCRATCH: usize = 16 * 1024;

thread_local! {
    static SCRATCH_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; SCRATCH]);
}

/// What one read produced.
enum Read {
    Data,
    WouldBlock,
    Eof,
    Violation(Violation),
}

/// Reads what the socket has and decodes it into `out`.
fn read_into(stream: &Socket, decoder: &mut Decoder, max: usize, out: &mut Vec<Incoming>) -> Read {
    SCRATCH_BUF.with(|buf| {
        let mut buf = buf.borrow_mut();
        match stream.try_read(&mut buf) {
            Ok(0) => Read::Eof,
            Ok(n) => match decoder.feed(&buf[..n], max, out) {
                Ok(()) => Read::Data,
                Err(v) => Read::Violation(v),
            },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Read::WouldBlock,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Read::WouldBlock,
            Err(_) => Read::Eof,
        }
    })
}

/// After the close frame went out: wait briefly for the client's close (or
/// EOF) so the close code is not lost to a TCP reset, then drop the socket.
async fn linger(stream: &Socket, outbox: &Outbox) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, async {
        let mut decoder = Decoder::default();
        let mut sink = Vec::new();
        loop {
            if outbox.has_pending() {
                if stream.writable().await.is_err() {
                    return;
                }
                outbox.write_remaining();
                continue;
            }
            if stream.readable().await.is_err() {
                return;
            }
            match read_into(stream, &mut decoder, usize::MAX, &mut sink) {
                Read::Eof | Read::Violation(_) => return,
                Read::WouldBlock => {}
                Read::Data => {
                    if sink.contains(&Incoming::Close) {
                        return;
                    }
                    sink.clear();
                }
            }
        }
    })
    .await;
}

/// Refuses a connection that was upgraded only to be told why: the
/// `pusher:error` frame, then the matching close code.
pub async fn refuse(stream: Socket, code: u16, message: &str) {
    let stream = Arc::new(stream);
    let outbox = Outbox::new(&stream, 4, None);
    outbox.finish(code, message);
    linger(&stream, &outbox).await;
}

/// Why a connection ended, for the log and the closed-connections counter.
enum End {
    Client,
    Error,
    Closed(u16, String, &'static str),
}

/// Runs an accepted connection to its end. `early` holds bytes the client
/// sent right behind its handshake.
///
/// Not an `async fn`: everything that is needed only to start (the socket
/// before it is shared, `early`, the app's timings) is used here, before the
/// future exists, so none of it takes room in the state every idle
/// connection keeps for its whole life (docs/benchmarks.md, idle memory).
pub fn run(
    node: Arc<Node>,
    app: Arc<AppRegistry>,
    stream: Socket,
    early: Bytes,
) -> impl std::future::Future<Output = ()> + Send {
    let stream = Arc::new(stream);
    let socket_id = SocketId::random();
    let outbox = Arc::new(Outbox::new(
        &stream,
        node.config.send_queue_frames,
        Some(app.metrics.clone()),
    ));
    let handle = ConnHandle {
        socket_id,
        outbox,
        shard: node.registry.assign_shard(),
    };
    let session = Session::new(socket_id, app.config.clone(), Instant::now());
    node.track(handle.clone());
    handle.send(
        Encode::connection_established(&socket_id.to_string(), app.config.activity_timeout)
            .as_str(),
    );
    let mut decoder = Decoder::default();
    let mut incoming = Vec::new();
    let mut early_end = None;
    if !early.is_empty() {
        if let Err(v) = decoder.feed(&early, app.config.max_message_bytes, &mut incoming) {
            early_end = Some(Box::new(violation(v, app.config.max_message_bytes)));
        }
    }
    // `early` may share hyper's whole read buffer; it is dropped here, so
    // it pins nothing to an idle connection.
    drop(early);
    let conn = Conn {
        node,
        app,
        handle,
        online_held: AtomicBool::new(false),
    };
    serve(conn, stream, session, decoder, incoming, early_end)
}

/// The connection's life past its start. An `async` block, not an `async
/// fn`, so its inputs are held once (an `async fn` keeps its arguments and
/// a moved copy of each).
#[allow(clippy::manual_async_fn)]
fn serve(
    conn: Conn,
    stream: Arc<Socket>,
    mut session: Session,
    mut decoder: Decoder,
    mut incoming: Vec<Incoming>,
    early_end: Option<Box<End>>,
) -> impl std::future::Future<Output = ()> + Send {
    async move {
        let deadline = |session: &Session| tokio::time::Instant::from_std(session.deadline());
        let mut idle = std::pin::pin!(tokio::time::sleep_until(deadline(&session)));
        // `end` is used up (in this block) before anything is awaited, so it
        // takes no room beside the loop's state.
        let (reason, close_handshake) = {
            let end = match early_end {
                Some(end) => *end,
                None => loop {
                    let mut closed = false;
                    for message in incoming.drain(..) {
                        match message {
                            Incoming::Text(text) => {
                                conn.app.metrics.messages_in.increment(1);
                                conn.app.metrics.bytes_in.increment(text.len() as u64);
                                let limited = session.rate_limited();
                                let actions = session.on_text(&text, Instant::now());
                                if session.rate_limited() > limited {
                                    conn.app.metrics.client_event_rate_limited.increment(1);
                                }
                                // Boxed: acting on a frame needs a large future, and
                                // an idle connection should not carry it.
                                Box::pin(conn.carry_out(&mut session, actions)).await;
                            }
                            Incoming::Binary => conn.handle.send(
                                Encode::error(
                                    None,
                                    "Binary frames are not part of the Pusher protocol",
                                )
                                .as_str(),
                            ),
                            Incoming::Ping(payload) => {
                                let outbox = &conn.handle.outbox;
                                if outbox.queue_frame(websocket::OP_PONG, &payload)
                                    == crate::outbox::Queued::NeedsFlush
                                {
                                    outbox.flush();
                                }
                            }
                            Incoming::Pong => {}
                            Incoming::Close => {
                                closed = true;
                                break;
                            }
                        }
                    }
                    // An idle connection should not keep the frame list's buffer.
                    incoming.shrink_to_fit();
                    if closed {
                        break End::Client;
                    }
                    let outbox = &conn.handle.outbox;
                    if let Some(close) = outbox.close_request() {
                        break End::Closed(close.code, close.message, close.reason);
                    }
                    let blocked = outbox.is_blocked();
                    tokio::select! {
                        biased;
                        _ = outbox.wake.notified() => {}
                        ready = stream.writable(), if blocked => {
                            if ready.is_err() {
                                break End::Error;
                            }
                            outbox.resume();
                        }
                        ready = stream.readable() => {
                            if ready.is_err() {
                                break End::Error;
                            }
                            let max = conn.app.config.max_message_bytes;
                            match read_into(&stream, &mut decoder, max, &mut incoming) {
                                // Only a whole frame counts as activity: a frame
                                // trickled byte by byte must not keep a socket alive.
                                Read::Data if !incoming.is_empty() => {
                                    session.on_activity(Instant::now());
                                    idle.as_mut().reset(deadline(&session));
                                }
                                Read::Data | Read::WouldBlock => {}
                                Read::Eof => break End::Error,
                                Read::Violation(v) => break violation(v, max),
                            }
                        }
                        _ = &mut idle => {
                            match session.on_tick(Instant::now()) {
                                Tick::Ping(frame) => conn.handle.send(frame.as_str()),
                                Tick::Close(code, message) => break End::Closed(code, message, "ping_timeout"),
                                Tick::Wait => {}
                            }
                            idle.as_mut().reset(deadline(&session));
                        }
                    }
                },
            };

            match end {
                End::Closed(code, message, reason) => {
                    conn.handle.outbox.finish(code, &message);
                    (reason, true)
                }
                End::Client => {
                    conn.handle.outbox.finish(1000, "");
                    ("client", false)
                }
                End::Error => ("error", false),
            }
        };
        if close_handshake {
            Box::pin(linger(&stream, &conn.handle.outbox)).await;
        }
        Box::pin(conn.leave_all(&mut session)).await;
        let socket_id = conn.handle.socket_id;
        conn.node.untrack(socket_id);
        conn.node.release(&conn.app, reason);
        tracing::debug!(app = %conn.app.config.id, socket_id = %socket_id, reason, "connection closed");
    }
}

fn violation(v: Violation, max: usize) -> End {
    match v {
        Violation::TooBig => End::Closed(
            code::TOO_BIG,
            format!("Message larger than {max} bytes"),
            "too_large",
        ),
        Violation::NotUtf8 => End::Closed(v.code(), "Text frame is not UTF-8".into(), "error"),
        Violation::Protocol(why) => End::Closed(
            v.code(),
            format!("WebSocket protocol error: {why}"),
            "error",
        ),
    }
}

/// The parts of a connection that actions need.
struct Conn {
    node: Arc<Node>,
    app: Arc<AppRegistry>,
    handle: ConnHandle,
    /// Whether this connection holds the hub's `#online` channel.
    online_held: AtomicBool,
}

impl Conn {
    async fn carry_out(&self, session: &mut Session, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Send(frame) => self.handle.send(frame.as_str()),
                Action::Subscribe { channel, member } => {
                    let outcome = self.join(&channel, member.as_ref()).await;
                    match session.on_joined(&channel, member, outcome) {
                        Ok(done) => self.complete(&channel, done).await,
                        Err(frame) => self.handle.send(frame.as_str()),
                    }
                }
                Action::Unsubscribe { channel, presence } => self.leave(&channel, presence).await,
                Action::ClientEvent {
                    channel,
                    event,
                    data,
                    user_id,
                } => {
                    let socket_id = self.handle.socket_id.to_string();
                    let mut envelope =
                        Envelope::event(&self.app.config.id, channel.as_str(), &event, data);
                    envelope.socket_id = Some(socket_id);
                    envelope.user_id = user_id;
                    self.app.metrics.client_events.increment(1);
                    // The webhook needs the event after the bus took it, and
                    // only if it did: keep a copy only when a URL wants it.
                    let hook = self
                        .node
                        .wants_webhook(&self.app.config.id, "client_event", channel.as_str())
                        .then(|| envelope.clone());
                    match self.node.bus.publish(vec![envelope]).await {
                        Ok(_) => {
                            if let Some(e) = hook {
                                self.node.client_event_webhook(
                                    &e.app,
                                    &e.channel,
                                    &e.event,
                                    &e.data,
                                    e.socket_id.as_deref().unwrap_or_default(),
                                    e.user_id.as_deref(),
                                );
                            }
                        }
                        Err(e) => {
                            let message = format!("Client event not delivered: {e}");
                            self.handle.send(Encode::error(None, &message).as_str());
                        }
                    }
                }
                Action::SignedIn {
                    user_id,
                    previous,
                    watchlist,
                    previous_watchlist,
                } => {
                    if let Some(previous) = previous {
                        self.app.remove_user(&previous, self.handle.socket_id);
                        self.app
                            .remove_watcher(&previous_watchlist, self.handle.socket_id);
                        self.went_offline().await;
                    }
                    self.app.add_user(&user_id, self.handle.clone());
                    self.app.add_watcher(&watchlist, &self.handle);
                    self.came_online(&user_id, watchlist).await;
                }
            }
        }
    }

    /// Carries out a subscription: the hub first (it answers once the bus
    /// confirmed, so nothing published after `subscription_succeeded` can be
    /// missed), then presence, the occupancy count and the cache. Every
    /// failure after the hub gives back what was taken. What the client is
    /// told is the session's to decide (`Session::on_joined`).
    async fn join(&self, channel: &ChannelName, member: Option<&PresenceMember>) -> JoinOutcome {
        let app_id = self.app.config.id.as_str();
        let name = channel.as_str();
        // Holds the channel from here on; on an error the hub gave it back.
        if let Err(e) = self.node.hub.join(app_id, name).await {
            return JoinOutcome::Unavailable(e.to_string());
        }
        let mut presence = None;
        if let Some(member) = member {
            let socket = self.handle.socket_id.to_string();
            let max = self.app.config.max_presence_members;
            let joined = self
                .node
                .presence
                .join(app_id, name, &socket, member.clone(), max)
                .await;
            match joined {
                Ok(j) => {
                    if j.user_added {
                        self.app.metrics.presence_members.increment(1.0);
                    }
                    presence = Some(PresenceJoin {
                        members: j.members,
                        user_added: j.user_added,
                    });
                }
                Err(e) => {
                    self.node.hub.leave(app_id, name);
                    return match e {
                        PresenceError::Full(max) => JoinOutcome::Full(max),
                        e => JoinOutcome::Unavailable(e.to_string()),
                    };
                }
            }
        }
        if let Err(e) = self.node.subscription_added(app_id, name).await {
            // This socket's presence entry goes whether or not its user was
            // new: left behind, a second tab's entry would be refreshed for
            // as long as the node lives and keep the user listed.
            if let Some(p) = &presence {
                self.rollback_presence(name, p.user_added).await;
            }
            self.node.hub.leave(app_id, name);
            return JoinOutcome::Unavailable(e.to_string());
        }
        let cache = if channel.is_cache() {
            match self.node.bus.cached(app_id, name).await {
                Ok(Some(e)) => Cache::Hit {
                    event: e.event,
                    data: e.data,
                    user_id: e.user_id,
                },
                Ok(None) => Cache::Miss,
                Err(e) => {
                    tracing::warn!(error = %e, "cache lookup failed; sending cache_miss");
                    Cache::Miss
                }
            }
        } else {
            Cache::None
        };
        JoinOutcome::Joined { presence, cache }
    }

    /// Takes the connection's place on the channel with its first frames,
    /// then announces a new member.
    async fn complete(&self, channel: &ChannelName, done: Completion) {
        let app_id = self.app.config.id.as_str();
        let name = channel.as_str();
        if done.cache_miss {
            self.node.webhook(Job::new(app_id, name, "cache_miss"));
        }
        self.app
            .add_subscriber(name, self.handle.clone(), &done.first);
        self.handle.outbox.flush();
        if let Some(member) = done.member_added {
            let mut envelope = Envelope::member_added(
                app_id,
                name,
                &member.user_id_json,
                member.user_info.as_deref(),
            );
            envelope.socket_id = Some(self.handle.socket_id.to_string());
            if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                tracing::warn!(error = %e, "member_added not published");
            }
        }
    }

    /// Undoes a presence join whose subscription could not complete.
    /// Unless `user_added` (then no one heard of the user yet), the others
    /// knew the user from another tab: if that tab left meanwhile and this
    /// socket was the last, they are told the user left.
    async fn rollback_presence(&self, channel: &str, user_added: bool) {
        let app_id = self.app.config.id.as_str();
        let socket = self.handle.socket_id.to_string();
        if let Ok(Some(member)) = self.node.presence.leave(app_id, channel, &socket).await {
            self.app.metrics.presence_members.decrement(1.0);
            if !user_added {
                let envelope = Envelope::member_removed(app_id, channel, &member.user_id_json);
                if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                    tracing::warn!(error = %e, "member_removed not published");
                }
            }
        }
    }

    async fn leave(&self, channel: &ChannelName, presence: bool) {
        let app_id = self.app.config.id.as_str();
        let name = channel.as_str();
        self.app.remove_subscriber(name, &self.handle);
        self.node.hub.leave(app_id, name);
        self.node.subscription_removed(app_id, name).await;
        if !presence {
            return;
        }
        let socket = self.handle.socket_id.to_string();
        match self.node.presence.leave(app_id, name, &socket).await {
            Ok(Some(member)) => {
                self.app.metrics.presence_members.decrement(1.0);
                let envelope = Envelope::member_removed(app_id, name, &member.user_id_json);
                if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                    tracing::warn!(error = %e, "member_removed not published");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "presence leave failed"),
        }
    }

    /// A signed-in user is online while any connection of theirs is, across
    /// the cluster: the internal `#online` presence channel counts them, and
    /// its member events tell watchers. A new watcher first hears which of
    /// its watched users are online already.
    async fn came_online(&self, user_id: &str, watchlist: Vec<String>) {
        let app_id = self.app.config.id.as_str();
        // One hold per signed-in connection, kept across a second signin.
        if !self.online_held.load(Ordering::Relaxed) {
            match self.node.hub.join(app_id, ONLINE_CHANNEL).await {
                Ok(()) => self.online_held.store(true, Ordering::Relaxed),
                Err(e) => tracing::warn!(error = %e, "watchlist events unavailable for now"),
            }
        }
        let member = PresenceMember {
            user_id: user_id.to_owned(),
            user_id_json: serde_json::Value::String(user_id.to_owned()).to_string(),
            user_info: None,
        };
        let socket = self.handle.socket_id.to_string();
        match self
            .node
            .presence
            .track(app_id, ONLINE_CHANNEL, &socket, member.clone())
            .await
        {
            Ok(true) => {
                let envelope =
                    Envelope::member_added(app_id, ONLINE_CHANNEL, &member.user_id_json, None);
                if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                    tracing::warn!(error = %e, "online event not published");
                }
            }
            Ok(false) => {}
            Err(e) => tracing::warn!(error = %e, "online status not recorded"),
        }
        if watchlist.is_empty() {
            return;
        }
        match self
            .node
            .presence
            .present(app_id, ONLINE_CHANNEL, watchlist)
            .await
        {
            Ok(online) if !online.is_empty() => {
                self.handle
                    .send(Encode::watchlist_event("online", &online).as_str());
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "watchlist status unavailable"),
        }
    }

    /// This connection's user is no longer signed in on it.
    async fn went_offline(&self) {
        let app_id = self.app.config.id.as_str();
        let socket = self.handle.socket_id.to_string();
        match self
            .node
            .presence
            .leave(app_id, ONLINE_CHANNEL, &socket)
            .await
        {
            Ok(Some(member)) => {
                let envelope =
                    Envelope::member_removed(app_id, ONLINE_CHANNEL, &member.user_id_json);
                if let Err(e) = self.node.bus.publish(vec![envelope]).await {
                    tracing::warn!(error = %e, "offline event not published");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "online status not cleared"),
        }
    }

    async fn leave_all(&self, session: &mut Session) {
        if let Some(user_id) = session.user_id() {
            self.app.remove_user(user_id, self.handle.socket_id);
            self.app
                .remove_watcher(session.watchlist(), self.handle.socket_id);
            self.went_offline().await;
        }
        if self.online_held.swap(false, Ordering::Relaxed) {
            self.node.hub.leave(&self.app.config.id, ONLINE_CHANNEL);
        }
        for (channel, Joined { presence_user }) in session.take_channels() {
            let presence = presence_user.is_some() && channel.kind() == ChannelKind::Presence;
            self.leave(&channel, presence).await;
        }
    }
}
