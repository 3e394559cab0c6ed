//! The Redis bus: one Redis pub/sub channel per Pusher channel, subscribed
//! only while this node has local subscribers on it, so an event reaches
//! only the nodes that need it.
//!
//! This module owns the node's Redis subscriptions: for each Redis channel
//! whether a local subscriber wants it, whether Redis confirmed it, and
//! whether a (S)SUBSCRIBE or (S)UNSUBSCRIBE for it is on the wire. A
//! subscriber waits until Redis confirmed its channel, so an event published
//! after `subscription_succeeded` cannot be missed; a want that arrives while
//! an unsubscribe is in flight subscribes again once it is answered.
//!
//! Messages are read by one task per Redis server (one on a single server,
//! one per primary on a Cluster) from a connection of its own
//! (`subscriber.rs`): it takes a message off the socket only after the
//! previous one was handed to the fan-out, so nothing is dropped between
//! Redis and the sockets. A dropped connection is logged, counted
//! (`belfry_bus_subscriber_disconnects_total`) and resubscribed; what was
//! published while it was down did not reach this node (docs/cluster.md).
//!
//! Publishing goes through `Publisher`, the one Redis publish path: a
//! publish is sent once and never retried, `Unavailable` means it was not
//! sent, `Unknown` that it may have been.
//!
//! Laravel's Redis broadcaster is read too: for apps with a
//! `laravel_redis_prefix`, the node also subscribes to `{prefix}{channel}`
//! and turns Laravel's `{"event","data","socket"}` into an envelope.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use futures_util::future::BoxFuture;
use parking_lot::{Mutex, RwLock};
use tokio::sync::{oneshot, Notify};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::subscriber::{self, Endpoint, Push, Reader, SubscriberError, Writer};
use super::{resp, Redis};
use crate::bus::{Bus, BusError, CacheTtl, Delivery};
use crate::envelope::Envelope;
use crate::keys::Keys;
use crate::publisher::{PublishError, Publisher};

/// How long a subscriber waits for Redis to confirm its channel.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long connecting and logging in may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most channels sent in one SUBSCRIBE or UNSUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 512;
/// A quiet connection is PINGed after this long, and given up on when
/// nothing at all came back for `DEAD_AFTER` (a silent network failure).
const PING_IDLE: Duration = Duration::from_secs(5);
const DEAD_AFTER: Duration = Duration::from_secs(15);
/// Reconnect backoff.
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Metric: subscriber connections lost (each one a window of missed events).
pub const DISCONNECTS_METRIC: &str = "belfry_bus_subscriber_disconnects_total";

/// One Redis channel's subscription on this node.
struct Subscription {
    /// A local subscriber wants this Redis channel.
    wanted: bool,
    /// Redis confirmed it and has not dropped or unsubscribed it since.
    live: bool,
    /// A (S)SUBSCRIBE or (S)UNSUBSCRIBE for it awaits its reply; the next
    /// one is decided when that reply comes, so the two never interleave.
    in_flight: bool,
    /// The server connection it belongs to (`None`: not routed yet, on a
    /// Cluster whose slot map is not known).
    shard: Option<usize>,
    waiters: Vec<oneshot::Sender<Result<(), BusError>>>,
}

/// One server connection's work list.
struct Shard {
    endpoint: Endpoint,
    /// Channels whose subscription may need a command. Bounded by the
    /// number of channels, unlike a queue of changes.
    dirty: Mutex<HashSet<String>>,
    wake: Notify,
    connected: AtomicBool,
}

struct Shared {
    redis: Redis,
    keys: Keys,
    publisher: Publisher,
    /// app id -> Laravel Redis prefix.
    laravel: HashMap<String, String>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    shards: RwLock<Vec<Arc<Shard>>>,
    delivery: Arc<dyn Delivery>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

pub struct RedisBus {
    shared: Arc<Shared>,
}

impl RedisBus {
    /// Starts the bus's tasks (one reader per Redis server, the health
    /// probe) on `tasks`; they stop when `stop` is cancelled, and the owner
    /// of `tasks` waits for them.
    pub fn start(
        redis: Redis,
        keys: Keys,
        cache_ttl: CacheTtl,
        laravel_prefixes: HashMap<String, String>,
        delivery: Arc<dyn Delivery>,
        stop: CancellationToken,
        tasks: TaskTracker,
    ) -> RedisBus {
        metrics::describe_counter!(
            DISCONNECTS_METRIC,
            "Redis pub/sub connections of this node that were lost and resubscribed"
        );
        metrics::counter!(DISCONNECTS_METRIC).increment(0);
        let shared = Arc::new(Shared {
            publisher: Publisher::new(redis.clone(), keys.clone()).with_cache_ttls(cache_ttl),
            redis,
            keys,
            laravel: laravel_prefixes,
            subscriptions: Mutex::new(HashMap::new()),
            shards: RwLock::new(Vec::new()),
            delivery,
            stop,
            tasks,
        });
        shared
            .tasks
            .spawn(shared.redis.clone().probe_health(shared.stop.clone()));
        if !shared.redis.clustered {
            if let Some(endpoint) = shared.redis.endpoints().into_iter().next() {
                shared.add_shard(endpoint);
            }
        } else {
            shared.tasks.spawn(route_task(shared.clone()));
        }
        // The control channel (terminate_connections) is always wanted.
        let _ = shared.want(shared.keys.control());
        RedisBus { shared }
    }

    /// Redis channels that carry events for one Pusher channel.
    fn redis_channels(&self, app: &str, channel: &str) -> Vec<String> {
        let mut names = vec![self.shared.keys.events(app, channel)];
        if let Some(prefix) = self.shared.laravel.get(app) {
            names.push(format!("{prefix}{channel}"));
        }
        names
    }
}

impl Shared {
    fn add_shard(self: &Arc<Self>, endpoint: Endpoint) -> usize {
        let mut shards = self.shards.write();
        if let Some(i) = shards.iter().position(|s| s.endpoint == endpoint) {
            return i;
        }
        let shard = Arc::new(Shard {
            endpoint,
            dirty: Mutex::new(HashSet::new()),
            wake: Notify::new(),
            connected: AtomicBool::new(false),
        });
        shards.push(shard.clone());
        let index = shards.len() - 1;
        drop(shards);
        self.tasks.spawn(shard_task(self.clone(), index, shard));
        index
    }

    /// The shard that serves `name`: the only one on a single server, the
    /// primary owning the channel's slot on a Cluster.
    fn route(self: &Arc<Self>, name: &str) -> Option<usize> {
        if !self.redis.clustered {
            return Some(0);
        }
        let state = self.redis.client.cached_cluster_state()?;
        let server = state.get_server(fred::util::redis_keyslot(name.as_bytes()))?;
        let endpoint = self.redis.endpoint_for(&server.host, server.port);
        let existing = self
            .shards
            .read()
            .iter()
            .position(|s| s.endpoint == endpoint);
        Some(existing.unwrap_or_else(|| self.add_shard(endpoint)))
    }

    fn mark_dirty(&self, shard: usize, name: String) {
        if let Some(shard) = self.shards.read().get(shard) {
            shard.dirty.lock().insert(name);
            shard.wake.notify_one();
        }
    }

    /// Marks `name` wanted; returns a receiver if confirmation is pending.
    fn want(self: &Arc<Self>, name: String) -> Option<oneshot::Receiver<Result<(), BusError>>> {
        let route = self.route(&name);
        let mut subs = self.subscriptions.lock();
        let sub = subs.entry(name.clone()).or_insert_with(|| Subscription {
            wanted: false,
            live: false,
            in_flight: false,
            shard: route,
            waiters: Vec::new(),
        });
        sub.wanted = true;
        if sub.live && !sub.in_flight {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        sub.waiters.push(tx);
        let shard = sub.shard;
        drop(subs);
        if let Some(shard) = shard {
            self.mark_dirty(shard, name);
        }
        Some(rx)
    }

    fn unwant(&self, name: String) {
        let mut subs = self.subscriptions.lock();
        if let Some(sub) = subs.get_mut(&name) {
            sub.wanted = false;
            if let Some(shard) = sub.shard {
                drop(subs);
                self.mark_dirty(shard, name);
            }
        }
    }

    /// Turns a message from Redis into an envelope, if it is one of ours.
    fn decode(&self, channel: &str, payload: &[u8]) -> Option<Envelope> {
        if channel.starts_with(self.keys.prefix())
            && channel.as_bytes().get(self.keys.prefix().len()) == Some(&b':')
        {
            return match Envelope::decode(payload) {
                Ok(e) => Some(e),
                Err(e) => {
                    tracing::warn!(channel, error = %e, "dropping an undecodable envelope");
                    None
                }
            };
        }
        let (app, pusher_channel) = self
            .laravel
            .iter()
            .find_map(|(app, prefix)| channel.strip_prefix(prefix.as_str()).map(|c| (app, c)))?;
        match Envelope::from_laravel(app, pusher_channel, payload) {
            Ok(envelope) => Some(envelope),
            Err(e) => {
                tracing::warn!(channel, error = %e, "dropping a Laravel broadcast that is not JSON");
                None
            }
        }
    }

    /// The commands the dirty channels of `shard` need now, marking them in
    /// flight. Channels that moved to another shard are handed over.
    fn take_commands(self: &Arc<Self>, index: usize, shard: &Shard) -> Vec<u8> {
        let dirty: Vec<String> = shard.dirty.lock().drain().collect();
        if dirty.is_empty() {
            return Vec::new();
        }
        let (mut subscribe, mut unsubscribe, mut moved) = (Vec::new(), Vec::new(), Vec::new());
        {
            let mut subs = self.subscriptions.lock();
            for name in dirty {
                let Some(sub) = subs.get_mut(&name) else {
                    continue;
                };
                if sub.shard != Some(index) || sub.in_flight {
                    // Another shard's now, or its reply will decide.
                    continue;
                }
                if sub.wanted && !sub.live {
                    if self.redis.clustered {
                        if let Some(route) = self.route(&name).filter(|r| *r != index) {
                            sub.shard = Some(route);
                            moved.push((route, name));
                            continue;
                        }
                    }
                    sub.in_flight = true;
                    subscribe.push(name);
                } else if !sub.wanted && sub.live {
                    sub.in_flight = true;
                    unsubscribe.push(name);
                } else if !sub.wanted && !sub.live && sub.waiters.is_empty() {
                    subs.remove(&name);
                }
            }
        }
        for (route, name) in moved {
            self.mark_dirty(route, name);
        }
        let mut out = Vec::new();
        let clustered = self.redis.clustered;
        for (verb, names) in [
            (
                if clustered { "SSUBSCRIBE" } else { "SUBSCRIBE" },
                subscribe,
            ),
            (
                if clustered {
                    "SUNSUBSCRIBE"
                } else {
                    "UNSUBSCRIBE"
                },
                unsubscribe,
            ),
        ] {
            // Sharded channels of one command must share a slot: one each.
            let per_command = if clustered { 1 } else { SUBSCRIBE_BATCH };
            for chunk in names.chunks(per_command) {
                let mut args = Vec::with_capacity(chunk.len() + 1);
                args.push(verb);
                args.extend(chunk.iter().map(String::as_str));
                resp::encode_command(&mut out, &args);
            }
        }
        out
    }

    /// Applies a confirmation from Redis.
    fn confirmed(&self, index: usize, push: &Push) {
        let mut subs = self.subscriptions.lock();
        match push {
            Push::Subscribed(name) => {
                let Some(sub) = subs.get_mut(name) else {
                    return;
                };
                sub.in_flight = false;
                sub.live = true;
                if sub.wanted {
                    for waiter in sub.waiters.drain(..) {
                        let _ = waiter.send(Ok(()));
                    }
                } else {
                    // Left while we were subscribing: unsubscribe now.
                    drop(subs);
                    self.mark_dirty(index, name.clone());
                }
            }
            Push::Unsubscribed(name) => {
                let Some(sub) = subs.get_mut(name) else {
                    return;
                };
                sub.in_flight = false;
                sub.live = false;
                if sub.wanted {
                    // Wanted again while leaving, or Redis dropped it (a
                    // Cluster slot moved): subscribe afresh.
                    drop(subs);
                    self.mark_dirty(index, name.clone());
                } else if sub.waiters.is_empty() {
                    subs.remove(name);
                }
            }
            _ => {}
        }
    }

    /// The connection of `index` is gone: nothing of it is live, and every
    /// wanted channel is subscribed again on the next connection.
    fn lost(&self, index: usize, shard: &Shard) {
        shard.connected.store(false, Ordering::Relaxed);
        let mut subs = self.subscriptions.lock();
        let mut dirty = shard.dirty.lock();
        subs.retain(|name, sub| {
            if sub.shard != Some(index) {
                return true;
            }
            sub.live = false;
            sub.in_flight = false;
            if sub.wanted {
                dirty.insert(name.clone());
            }
            sub.wanted || !sub.waiters.is_empty()
        });
    }
}

/// Routes channels that were wanted before a Cluster's slot map was known.
async fn route_task(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shared.stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let unrouted: Vec<String> = {
            let mut subs = shared.subscriptions.lock();
            // Left before it was ever routed: nothing to unsubscribe.
            subs.retain(|_, s| {
                s.shard.is_some() || s.wanted || s.waiters.iter().any(|w| !w.is_closed())
            });
            subs.iter()
                .filter(|(_, s)| s.shard.is_none() && s.wanted)
                .map(|(n, _)| n.clone())
                .collect()
        };
        for name in unrouted {
            let Some(route) = shared.route(&name) else {
                break;
            };
            if let Some(sub) = shared.subscriptions.lock().get_mut(&name) {
                sub.shard = Some(route);
            }
            shared.mark_dirty(route, name);
        }
    }
}

/// Connects to one server and keeps it subscribed to what is wanted of it,
/// handing every message to the fan-out before reading the next.
async fn shard_task(shared: Arc<Shared>, index: usize, shard: Arc<Shard>) {
    let mut backoff = BACKOFF_MIN;
    let mut ever_connected = false;
    loop {
        let connecting = subscriber::connect(&shard.endpoint, CONNECT_TIMEOUT);
        let (reader, writer) = tokio::select! {
            _ = shared.stop.cancelled() => return,
            c = connecting => match c {
                Ok(c) => c,
                Err(e) => {
                    match &e {
                        SubscriberError::Auth(_) => tracing::error!(server = %shard.endpoint, error = %e, "Redis refused the bus's login"),
                        _ => tracing::warn!(server = %shard.endpoint, error = %e, "bus cannot reach Redis; retrying"),
                    }
                    tokio::select! {
                        _ = shared.stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                    continue;
                }
            },
        };
        backoff = BACKOFF_MIN;
        shared.lost(index, &shard); // every wanted channel subscribes afresh
        shard.connected.store(true, Ordering::Relaxed);
        if ever_connected {
            tracing::info!(server = %shard.endpoint, "bus reconnected to Redis; resubscribing");
        }
        ever_connected = true;
        let error = serve(&shared, index, &shard, reader, writer).await;
        shared.lost(index, &shard);
        let Some(error) = error else {
            return; // stopping
        };
        metrics::counter!(DISCONNECTS_METRIC).increment(1);
        tracing::error!(
            server = %shard.endpoint,
            error = %error,
            "bus lost its Redis subscriber connection; events published until it is back do not reach this node"
        );
        if shared.redis.clustered {
            // A refused SSUBSCRIBE (MOVED) or a failed primary: learn the
            // slot map again before routing channels anew.
            let _ = shared.redis.client.sync_cluster().await;
        }
    }
}

/// Runs one connection until it fails (`Some`) or the bus stops (`None`).
async fn serve(
    shared: &Arc<Shared>,
    index: usize,
    shard: &Shard,
    mut reader: Reader,
    mut writer: Writer,
) -> Option<SubscriberError> {
    let mut last_read = tokio::time::Instant::now();
    let mut pinged = false;
    let mut changes = true;
    loop {
        if std::mem::take(&mut changes) {
            let commands = shared.take_commands(index, shard);
            if !commands.is_empty() {
                if let Err(e) = writer.send(&commands).await {
                    return Some(e);
                }
            }
        }
        let idle_until = last_read + if pinged { DEAD_AFTER } else { PING_IDLE };
        let push = tokio::select! {
            _ = shared.stop.cancelled() => return None,
            _ = shard.wake.notified() => {
                changes = true;
                continue;
            }
            _ = tokio::time::sleep_until(idle_until) => {
                if pinged {
                    return Some(SubscriberError::Timeout(shard.endpoint.to_string(), DEAD_AFTER));
                }
                let mut ping = Vec::new();
                resp::encode_command(&mut ping, &["PING"]);
                if let Err(e) = writer.send(&ping).await {
                    return Some(e);
                }
                pinged = true;
                continue;
            }
            push = reader.next() => push,
        };
        last_read = tokio::time::Instant::now();
        pinged = false;
        match push {
            Ok(Push::Message { channel, payload }) => {
                if let Some(envelope) = shared.decode(&channel, &payload) {
                    // Waits while the fan-out is full: the socket is not
                    // read meanwhile, so Redis holds the rest.
                    tokio::select! {
                        _ = shared.stop.cancelled() => return None,
                        _ = shared.delivery.deliver(envelope) => {}
                    }
                }
            }
            Ok(push @ (Push::Subscribed(_) | Push::Unsubscribed(_))) => {
                shared.confirmed(index, &push)
            }
            Ok(Push::Pong) => {}
            Ok(Push::Refused(e)) => {
                // Which command it answered is not said; start over so
                // every subscription is in a known state.
                return Some(SubscriberError::Refused(e));
            }
            Err(e) => return Some(e),
        }
    }
}

impl Bus for RedisBus {
    fn subscribe(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), BusError>> {
        let pending: Vec<_> = self
            .redis_channels(app, channel)
            .into_iter()
            .filter_map(|name| self.shared.want(name))
            .collect();
        Box::pin(async move {
            for rx in pending {
                match tokio::time::timeout(SUBSCRIBE_TIMEOUT, rx).await {
                    Ok(Ok(result)) => result?,
                    Ok(Err(_)) => return Err(BusError::Unavailable("bus stopped".into())),
                    Err(_) => {
                        return Err(BusError::Unavailable(
                            "Redis did not confirm the subscription".into(),
                        ))
                    }
                }
            }
            Ok(())
        })
    }

    fn unsubscribe(&self, app: &str, channel: &str) {
        for name in self.redis_channels(app, channel) {
            self.shared.unwant(name);
        }
    }

    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'static, Result<(), BusError>> {
        let shared = self.shared.clone();
        // A lost subscriber connection is usually the first sign that Redis
        // is gone: refuse before anything is handed to the command client.
        let ready = self.is_ready();
        Box::pin(async move {
            if !ready {
                return Err(BusError::Unavailable("Redis is unreachable".into()));
            }
            match shared.publisher.publish_batch(envelopes).await {
                Ok(_) => Ok(()),
                Err(PublishError::NotSent(e)) => Err(BusError::Unavailable(e)),
                Err(PublishError::Unknown(e)) => Err(BusError::Unknown(e)),
            }
        })
    }

    fn cached(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Option<Envelope>, BusError>> {
        let shared = self.shared.clone();
        let key = shared.keys.cache(app, channel);
        Box::pin(async move {
            let value: Option<Vec<u8>> = shared
                .redis
                .client
                .get(key)
                .await
                .map_err(|e| BusError::Unavailable(e.to_string()))?;
            Ok(value.and_then(|bytes| Envelope::decode(&bytes).ok()))
        })
    }

    fn is_ready(&self) -> bool {
        self.shared.redis.is_healthy()
            && self
                .shared
                .shards
                .read()
                .iter()
                .all(|s| s.connected.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;
    impl Delivery for Nowhere {
        fn deliver(&self, _: Envelope) -> BoxFuture<'_, ()> {
            Box::pin(async {})
        }
    }

    fn shared_for_decode() -> Option<Shared> {
        // Decoding needs no connection; building clients does not connect.
        let redis = Redis::connect("redis://127.0.0.1:1").ok()?;
        Some(Shared {
            publisher: Publisher::new(redis.clone(), Keys::default()),
            redis,
            keys: Keys::default(),
            laravel: HashMap::from([("app1".to_owned(), "laravel_database_".to_owned())]),
            subscriptions: Mutex::new(HashMap::new()),
            shards: RwLock::new(Vec::new()),
            delivery: Arc::new(Nowhere),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        })
    }

    #[tokio::test]
    async fn decodes_laravel_broadcasts_into_envelopes() {
        let shared = shared_for_decode().unwrap();
        let e = shared
            .decode(
                "laravel_database_private-orders.1",
                br#"{"event":"App\\Events\\OrderShipped","data":{"id":1},"socket":"1.2"}"#,
            )
            .unwrap();
        assert_eq!(e.app, "app1");
        assert_eq!(e.channel, "private-orders.1");
        assert_eq!(e.event, "App\\Events\\OrderShipped");
        assert_eq!(e.data, r#"{"id":1}"#);
        assert_eq!(e.socket_id.as_deref(), Some("1.2"));
        let e = shared
            .decode(
                "laravel_database_news",
                br#"{"event":"x","data":{},"socket":null}"#,
            )
            .unwrap();
        assert_eq!(e.socket_id, None);
        assert!(shared
            .decode("laravel_database_news", b"not json")
            .is_none());
        assert!(shared.decode("somebody_else", b"{}").is_none());
    }

    #[tokio::test]
    async fn decodes_our_envelopes_and_drops_garbage() {
        let shared = shared_for_decode().unwrap();
        let e = Envelope::event("app1", "orders", "created", "{}".into());
        assert_eq!(shared.decode("belfry:app1:{orders}", &e.encode()), Some(e));
        assert!(shared.decode("belfry:app1:{orders}", b"garbage").is_none());
    }
}
