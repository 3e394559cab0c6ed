//! Cluster-wide occupancy, kept by each node for its own sockets: how many
//! subscriptions it holds per channel, which channels an app has anywhere,
//! and how many connections each app has on each node.
//!
//! Subscription counts are written before `subscription_succeeded` is sent,
//! so the HTTP API's `subscription_count` on any node includes a client as
//! soon as that client sees its subscription confirmed. Connection counts
//! (for per-app quotas) are exchanged once a second with the heartbeat, so a
//! quota can be overshot by what other nodes admitted within that second.
//! A node that dies stops its heartbeat; the coordinator then removes its
//! counts. After a Redis restart the heartbeat writes everything back.
//!
//! Join, leave, reap and restore are Lua scripts that also keep the
//! channel's cluster-wide total, so each of them sees whether it took the
//! total from 0 to 1 (`channel_occupied`) or back to 0 (`channel_vacated`);
//! only one caller can see each edge. On a single Redis the same script
//! XADDs the webhook job; on a Redis Cluster the stream is in another slot,
//! and the caller adds the job right after (`webhook::stream::add`).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;

use super::Redis;
use crate::envelope::now_us;
use crate::keys::{index_member, Keys};
use crate::occupancy::{Occupancy, OccupancyError};
use crate::webhook::{stream, Job, WebhookApps};

/// How often a node says it is alive and exchanges connection counts.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A node missing heartbeats for this long is dead: its counts stop being
/// added up at once, and the coordinator deletes them.
pub const NODE_EXPIRY: Duration = Duration::from_secs(5);

static JOIN: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/occupancy_join.lua")));
static LEAVE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/occupancy_leave.lua")));
static RESTORE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/occupancy_restore.lua")));
pub(crate) static REAP: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/occupancy_reap.lua")));

/// Keys and arguments of the occupancy scripts for one channel. `edge` is
/// the event the script may report, so that nothing is queued for apps
/// whose URLs do not want it.
pub(crate) fn script_args(
    redis: &Redis,
    keys: &Keys,
    webhooks: &WebhookApps,
    node: &str,
    app: &str,
    channel: &str,
    edge: &str,
) -> (Vec<String>, Vec<String>) {
    let mut k = vec![
        keys.occupancy(app, channel),
        keys.occupancy_total(app, channel),
    ];
    if !redis.clustered {
        k.push(keys.webhook_queue());
    }
    let wanted = if webhooks.wants(app, edge, channel) {
        "1"
    } else {
        "0"
    };
    let argv = vec![
        node.to_owned(),
        wanted.to_owned(),
        app.to_owned(),
        channel.to_owned(),
        stream::MAX_LEN.to_string(),
    ];
    (k, argv)
}

/// After a script reported an edge: on a Redis Cluster, queue its job as a
/// step of its own (the script could not reach the stream's slot).
pub(crate) async fn queue_edge(
    redis: &Redis,
    keys: &Keys,
    webhooks: &WebhookApps,
    app: &str,
    channel: &str,
    edge: &str,
) {
    stream::queue_after_script(redis, keys, webhooks, Job::new(app, channel, edge)).await;
}

#[derive(Default)]
struct Local {
    /// (app, channel) -> this node's subscriptions.
    channels: HashMap<(String, String), usize>,
    /// app -> this node's connections.
    connections: HashMap<String, usize>,
    /// app -> connections on the other live nodes, as of the last heartbeat.
    others: HashMap<String, usize>,
    /// Whether this node has registered itself at least once.
    registered: bool,
}

/// Cluster-wide occupancy; cheap to clone (the state is shared).
#[derive(Clone)]
pub struct RedisOccupancy {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    keys: Keys,
    node_id: String,
    local: Mutex<Local>,
    webhooks: Arc<WebhookApps>,
    stop: CancellationToken,
    /// Cancelled when the heartbeat task has ended, so `close` can delete
    /// the node's entries knowing no heartbeat will write them back.
    heartbeat_ended: CancellationToken,
}

fn unavailable(e: Error) -> OccupancyError {
    OccupancyError::Unavailable(format!("Redis: {e}"))
}

impl RedisOccupancy {
    pub fn start(
        redis: Redis,
        keys: Keys,
        node_id: String,
        webhooks: Arc<WebhookApps>,
        stop: CancellationToken,
        tracker: &tokio_util::task::TaskTracker,
    ) -> RedisOccupancy {
        // Its own token: `close` stops the heartbeat before the rest of the node.
        let stop = stop.child_token();
        let occupancy = Arc::new(Inner {
            redis,
            keys,
            node_id,
            local: Mutex::new(Local::default()),
            webhooks,
            stop: stop.clone(),
            heartbeat_ended: CancellationToken::new(),
        });
        tracker.spawn(heartbeat_task(occupancy.clone(), stop));
        RedisOccupancy { inner: occupancy }
    }

    pub fn node_id(&self) -> &str {
        &self.inner.node_id
    }
}

impl Inner {
    /// One more local subscription on `channel`.
    pub async fn joined(&self, app: &str, channel: &str) -> Result<(), OccupancyError> {
        *self
            .local
            .lock()
            .channels
            .entry((app.to_owned(), channel.to_owned()))
            .or_default() += 1;
        let (keys, argv) = script_args(
            &self.redis,
            &self.keys,
            &self.webhooks,
            &self.node_id,
            app,
            channel,
            "channel_occupied",
        );
        let occupied: i64 = JOIN
            .evalsha_with_reload(&self.redis.client, keys, argv)
            .await
            .map_err(unavailable)?;
        if occupied == 1 {
            queue_edge(
                &self.redis,
                &self.keys,
                &self.webhooks,
                app,
                channel,
                "channel_occupied",
            )
            .await;
        }
        let pipeline = self.redis.client.pipeline();
        let _: () = pipeline
            .sadd(self.keys.channel_index(app), channel)
            .await
            .map_err(unavailable)?;
        let _: () = pipeline
            .sadd(
                self.keys.node_channels(&self.node_id),
                index_member(app, channel),
            )
            .await
            .map_err(unavailable)?;
        let _: Vec<Value> = pipeline.all().await.map_err(unavailable)?;
        Ok(())
    }

    /// One local subscription on `channel` ended.
    pub async fn left(&self, app: &str, channel: &str) -> Result<(), OccupancyError> {
        let key = (app.to_owned(), channel.to_owned());
        let now_empty_here = {
            let mut local = self.local.lock();
            match local.channels.get_mut(&key) {
                Some(n) if *n > 1 => {
                    *n -= 1;
                    false
                }
                Some(_) => {
                    local.channels.remove(&key);
                    true
                }
                None => return Ok(()),
            }
        };
        let (keys, argv) = script_args(
            &self.redis,
            &self.keys,
            &self.webhooks,
            &self.node_id,
            app,
            channel,
            "channel_vacated",
        );
        let (remaining, vacated): (i64, i64) = LEAVE
            .evalsha_with_reload(&self.redis.client, keys, argv)
            .await
            .map_err(unavailable)?;
        if vacated == 1 {
            queue_edge(
                &self.redis,
                &self.keys,
                &self.webhooks,
                app,
                channel,
                "channel_vacated",
            )
            .await;
        }
        if now_empty_here {
            let _: () = self
                .redis
                .client
                .srem(
                    self.keys.node_channels(&self.node_id),
                    index_member(app, channel),
                )
                .await
                .map_err(unavailable)?;
        }
        if remaining == 0 {
            let _: () = self
                .redis
                .client
                .srem(self.keys.channel_index(app), channel)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    /// Nodes whose heartbeat lapsed: their counts are a dead node's
    /// leftovers until the coordinator deletes them, and are not added up.
    /// (A node missing from the set altogether, as right after a Redis
    /// restart, still counts: it re-registers within a heartbeat.)
    async fn dead_nodes(&self) -> Result<HashSet<String>, OccupancyError> {
        let now_ms = (now_us() / 1000) as f64;
        let dead: Vec<String> = self
            .redis
            .client
            .zrangebyscore(self.keys.nodes(), "-inf", now_ms, false, None)
            .await
            .map_err(unavailable)?;
        Ok(dead.into_iter().collect())
    }

    fn live_total(counts: HashMap<String, i64>, dead: &HashSet<String>) -> usize {
        counts
            .into_iter()
            .filter(|(node, n)| *n > 0 && !dead.contains(node))
            .map(|(_, n)| n as usize)
            .sum()
    }

    /// Subscriptions on `channel` across the cluster.
    pub async fn subscription_count(
        &self,
        app: &str,
        channel: &str,
    ) -> Result<usize, OccupancyError> {
        let dead = self.dead_nodes().await?;
        let counts: HashMap<String, i64> = self
            .redis
            .client
            .hgetall(self.keys.occupancy(app, channel))
            .await
            .map_err(unavailable)?;
        Ok(Self::live_total(counts, &dead))
    }

    /// Each channel's subscriptions across the cluster, and whether this
    /// node reports them: the live node with the smallest id among those
    /// holding some. Nodes agree on it from the same hash, so one of them
    /// reports. One dead-node lookup, and the hashes pipelined.
    pub async fn counts_to_report(
        &self,
        app: &str,
        channels: &[String],
    ) -> Result<Vec<(usize, bool)>, OccupancyError> {
        let dead = self.dead_nodes().await?;
        let hashes = self.occupancy_hashes(app, channels).await?;
        Ok(hashes
            .into_iter()
            .map(|counts| {
                let reporter = counts
                    .iter()
                    .filter(|(node, n)| **n > 0 && !dead.contains(*node))
                    .map(|(node, _)| node.as_str())
                    .min();
                let mine = reporter == Some(self.node_id.as_str());
                (Self::live_total(counts, &dead), mine)
            })
            .collect())
    }

    /// The occupancy hashes (node -> subscriptions) of `names`, in order,
    /// pipelined 200 at a time.
    async fn occupancy_hashes(
        &self,
        app: &str,
        names: &[String],
    ) -> Result<Vec<HashMap<String, i64>>, OccupancyError> {
        let mut out = Vec::with_capacity(names.len());
        for chunk in names.chunks(200) {
            let pipeline = self.redis.client.pipeline();
            for name in chunk {
                let _: () = pipeline
                    .hgetall(self.keys.occupancy(app, name))
                    .await
                    .map_err(unavailable)?;
            }
            let counts: Vec<HashMap<String, i64>> = pipeline.all().await.map_err(unavailable)?;
            out.extend(counts);
        }
        Ok(out)
    }

    /// Every channel of `app` with subscribers anywhere, with its count.
    pub async fn channels(&self, app: &str) -> Result<Vec<(String, usize)>, OccupancyError> {
        let names: Vec<String> = self
            .redis
            .client
            .smembers(self.keys.channel_index(app))
            .await
            .map_err(unavailable)?;
        let dead = self.dead_nodes().await?;
        let hashes = self.occupancy_hashes(app, &names).await?;
        Ok(names
            .into_iter()
            .zip(hashes)
            .map(|(name, counts)| (name, Self::live_total(counts, &dead)))
            .filter(|(_, total)| *total > 0)
            .collect())
    }

    pub fn connection_opened(&self, app: &str) {
        *self
            .local
            .lock()
            .connections
            .entry(app.to_owned())
            .or_default() += 1;
    }

    pub fn connection_closed(&self, app: &str) {
        if let Some(n) = self.local.lock().connections.get_mut(app) {
            *n = n.saturating_sub(1);
        }
    }

    /// Connections of `app` on the other live nodes, as of the last heartbeat.
    pub fn others_connections(&self, app: &str) -> usize {
        self.local.lock().others.get(app).copied().unwrap_or(0)
    }

    /// Removes this node from the cluster's books (graceful shutdown).
    pub async fn leave_cluster(&self) {
        let _: Result<(), _> = self
            .redis
            .client
            .zrem(self.keys.nodes(), &self.node_id)
            .await;
        let _: Result<(), _> = self
            .redis
            .client
            .del(vec![
                self.keys.node_connections(&self.node_id),
                self.keys.node_channels(&self.node_id),
            ])
            .await;
    }

    /// Writes this node's subscription counts back, after Redis came back
    /// (possibly empty) from a restart.
    async fn restore(&self) -> Result<(), Error> {
        let channels: Vec<((String, String), usize)> = self
            .local
            .lock()
            .channels
            .iter()
            .map(|(k, n)| (k.clone(), *n))
            .collect();
        for chunk in channels.chunks(200) {
            for ((app, channel), n) in chunk {
                let (keys, mut argv) = script_args(
                    &self.redis,
                    &self.keys,
                    &self.webhooks,
                    &self.node_id,
                    app,
                    channel,
                    "channel_occupied",
                );
                argv.push(n.to_string());
                let occupied: i64 = RESTORE
                    .evalsha_with_reload(&self.redis.client, keys, argv)
                    .await?;
                if occupied == 1 {
                    queue_edge(
                        &self.redis,
                        &self.keys,
                        &self.webhooks,
                        app,
                        channel,
                        "channel_occupied",
                    )
                    .await;
                }
            }
            let pipeline = self.redis.client.pipeline();
            for ((app, channel), _) in chunk {
                let _: () = pipeline
                    .sadd(self.keys.channel_index(app), channel.as_str())
                    .await?;
                let _: () = pipeline
                    .sadd(
                        self.keys.node_channels(&self.node_id),
                        index_member(app, channel),
                    )
                    .await?;
            }
            let _: Vec<Value> = pipeline.all().await?;
        }
        tracing::info!(channels = channels.len(), "occupancy restored to Redis");
        Ok(())
    }

    /// Says this node is alive, publishes its connection counts and reads
    /// the others'.
    async fn beat(&self) -> Result<(), Error> {
        let now_ms = now_us() / 1000;
        let connections = self.local.lock().connections.clone();
        let pipeline = self.redis.client.pipeline();
        let expiry = (now_ms + NODE_EXPIRY.as_millis() as u64) as f64;
        let _: () = pipeline
            .zadd(
                self.keys.nodes(),
                None,
                None,
                false,
                false,
                (expiry, self.node_id.as_str()),
            )
            .await?;
        if !connections.is_empty() {
            let values: Vec<(String, i64)> = connections
                .iter()
                .map(|(a, n)| (a.clone(), *n as i64))
                .collect();
            let _: () = pipeline
                .hset(self.keys.node_connections(&self.node_id), values)
                .await?;
        }
        let replies: Vec<Value> = pipeline.all().await?;
        // ZADD answers 1 when the node was not registered: the first beat, or
        // the coordinator reaped this node during a stall and deleted its
        // counts, which must then be written back.
        let newly_added = replies.first().and_then(|v| v.as_i64()) == Some(1);
        let was_registered = std::mem::replace(&mut self.local.lock().registered, true);
        if newly_added && was_registered {
            tracing::warn!("this node had been reaped as dead; restoring its occupancy");
            self.restore().await?;
        }

        let alive: Vec<String> = self
            .redis
            .client
            .zrangebyscore(self.keys.nodes(), now_ms as f64, "+inf", false, None)
            .await?;
        let mut others: HashMap<String, usize> = HashMap::new();
        for node in alive.iter().filter(|n| **n != self.node_id) {
            let counts: HashMap<String, i64> = self
                .redis
                .client
                .hgetall(self.keys.node_connections(node))
                .await?;
            for (app, n) in counts {
                *others.entry(app).or_default() += n.max(0) as usize;
            }
        }
        self.local.lock().others = others;
        Ok(())
    }
}

async fn heartbeat_task(occupancy: Arc<Inner>, stop: CancellationToken) {
    // `stop` is only looked at between beats, so when this ends no beat is in flight.
    let _ended = occupancy.heartbeat_ended.clone().drop_guard();
    let mut tick = tokio::time::interval(HEARTBEAT);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut reconnects = occupancy.redis.client.reconnect_rx();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
            reconnected = reconnects.recv() => {
                if reconnected.is_ok() {
                    if let Err(e) = occupancy.restore().await {
                        tracing::warn!(error = %e, "occupancy restore failed; retrying on the next reconnect");
                    }
                    if let Err(e) = occupancy.beat().await {
                        tracing::warn!(error = %e, "heartbeat to Redis failed");
                    }
                }
                continue;
            }
        }
        if !occupancy.redis.client.is_connected() {
            continue;
        }
        if let Err(e) = occupancy.beat().await {
            tracing::warn!(error = %e, "heartbeat to Redis failed");
        }
    }
}

impl Occupancy for RedisOccupancy {
    fn joined(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>> {
        let (inner, app, channel) = (self.inner.clone(), app.to_owned(), channel.to_owned());
        Box::pin(async move { inner.joined(&app, &channel).await })
    }

    fn left(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>> {
        let (inner, app, channel) = (self.inner.clone(), app.to_owned(), channel.to_owned());
        Box::pin(async move { inner.left(&app, &channel).await })
    }

    fn subscription_count(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<usize, OccupancyError>> {
        let (inner, app, channel) = (self.inner.clone(), app.to_owned(), channel.to_owned());
        Box::pin(async move { inner.subscription_count(&app, &channel).await })
    }

    fn counts_to_report(
        &self,
        app: &str,
        channels: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(usize, bool)>, OccupancyError>> {
        let (inner, app) = (self.inner.clone(), app.to_owned());
        Box::pin(async move { inner.counts_to_report(&app, &channels).await })
    }

    fn channels(
        &self,
        app: &str,
    ) -> BoxFuture<'static, Result<Vec<(String, usize)>, OccupancyError>> {
        let (inner, app) = (self.inner.clone(), app.to_owned());
        Box::pin(async move { inner.channels(&app).await })
    }

    fn connection_opened(&self, app: &str) {
        self.inner.connection_opened(app)
    }

    fn connection_closed(&self, app: &str) {
        self.inner.connection_closed(app)
    }

    fn others_connections(&self, app: &str) -> usize {
        self.inner.others_connections(app)
    }

    /// Stops the heartbeat first, so that it cannot write back what
    /// leaving deletes, then takes the node off the books.
    fn close(&self) -> BoxFuture<'static, ()> {
        let inner = self.inner.clone();
        Box::pin(async move {
            inner.stop.cancel();
            // A beat stuck on an unreachable Redis must not hold the exit up:
            // the coordinator reaps a node whose heartbeat lapsed anyway.
            let ended = inner.heartbeat_ended.cancelled();
            if tokio::time::timeout(Duration::from_secs(2), ended)
                .await
                .is_err()
            {
                tracing::warn!("the heartbeat did not stop within 2 s; leaving the cluster anyway");
            }
            inner.leave_cluster().await;
        })
    }
}
