//! What this node knows and may lose: which local sockets are on which
//! channel, which sockets belong to which signed-in user, and how many
//! connections each app has here.
//!
//! Subscriber lists are split by fan-out shard (`fanout.rs`): a connection
//! belongs to one shard, and its subscriptions live in that shard's table,
//! so shards fan one channel out in parallel without sharing a list. A
//! node-wide count per channel answers occupancy queries. Tables are only
//! ever locked without an `.await` inside.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use belfry_coordinator::{Delivery, Envelope};
use parking_lot::Mutex;
use tokio_tungstenite::tungstenite::Utf8Bytes;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::AppConfig;
use crate::fanout::FanOut;
use crate::outbox::{ConnHandle, Queued};
use crate::protocol::frame::Encode;
use crate::protocol::{code, SocketId};
use crate::telemetry::AppMetrics;

pub use crate::protocol::watchlist::ONLINE_CHANNEL;

/// One channel's subscribers in one shard: a list to walk, and, once the
/// list is long, an index to remove from it in constant time (most channels
/// have a handful of subscribers, and an index would double their memory).
#[derive(Default)]
pub struct Subscribers {
    list: Vec<ConnHandle>,
    /// Boxed: most lists never get one, and every channel entry carries it
    /// (48 bytes inline against 8).
    #[allow(clippy::box_collection)]
    index: Option<Box<HashMap<SocketId, usize>>>,
}

/// Lists longer than this get an index.
const INDEX_FROM: usize = 64;

impl Subscribers {
    fn position(&self, socket_id: SocketId) -> Option<usize> {
        match &self.index {
            Some(index) => index.get(&socket_id).copied(),
            None => self.list.iter().position(|h| h.socket_id == socket_id),
        }
    }

    fn insert(&mut self, handle: ConnHandle) -> bool {
        if self.position(handle.socket_id).is_some() {
            return false;
        }
        if let Some(index) = &mut self.index {
            index.insert(handle.socket_id, self.list.len());
        }
        if self.list.capacity() == 0 {
            // Most channels hold one socket on a node; the default first
            // growth would reserve four.
            self.list.reserve_exact(1);
        }
        self.list.push(handle);
        if self.index.is_none() && self.list.len() > INDEX_FROM {
            let index = self
                .list
                .iter()
                .enumerate()
                .map(|(at, h)| (h.socket_id, at))
                .collect();
            self.index = Some(Box::new(index));
        }
        true
    }

    fn remove(&mut self, socket_id: SocketId) -> bool {
        let Some(at) = self.position(socket_id) else {
            return false;
        };
        self.list.swap_remove(at);
        if let Some(index) = &mut self.index {
            index.remove(&socket_id);
            if let Some(moved) = self.list.get(at) {
                index.insert(moved.socket_id, at);
            }
            if self.list.len() < INDEX_FROM / 2 {
                self.index = None;
            }
        }
        true
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConnHandle> {
        self.list.iter()
    }

    fn is_empty(&self) -> bool {
        self.list.is_empty()
    }
}

/// One shard's channels of one app: channel name -> its subscribers there.
pub type Table = Mutex<HashMap<Box<str>, Subscribers>>;

/// One app's local state.
pub struct AppRegistry {
    pub config: Arc<AppConfig>,
    pub metrics: Arc<AppMetrics>,
    /// One table per fan-out shard, indexed by `ConnHandle::shard`.
    tables: Box<[Table]>,
    /// Local subscriptions per channel, over all shards.
    counts: Mutex<HashMap<Box<str>, usize>>,
    users: Mutex<HashMap<String, Vec<ConnHandle>>>,
    /// user_id -> connections watching that user (signin watchlists).
    watchers: Mutex<HashMap<String, Vec<ConnHandle>>>,
    connections: AtomicUsize,
}

/// What a subscriber count query needs to know about one channel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Occupancy {
    pub subscriptions: usize,
}

impl AppRegistry {
    fn new(config: AppConfig, shards: usize) -> Self {
        Self {
            metrics: Arc::new(AppMetrics::new(&config.id)),
            config: Arc::new(config),
            tables: (0..shards).map(|_| Mutex::new(HashMap::new())).collect(),
            counts: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            watchers: Mutex::new(HashMap::new()),
            connections: AtomicUsize::new(0),
        }
    }

    /// The subscriber table of one fan-out shard.
    pub fn table(&self, shard: usize) -> &Table {
        &self.tables[shard % self.tables.len()]
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

    /// Adds a subscriber and sends `first` to it under its shard's lock, so
    /// no event can overtake `subscription_succeeded`. Returns true when the
    /// channel had no local subscriber before.
    pub fn add_subscriber(&self, channel: &str, handle: ConnHandle, first: &[Utf8Bytes]) -> bool {
        {
            let mut table = self.table(handle.shard).lock();
            for frame in first {
                // Written now, under the lock, so no event can come first;
                // with nothing queued the frame goes out from a scratch
                // buffer and the socket keeps no write buffer while idle.
                handle.outbox.send(frame.as_str());
            }
            if !table.entry(channel.into()).or_default().insert(handle) {
                return false;
            }
        }
        let mut counts = self.counts.lock();
        let count = counts.entry(channel.into()).or_default();
        *count += 1;
        let first = *count == 1;
        if first {
            self.metrics.channels.set(counts.len() as f64);
        }
        first
    }

    /// Removes a subscriber; returns true when the channel has no local
    /// subscriber left.
    pub fn remove_subscriber(&self, channel: &str, handle: &ConnHandle) -> bool {
        {
            let mut table = self.table(handle.shard).lock();
            let Some(subscribers) = table.get_mut(channel) else {
                return false;
            };
            if !subscribers.remove(handle.socket_id) {
                return false;
            }
            if subscribers.is_empty() {
                table.remove(channel);
            }
        }
        let mut counts = self.counts.lock();
        let Some(count) = counts.get_mut(channel) else {
            return false;
        };
        *count -= 1;
        if *count > 0 {
            return false;
        }
        counts.remove(channel);
        self.metrics.channels.set(counts.len() as f64);
        true
    }

    /// Queues an already framed event to every subscriber of `channel` in
    /// `shard` but `exclude`. Connections that need a write are pushed to
    /// `dirty`. Returns how many got the frame and the longest backlog seen
    /// (frames waiting for one socket's next write).
    pub fn fan_out(
        &self,
        shard: usize,
        channel: &str,
        framed: &[u8],
        exclude: Option<SocketId>,
        dirty: &mut impl Extend<ConnHandle>,
    ) -> (usize, usize) {
        let table = self.table(shard).lock();
        let Some(subscribers) = table.get(channel) else {
            return (0, 0);
        };
        let mut sent = 0;
        let mut backlog = 0;
        for handle in subscribers.iter() {
            if Some(handle.socket_id) == exclude {
                continue;
            }
            match handle.outbox.queue_framed(framed) {
                (Queued::NeedsFlush, _) => {
                    dirty.extend(Some(handle.clone()));
                    sent += 1;
                }
                (Queued::Pending, frames) => {
                    sent += 1;
                    backlog = backlog.max(frames);
                }
                (Queued::Dropped, _) => {}
            }
        }
        (sent, backlog)
    }

    /// Whether `shard` has a subscriber of `channel`.
    pub fn shard_has(&self, shard: usize, channel: &str) -> bool {
        self.table(shard).lock().contains_key(channel)
    }

    pub fn occupancy(&self, channel: &str) -> Occupancy {
        Occupancy {
            subscriptions: self.counts.lock().get(channel).copied().unwrap_or(0),
        }
    }

    /// Every occupied channel with its local subscription count.
    pub fn channels(&self) -> Vec<(String, Occupancy)> {
        self.counts
            .lock()
            .iter()
            .map(|(name, &subscriptions)| (name.to_string(), Occupancy { subscriptions }))
            .collect()
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
    pub(crate) fn notify_watchers(&self, user_id: &str, name: &str) {
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

/// Every app's local state, by id and by key, and the fan-out that
/// delivers envelopes to local subscribers.
pub struct Registry {
    by_id: HashMap<String, Arc<AppRegistry>>,
    by_key: HashMap<String, Arc<AppRegistry>>,
    fanout: FanOut,
    next_shard: AtomicUsize,
}

impl Registry {
    /// Builds the registry and starts one fan-out task per shard on `tasks`;
    /// they stop on `stop` or when the registry is dropped. Needs a Tokio
    /// runtime.
    pub fn new(
        apps: &[AppConfig],
        shards: usize,
        tasks: &TaskTracker,
        stop: &CancellationToken,
    ) -> Arc<Self> {
        let shards = shards.max(1);
        let mut by_id = HashMap::new();
        let mut by_key = HashMap::new();
        for config in apps {
            let app = Arc::new(AppRegistry::new(config.clone(), shards));
            by_id.insert(config.id.clone(), app.clone());
            by_key.insert(config.key.clone(), app);
        }
        Arc::new(Self {
            by_id,
            by_key,
            fanout: FanOut::start(shards, tasks, stop),
            next_shard: AtomicUsize::new(0),
        })
    }

    /// The shard a new connection joins: round robin, so every shard holds
    /// about the same share of each channel's subscribers.
    pub fn assign_shard(&self) -> usize {
        self.next_shard.fetch_add(1, Ordering::Relaxed) % self.fanout.shards()
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
    /// Hands the envelope to the fan-out, waiting while a shard it needs is
    /// full: the bus stops reading Redis and the HTTP API stops answering,
    /// so a burst slows its publishers down instead of being dropped.
    fn deliver(&self, envelope: Envelope) -> futures_util::future::BoxFuture<'_, ()> {
        Box::pin(async move {
            let Some(app) = self.by_id.get(&envelope.app) else {
                return;
            };
            self.fanout.deliver(app, envelope).await;
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Outbox;
    use crate::tls::Socket;

    #[tokio::test]
    async fn subscribers_stay_consistent_across_the_index_threshold() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let socket = Arc::new(Socket::Plain(stream));
        let handle = |i: u64| ConnHandle {
            socket_id: SocketId(i, i),
            outbox: Arc::new(Outbox::new(&socket, 8, None)),
            shard: 0,
        };
        let mut subs = Subscribers::default();
        let mut want: Vec<u64> = Vec::new();
        // Grow past the threshold, shrink below half of it, grow again; remove
        // in a scrambled order so swap_remove moves entries around.
        for round in 0..3u64 {
            for i in 0..150 {
                let id = round * 1000 + i;
                assert!(subs.insert(handle(id)));
                assert!(!subs.insert(handle(id)), "no duplicate of {id}");
                want.push(id);
            }
            let mut k = 7u64;
            for _ in 0..120 {
                k = (k * 31 + 17) % want.len() as u64;
                let id = want.swap_remove(k as usize);
                assert!(subs.remove(SocketId(id, id)), "{id} was there");
                assert!(!subs.remove(SocketId(id, id)), "{id} is gone");
            }
            let mut have: Vec<u64> = subs.iter().map(|h| h.socket_id.0).collect();
            have.sort_unstable();
            let mut sorted = want.clone();
            sorted.sort_unstable();
            assert_eq!(have, sorted, "round {round}");
        }
    }
}
