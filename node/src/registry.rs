//! What this node knows and may lose: which local sockets are on which
//! channel, which sockets belong to which signed-in user, and how many
//! connections each app has here.
//!
//! It is also where the bus hands envelopes in: one frame is encoded per
//! envelope and the same bytes are queued to every local subscriber. Channel
//! maps are sharded and only ever locked without an `.await` inside.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use belfry_coordinator::{Delivery, Envelope, EnvelopeKind};
use parking_lot::{Mutex, RwLock};
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::config::AppConfig;
use crate::outbox::{ConnHandle, Queued};
use crate::protocol::frame::Encode;
use crate::protocol::{code, SocketId};
use crate::telemetry::AppMetrics;

const SHARDS: usize = 16;

/// The internal presence channel of signed-in users, per app: its member
/// events drive watchlists. Clients cannot name it (`#` is reserved).
pub const ONLINE_CHANNEL: &str = "#online";

type Subscribers = HashMap<SocketId, ConnHandle>;
/// One shard of an app's channels: channel name -> local subscribers.
type Shard = RwLock<HashMap<Box<str>, Subscribers>>;

/// One app's local state.
pub struct AppRegistry {
    pub config: Arc<AppConfig>,
    pub metrics: Arc<AppMetrics>,
    shards: Box<[Shard]>,
    hasher: std::collections::hash_map::RandomState,
    users: Mutex<HashMap<String, Vec<ConnHandle>>>,
    /// user_id -> connections watching that user (signin watchlists).
    watchers: Mutex<HashMap<String, Vec<ConnHandle>>>,
    connections: AtomicUsize,
    channels: AtomicUsize,
}

/// What a subscriber count query needs to know about one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub subscriptions: usize,
}

impl AppRegistry {
    fn new(config: AppConfig) -> Self {
        Self {
            metrics: Arc::new(AppMetrics::new(&config.id)),
            config: Arc::new(config),
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            hasher: Default::default(),
            users: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
            channels: AtomicUsize::new(0),
        }
    }

    fn shard(&self, channel: &str) -> &Shard {
        &self.shards[self.hasher.hash_one(channel) as usize % SHARDS]
    }

    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Counts a new connection unless the app is at its limit.
    pub fn try_open_connection(&self) -> bool {
        let max = self.config.max_connections;
        let admitted = self
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (max == 0 || n < max).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.metrics.opened.increment(1);
            self.metrics.connections.increment(1.0);
        }
        admitted
    }

    pub fn close_connection(&self, reason: &'static str) {
        self.connections.fetch_sub(1, Ordering::AcqRel);
        self.metrics.connections.decrement(1.0);
        self.metrics.closed(reason);
    }

    /// Adds a subscriber and queues `first` to it under the channel's lock, so
    /// no event can overtake `subscription_succeeded`. Returns true when the
    /// channel had no local subscriber before.
    pub fn add_subscriber(&self, channel: &str, handle: ConnHandle, first: &[Utf8Bytes]) -> bool {
        let mut shard = self.shard(channel).write();
        for frame in first {
            // Flushed by the caller, outside the lock.
            handle.outbox.queue(frame.as_str());
        }
        let subscribers = shard.entry(channel.into()).or_default();
        let was_empty = subscribers.is_empty();
        subscribers.insert(handle.socket_id, handle);
        if was_empty {
            self.channels.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .channels
                .set(self.channels.load(Ordering::Relaxed) as f64);
        }
        was_empty
    }

    /// Removes a subscriber; returns true when the channel has no local
    /// subscriber left (time to unsubscribe from the bus).
    pub fn remove_subscriber(&self, channel: &str, socket_id: SocketId) -> bool {
        let mut shard = self.shard(channel).write();
        let Some(subscribers) = shard.get_mut(channel) else {
            return false;
        };
        if subscribers.remove(&socket_id).is_none() {
            return false;
        }
        if subscribers.is_empty() {
            shard.remove(channel);
            self.channels.fetch_sub(1, Ordering::Relaxed);
            self.metrics
                .channels
                .set(self.channels.load(Ordering::Relaxed) as f64);
            return true;
        }
        false
    }

    /// Queues `frame` to every local subscriber of `channel` but `exclude`,
    /// adding those that need a flush to `to_flush`. Returns how many got it.
    pub fn fan_out(
        &self,
        channel: &str,
        frame: &str,
        exclude: Option<SocketId>,
        to_flush: &mut Vec<ConnHandle>,
    ) -> usize {
        let shard = self.shard(channel).read();
        let Some(subscribers) = shard.get(channel) else {
            return 0;
        };
        let mut sent = 0;
        for (id, handle) in subscribers {
            if Some(*id) == exclude {
                continue;
            }
            match handle.outbox.queue(frame) {
                Queued::NeedsFlush => {
                    to_flush.push(handle.clone());
                    sent += 1;
                }
                Queued::Pending => sent += 1,
                Queued::Dropped => {}
            }
        }
        sent
    }

    pub fn occupancy(&self, channel: &str) -> Occupancy {
        Occupancy {
            subscriptions: self
                .shard(channel)
                .read()
                .get(channel)
                .map_or(0, |s| s.len()),
        }
    }

    /// Every occupied channel with its local subscription count.
    pub fn channels(&self) -> Vec<(String, Occupancy)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            for (name, subs) in shard.read().iter() {
                out.push((
                    name.to_string(),
                    Occupancy {
                        subscriptions: subs.len(),
                    },
                ));
            }
        }
        out
    }

    pub fn add_user(&self, user_id: &str, handle: ConnHandle) {
        self.users
            .lock()
            .entry(user_id.to_owned())
            .or_default()
            .push(handle);
    }

    pub fn remove_user(&self, user_id: &str, socket_id: SocketId) {
        let mut users = self.users.lock();
        if let Some(handles) = users.get_mut(user_id) {
            handles.retain(|h| h.socket_id != socket_id);
            if handles.is_empty() {
                users.remove(user_id);
            }
        }
    }

    pub fn add_watcher(&self, watchlist: &[String], handle: &ConnHandle) {
        let mut watchers = self.watchers.lock();
        for user in watchlist {
            watchers
                .entry(user.clone())
                .or_default()
                .push(handle.clone());
        }
    }

    pub fn remove_watcher(&self, watchlist: &[String], socket_id: SocketId) {
        let mut watchers = self.watchers.lock();
        for user in watchlist {
            if let Some(handles) = watchers.get_mut(user) {
                handles.retain(|h| h.socket_id != socket_id);
                if handles.is_empty() {
                    watchers.remove(user);
                }
            }
        }
    }

    /// Tells this node's watchers of `user_id` that the user came or went.
    fn notify_watchers(&self, user_id: &str, name: &str) {
        let handles = self
            .watchers
            .lock()
            .get(user_id)
            .cloned()
            .unwrap_or_default();
        if handles.is_empty() {
            return;
        }
        let frame = Encode::watchlist_event(name, &[user_id.to_owned()]);
        for handle in handles {
            handle.send(frame.as_str());
        }
    }

    /// Closes every local connection of a signed-in user.
    pub fn terminate_user(&self, user_id: &str) -> usize {
        let handles = self.users.lock().get(user_id).cloned().unwrap_or_default();
        for handle in &handles {
            handle.close(
                code::UNAUTHORIZED,
                "Connection terminated by the server",
                "terminated",
            );
        }
        handles.len()
    }
}

/// Every app's local state, by id and by key.
pub struct Registry {
    by_id: HashMap<String, Arc<AppRegistry>>,
    by_key: HashMap<String, Arc<AppRegistry>>,
    /// Envelopes on their way to the fan-out tasks, one per core; a channel
    /// always goes to the same task, so its events keep their order.
    inbound: Vec<tokio::sync::mpsc::Sender<Envelope>>,
    hasher: std::collections::hash_map::RandomState,
}

/// Envelopes handled per fan-out round; each recipient is written once per round.
const ROUND: usize = 512;
/// Envelopes waiting per fan-out lane. When a lane is full, `deliver` waits:
/// the bus stops reading Redis and the HTTP API stops answering, so a burst
/// slows its publishers down instead of being dropped or growing memory.
const LANE_CAPACITY: usize = 8192;

impl Registry {
    /// Builds the registry and starts its fan-out task, which runs until
    /// the registry is dropped. Needs a Tokio runtime.
    pub fn new(apps: &[AppConfig]) -> Arc<Self> {
        let mut by_id = HashMap::new();
        let mut by_key = HashMap::new();
        for config in apps {
            let app = Arc::new(AppRegistry::new(config.clone()));
            by_id.insert(config.id.clone(), app.clone());
            by_key.insert(config.key.clone(), app);
        }
        let tasks = std::thread::available_parallelism().map_or(1, |n| n.get());
        let (inbound, receivers): (Vec<_>, Vec<_>) = (0..tasks)
            .map(|_| tokio::sync::mpsc::channel(LANE_CAPACITY))
            .unzip();
        let registry = Arc::new(Self {
            by_id,
            by_key,
            inbound,
            hasher: Default::default(),
        });
        for rx in receivers {
            tokio::spawn(fan_out_task(Arc::downgrade(&registry), rx));
        }
        registry
    }

    /// Fans out one envelope, queueing to local subscribers.
    fn dispatch(&self, envelope: Envelope, to_flush: &mut Vec<ConnHandle>) {
        let Some(app) = self.by_id.get(&envelope.app) else {
            return;
        };
        match envelope.kind {
            EnvelopeKind::Event if envelope.channel == ONLINE_CHANNEL => {
                // Who is online: member events of the internal channel become
                // watchlist events for the users' watchers.
                let name = match envelope.event.as_str() {
                    "pusher_internal:member_added" => "online",
                    "pusher_internal:member_removed" => "offline",
                    _ => return,
                };
                let user = serde_json::from_str::<serde_json::Value>(&envelope.data)
                    .ok()
                    .and_then(|v| v.get("user_id").cloned());
                if let Some(serde_json::Value::String(user_id)) = user {
                    app.notify_watchers(&user_id, name);
                }
            }
            EnvelopeKind::Event => {
                let frame = Encode::event_with_user(
                    &envelope.event,
                    Some(&envelope.channel),
                    &envelope.data,
                    envelope.user_id.as_deref(),
                );
                let exclude = envelope.socket_id.as_deref().and_then(SocketId::parse);
                let sent = app.fan_out(&envelope.channel, frame.as_str(), exclude, to_flush);
                app.metrics.delivered(sent, frame.len(), envelope.ts_us);
            }
            EnvelopeKind::Terminate => {
                if let Some(user_id) = &envelope.user_id {
                    app.terminate_user(user_id);
                }
            }
        }
    }

    pub fn by_id(&self, id: &str) -> Option<&Arc<AppRegistry>> {
        self.by_id.get(id)
    }

    pub fn by_key(&self, key: &str) -> Option<&Arc<AppRegistry>> {
        self.by_key.get(key)
    }

    pub fn apps(&self) -> impl Iterator<Item = &Arc<AppRegistry>> {
        self.by_id.values()
    }

    pub fn total_connections(&self) -> usize {
        self.by_id.values().map(|a| a.connections()).sum()
    }
}

impl Delivery for Registry {
    /// Hands the envelope to its channel's fan-out task, waiting while that
    /// task's lane is full.
    fn deliver(&self, envelope: Envelope) -> futures_util::future::BoxFuture<'_, ()> {
        let lane = if self.inbound.len() == 1 {
            0
        } else {
            self.hasher.hash_one((&envelope.app, &envelope.channel)) as usize % self.inbound.len()
        };
        // A send fails only once the fan-out task is gone (shutdown).
        Box::pin(async move {
            let _ = self.inbound[lane].send(envelope).await;
        })
    }
}

/// Takes every envelope waiting, queues each to its subscribers, then writes
/// each touched connection once: under load a socket gets many frames per
/// write, which is what lets one core serve millions of deliveries a second.
async fn fan_out_task(
    registry: std::sync::Weak<Registry>,
    mut inbound: tokio::sync::mpsc::Receiver<Envelope>,
) {
    let mut batch = Vec::with_capacity(ROUND);
    let mut to_flush = Vec::new();
    while inbound.recv_many(&mut batch, ROUND).await > 0 {
        let Some(registry) = registry.upgrade() else {
            return;
        };
        for envelope in batch.drain(..) {
            registry.dispatch(envelope, &mut to_flush);
        }
        drop(registry);
        for handle in to_flush.drain(..) {
            handle.outbox.flush();
        }
        // Let the connections' own tasks run between rounds.
        tokio::task::yield_now().await;
    }
}
