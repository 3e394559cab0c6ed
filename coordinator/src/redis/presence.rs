//! Presence membership shared by every node, in Redis.
//!
//! Each presence channel has four keys under one hash tag (see `keys.rs`):
//! users, sockets, per-user connection counts and a sorted set of connection
//! expiries. Join and leave are Lua scripts over those keys, so a user's
//! first connection anywhere in the cluster and its last one are each seen by
//! exactly one caller, which announces `member_added` / `member_removed`.
//!
//! A connection stays a member only while its node keeps refreshing its
//! expiry. `RedisPresence` keeps a mirror of this node's own presence
//! connections for that: a background task it owns refreshes them every
//! TTL/3 and, when Redis comes back empty, writes them back. If the node
//! dies, the refreshes stop and the coordinator's sweep (`daemon`) removes
//! the members and announces their departure. What this store is not: the
//! announcer. It tells the node what changed; the node publishes. The
//! scripts do queue the `member_added` / `member_removed` webhook jobs, in
//! the same step that decides them.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::SetOptions;
use futures_util::future::BoxFuture;
use futures_util::stream::{self, StreamExt};
use parking_lot::Mutex;
use serde_json::value::RawValue;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::Redis;
use crate::keys::{index_member, Keys};
use crate::presence::{Joined, PresenceError, PresenceMember, PresenceStore};
use crate::webhook::{stream as webhook_stream, Job, WebhookApps};

/// How long a connection stays a member without a refresh, by default.
pub const DEFAULT_PRESENCE_TTL: Duration = Duration::from_secs(30);

/// Largest number of sockets one refresh command carries, so that a huge
/// channel does not turn into one enormous ZADD.
const REFRESH_CHUNK: usize = 500;
/// Channels per refresh pipeline.
const REFRESH_PIPELINE: usize = 100;
/// Join scripts in flight at once while restoring after a Redis restart.
const RESTORE_CONCURRENCY: usize = 32;

static JOIN: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/presence_join.lua")));
static LEAVE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/presence_leave.lua")));

/// Presence in Redis, cluster-wide. Cheap to share behind an `Arc`; the
/// refresh task stops when this value is dropped or `stop` is called.
pub struct RedisPresence {
    inner: Arc<Inner>,
    refresher: JoinHandle<()>,
    stop: CancellationToken,
}

struct Inner {
    redis: Redis,
    keys: Keys,
    node_id: String,
    ttl: Duration,
    /// Which apps want `member_added` / `member_removed` webhooks.
    webhooks: Arc<WebhookApps>,
    /// This node's presence connections: (app, channel) -> socket_id -> member.
    mirror: Mutex<HashMap<(String, String), HashMap<String, PresenceMember>>>,
}

/// What the leave script reports.
#[derive(Debug)]
pub(crate) struct LeaveOutcome {
    /// The member, when that connection was the user's last on the channel.
    pub removed: Option<PresenceMember>,
    /// Connections left on the channel afterwards.
    pub remaining: i64,
}

impl RedisPresence {
    /// Builds the store and starts its refresh task on the current Tokio
    /// runtime. `ttl` is how long a connection outlives its node's last
    /// refresh ([`DEFAULT_PRESENCE_TTL`] unless you have measured otherwise);
    /// refreshes run every `ttl / 3`. The task stops when the store is dropped.
    pub fn new(redis: Redis, keys: Keys, node_id: impl Into<String>, ttl: Duration) -> Self {
        Self::with_shutdown(redis, keys, node_id, ttl, CancellationToken::new())
    }

    /// As [`RedisPresence::new`], and the refresh task also stops when
    /// `shutdown` is cancelled (the node's own shutdown token).
    pub fn with_shutdown(
        redis: Redis,
        keys: Keys,
        node_id: impl Into<String>,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Self {
        Self::start(redis, keys, node_id, ttl, Arc::default(), shutdown)
    }

    /// As [`RedisPresence::with_shutdown`], and a user's first connection
    /// to a channel and their last one queue `member_added` and
    /// `member_removed` webhook jobs for the apps in `webhooks` that want
    /// them, in the same script that decides it (so once per user, whichever
    /// node the connections are on).
    pub fn start(
        redis: Redis,
        keys: Keys,
        node_id: impl Into<String>,
        ttl: Duration,
        webhooks: Arc<WebhookApps>,
        shutdown: CancellationToken,
    ) -> Self {
        let inner = Arc::new(Inner {
            redis,
            keys,
            node_id: node_id.into(),
            ttl: ttl.max(Duration::from_millis(30)),
            webhooks,
            mirror: Mutex::new(HashMap::new()),
        });
        let stop = shutdown.child_token();
        let refresher = tokio::spawn(refresh_loop(inner.clone(), stop.clone()));
        Self {
            inner,
            refresher,
            stop,
        }
    }

    /// Stops the refresh task. Members stay in Redis until they leave or
    /// expire; call it only when the node is going away.
    pub fn stop(&self) {
        self.stop.cancel();
        self.refresher.abort();
    }

    /// Removes every connection this node holds, at once (graceful shutdown),
    /// and returns the members who left with them, for the node to announce
    /// `member_removed`. Connections Redis could not remove are left to expire.
    pub async fn leave_all(&self) -> Vec<(String, String, PresenceMember)> {
        let sockets: Vec<(String, String, String)> = self
            .inner
            .mirror
            .lock()
            .iter()
            .flat_map(|((app, channel), sockets)| {
                sockets
                    .keys()
                    .map(|socket| (app.clone(), channel.clone(), socket.clone()))
            })
            .collect();
        stream::iter(sockets)
            .map(|(app, channel, socket)| async move {
                let left = self.leave(&app, &channel, &socket).await;
                left.ok().flatten().map(|member| (app, channel, member))
            })
            .buffer_unordered(RESTORE_CONCURRENCY)
            .filter_map(std::future::ready)
            .collect()
            .await
    }

    /// How many presence connections this node holds (and refreshes).
    pub fn local_connections(&self) -> usize {
        self.inner.mirror.lock().values().map(HashMap::len).sum()
    }

    /// Refreshes this node's connections now instead of at the next tick.
    pub async fn refresh_now(&self) -> Result<(), PresenceError> {
        refresh(&self.inner).await.map_err(unavailable)
    }

    /// Writes every mirrored connection back to Redis (what the store does by
    /// itself after a reconnect). Returns how many connections were restored.
    pub async fn restore_now(&self) -> usize {
        let channels: Vec<_> = self.inner.mirror.lock().keys().cloned().collect();
        restore(&self.inner, channels).await
    }
}

impl Drop for RedisPresence {
    fn drop(&mut self) {
        self.stop();
    }
}

impl RedisPresence {
    /// Runs the join script, then keeps the connection in the mirror and
    /// the sweep index. `with_members` builds the member list.
    fn join_and_remember(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
        max_members: usize,
        with_members: bool,
    ) -> BoxFuture<'static, Result<Joined, PresenceError>> {
        let inner = self.inner.clone();
        let (app, channel, socket_id) = (app.to_owned(), channel.to_owned(), socket_id.to_owned());
        Box::pin(async move {
            let joined = join_script(
                &inner,
                &app,
                &channel,
                &socket_id,
                &member,
                max_members,
                with_members,
                Some(&inner.webhooks),
            )
            .await
            .map_err(unavailable)?
            .ok_or(PresenceError::Full(max_members))?;
            remember(&inner, &app, &channel, socket_id, member).await;
            Ok(joined)
        })
    }
}

impl PresenceStore for RedisPresence {
    fn track(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
    ) -> BoxFuture<'static, Result<bool, PresenceError>> {
        // No member list: on a channel of every online user it would make
        // each signin O(users).
        let joined = self.join_and_remember(app, channel, socket_id, member, usize::MAX, false);
        Box::pin(async move { joined.await.map(|j| j.user_added) })
    }

    fn present(
        &self,
        app: &str,
        channel: &str,
        user_ids: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<String>, PresenceError>> {
        let client = self.inner.redis.client.clone();
        let key = self.inner.keys.presence_counts(app, channel);
        Box::pin(async move {
            if user_ids.is_empty() {
                return Ok(Vec::new());
            }
            let counts: Vec<Option<i64>> = client
                .hmget(key, user_ids.clone())
                .await
                .map_err(unavailable)?;
            Ok(user_ids
                .into_iter()
                .zip(counts)
                .filter(|(_, n)| n.is_some_and(|n| n > 0))
                .map(|(u, _)| u)
                .collect())
        })
    }

    fn join(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
        max_members: usize,
    ) -> BoxFuture<'static, Result<Joined, PresenceError>> {
        self.join_and_remember(app, channel, socket_id, member, max_members, true)
    }

    fn leave(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
    ) -> BoxFuture<'static, Result<Option<PresenceMember>, PresenceError>> {
        let inner = self.inner.clone();
        let (app, channel, socket_id) = (app.to_owned(), channel.to_owned(), socket_id.to_owned());
        Box::pin(async move {
            // Out of the mirror first: a refresh or restore running meanwhile
            // must not write the connection back after the script removed it.
            forget(&inner, &app, &channel, &socket_id);
            // If this fails the connection's expiry lapses and the
            // coordinator's sweep removes it and announces member_removed.
            let hooks = Some(&*inner.webhooks);
            let outcome = leave_socket(
                &inner.redis,
                &inner.keys,
                hooks,
                &app,
                &channel,
                &socket_id,
                None,
            )
            .await
            .map_err(unavailable)?;
            if outcome.remaining == 0 {
                unindex_if_empty(&inner.redis, &inner.keys, &app, &channel).await;
            }
            Ok(outcome.removed)
        })
    }

    fn members(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Vec<PresenceMember>, PresenceError>> {
        let client = self.inner.redis.client.clone();
        let key = self.inner.keys.presence_users(app, channel);
        Box::pin(async move {
            let fields: HashMap<String, String> = client.hgetall(key).await.map_err(unavailable)?;
            Ok(fields
                .into_iter()
                .filter_map(|(user_id, json)| parse_member(user_id, &json))
                .collect())
        })
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        self.stop();
        Box::pin(async {})
    }
}

/// Keeps a joined connection in this node's mirror (for refreshes and
/// restores) and in the index the coordinator sweeps.
async fn remember(
    inner: &Inner,
    app: &str,
    channel: &str,
    socket_id: String,
    member: PresenceMember,
) {
    inner
        .mirror
        .lock()
        .entry((app.to_owned(), channel.to_owned()))
        .or_default()
        .insert(socket_id, member);
    // A different slot than the channel's keys, so not in the script. If it
    // fails the next refresh adds it again.
    let indexed: Result<(), Error> = inner
        .redis
        .client
        .sadd(inner.keys.presence_index(), index_member(app, channel))
        .await;
    if let Err(e) = indexed {
        tracing::warn!(error = %e, "presence index not updated; the next refresh retries");
    }
}

fn unavailable(e: Error) -> PresenceError {
    PresenceError::Unavailable(e.to_string())
}

fn forget(inner: &Inner, app: &str, channel: &str, socket_id: &str) {
    let mut mirror = inner.mirror.lock();
    let key = (app.to_owned(), channel.to_owned());
    if let Some(sockets) = mirror.get_mut(&key) {
        sockets.remove(socket_id);
        if sockets.is_empty() {
            mirror.remove(&key);
        }
    }
}

fn is_mirrored(inner: &Inner, app: &str, channel: &str, socket_id: &str) -> bool {
    inner
        .mirror
        .lock()
        .get(&(app.to_owned(), channel.to_owned()))
        .is_some_and(|sockets| sockets.contains_key(socket_id))
}

/// The users hash holds `[user_id_json, user_info_or_null]` as JSON text.
pub(crate) fn member_json(member: &PresenceMember) -> String {
    format!(
        "[{},{}]",
        member.user_id_json,
        member.user_info.as_deref().unwrap_or("null")
    )
}

/// Reads one users-hash entry back; a malformed one is skipped, not fatal.
pub(crate) fn parse_member(user_id: String, json: &str) -> Option<PresenceMember> {
    let parts: Vec<Box<RawValue>> = match serde_json::from_str(json) {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(user_id, error = %e, "skipping a malformed presence member in Redis");
            return None;
        }
    };
    let user_id_json = parts.first()?.get().to_owned();
    let user_info = parts
        .get(1)
        .map(|info| info.get())
        .filter(|info| *info != "null")
        .map(str::to_owned);
    Some(PresenceMember {
        user_id,
        user_id_json,
        user_info,
    })
}

fn now_ms() -> u64 {
    crate::envelope::now_us() / 1000
}

fn expiry_ms(ttl: Duration) -> u64 {
    now_ms() + ttl.as_millis() as u64
}

fn channel_keys(keys: &Keys, app: &str, channel: &str) -> Vec<String> {
    vec![
        keys.presence_users(app, channel),
        keys.presence_sockets(app, channel),
        keys.presence_counts(app, channel),
        keys.presence_expiry(app, channel),
    ]
}

/// Which webhooks a presence script may queue: `None` for a restore or its
/// undo, which change no one's membership as the app saw it.
type Hooks<'a> = Option<&'a WebhookApps>;

/// A presence script's keys: the channel's, then the webhook stream's
/// (unless on a Redis Cluster, where the stream is in another slot and the
/// job is queued after the script); and its webhook arguments: wanted, app,
/// channel, MAXLEN.
fn script_keys(
    redis: &Redis,
    keys: &Keys,
    hooks: Hooks,
    app: &str,
    channel: &str,
    name: &str,
) -> (Vec<String>, [String; 4]) {
    let wanted = hooks.is_some_and(|h| h.wants(app, name, channel));
    let mut script_keys = channel_keys(keys, app, channel);
    script_keys.extend((!redis.clustered).then(|| keys.webhook_queue()));
    (
        script_keys,
        [
            if wanted { "1" } else { "0" }.to_owned(),
            app.to_owned(),
            channel.to_owned(),
            webhook_stream::MAX_LEN.to_string(),
        ],
    )
}

/// On a Redis Cluster: queue the member job the script could not.
async fn queue_member(
    redis: &Redis,
    keys: &Keys,
    hooks: Hooks<'_>,
    app: &str,
    channel: &str,
    name: &str,
    user_id: &str,
) {
    let Some(webhooks) = hooks else {
        return;
    };
    let mut job = Job::new(app, channel, name);
    job.user_id = Some(user_id.to_owned());
    webhook_stream::queue_after_script(redis, keys, webhooks, job).await;
}

/// Runs the join script. `None` means the channel is full. Without
/// `with_members` the member list is neither built nor sent (restores).
#[allow(clippy::too_many_arguments)]
async fn join_script(
    inner: &Inner,
    app: &str,
    channel: &str,
    socket_id: &str,
    member: &PresenceMember,
    max_members: usize,
    with_members: bool,
    hooks: Hooks<'_>,
) -> Result<Option<Joined>, Error> {
    let (keys, hook) = script_keys(
        &inner.redis,
        &inner.keys,
        hooks,
        app,
        channel,
        "member_added",
    );
    let mut args = vec![
        socket_id.to_owned(),
        member.user_id.clone(),
        member_json(member),
        max_members.min(i64::MAX as usize).to_string(),
        expiry_ms(inner.ttl).to_string(),
        if with_members { "0" } else { "1" }.to_owned(),
    ];
    args.extend(hook);
    let reply: Vec<Value> = JOIN
        .evalsha_with_reload(&inner.redis.client, keys, args)
        .await?;
    let mut reply = reply.into_iter();
    let added = reply.next().and_then(|v| v.as_i64()).unwrap_or(0);
    if added < 0 {
        return Ok(None);
    }
    if added == 1 {
        queue_member(
            &inner.redis,
            &inner.keys,
            hooks,
            app,
            channel,
            "member_added",
            &member.user_id,
        )
        .await;
    }
    let mut members = Vec::new();
    while let (Some(user_id), Some(json)) = (reply.next(), reply.next()) {
        if let (Some(user_id), Some(json)) = (user_id.into_string(), json.as_string()) {
            members.extend(parse_member(user_id, &json));
        }
    }
    Ok(Some(Joined {
        user_added: added == 1,
        members,
    }))
}

/// Runs the leave script for one connection. With a `cutoff` (ms since the
/// epoch) only a connection that expired by then is removed: the sweep's guard
/// against a refresh that landed after it looked.
pub(crate) async fn leave_socket(
    redis: &Redis,
    keys: &Keys,
    hooks: Hooks<'_>,
    app: &str,
    channel: &str,
    socket_id: &str,
    cutoff: Option<u64>,
) -> Result<LeaveOutcome, Error> {
    let (script, hook) = script_keys(redis, keys, hooks, app, channel, "member_removed");
    let mut args = vec![
        socket_id.to_owned(),
        cutoff.map(|c| c.to_string()).unwrap_or_default(),
    ];
    args.extend(hook);
    let reply: Vec<Value> = LEAVE
        .evalsha_with_reload(&redis.client, script, args)
        .await?;
    let mut reply = reply.into_iter();
    let remaining = reply.next().and_then(|v| v.as_i64()).unwrap_or(0);
    let removed = match (reply.next().and_then(Value::into_string), reply.next()) {
        (Some(user_id), Some(json)) => {
            let json = json.as_string().unwrap_or_default();
            // Even a malformed entry was a member: announce it by its id.
            parse_member(user_id.clone(), &json).or_else(|| {
                Some(PresenceMember {
                    user_id_json: serde_json::Value::String(user_id.clone()).to_string(),
                    user_id,
                    user_info: None,
                })
            })
        }
        _ => None,
    };
    if let Some(member) = &removed {
        queue_member(
            redis,
            keys,
            hooks,
            app,
            channel,
            "member_removed",
            &member.user_id,
        )
        .await;
    }
    Ok(LeaveOutcome { removed, remaining })
}

/// Drops an empty channel from the presence index. Best effort: a join that
/// races with it is put back by its node's next refresh, well within the TTL.
pub(crate) async fn unindex_if_empty(redis: &Redis, keys: &Keys, app: &str, channel: &str) {
    let removed: Result<i64, Error> = redis
        .client
        .srem(keys.presence_index(), index_member(app, channel))
        .await;
    if let Err(e) = removed {
        tracing::debug!(error = %e, "presence index not cleaned; the sweep retries");
    }
}

/// Owns the periodic refresh and the restore after a reconnect.
async fn refresh_loop(inner: Arc<Inner>, stop: CancellationToken) {
    let period = inner.ttl / 3;
    let mut reconnects = inner.redis.client.reconnect_rx();
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {
                if let Err(e) = refresh(&inner).await {
                    tracing::warn!(node = %inner.node_id, error = %e, "presence refresh failed; retrying next tick");
                }
            }
            event = reconnects.recv() => {
                if let Err(tokio::sync::broadcast::error::RecvError::Closed) = event {
                    // The client is gone for good; refreshes keep failing
                    // quietly until the store is dropped.
                    reconnects = inner.redis.client.reconnect_rx();
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(period) => continue,
                    }
                }
                // Redis may have restarted empty: put this node's members back.
                let channels: Vec<_> = inner.mirror.lock().keys().cloned().collect();
                if !channels.is_empty() {
                    let restored = restore(&inner, channels).await;
                    tracing::info!(node = %inner.node_id, restored, "presence restored after a Redis reconnect");
                }
            }
        }
    }
}

/// Pushes every mirrored connection's expiry forward (`ZADD XX CH`, so a
/// connection that left meanwhile is not resurrected) and re-asserts the
/// channels in the presence index. A channel whose connections are missing
/// from Redis (a restart or flush the client did not notice) is restored.
async fn refresh(inner: &Arc<Inner>) -> Result<(), Error> {
    let snapshot: Vec<((String, String), Vec<String>)> = inner
        .mirror
        .lock()
        .iter()
        .map(|(key, sockets)| (key.clone(), sockets.keys().cloned().collect()))
        .collect();
    if snapshot.is_empty() {
        return Ok(());
    }
    let score = expiry_ms(inner.ttl) as f64;
    let mut missing: Vec<(String, String)> = Vec::new();
    for batch in snapshot.chunks(REFRESH_PIPELINE) {
        let pipeline = inner.redis.client.pipeline();
        // (index in batch, sockets sent) per ZADD, in pipeline order.
        let mut expected: Vec<(usize, i64)> = Vec::new();
        for (i, ((app, channel), sockets)) in batch.iter().enumerate() {
            for chunk in sockets.chunks(REFRESH_CHUNK) {
                let values: Vec<(f64, String)> = chunk.iter().map(|s| (score, s.clone())).collect();
                let () = pipeline
                    .zadd(
                        inner.keys.presence_expiry(app, channel),
                        Some(SetOptions::XX),
                        None,
                        true,
                        false,
                        values,
                    )
                    .await?;
                expected.push((i, chunk.len() as i64));
            }
        }
        let members: Vec<String> = batch.iter().map(|((a, c), _)| index_member(a, c)).collect();
        let () = pipeline.sadd(inner.keys.presence_index(), members).await?;
        let results: Vec<Result<Value, Error>> = pipeline.try_all().await;
        let mut short = Vec::new();
        for ((i, sent), got) in expected.into_iter().zip(results) {
            // CH counts the sockets whose expiry moved; XX skips absent ones.
            if got?.as_i64().unwrap_or(0) < sent && short.last() != Some(&i) {
                short.push(i);
            }
        }
        missing.extend(short.into_iter().map(|i| batch[i].0.clone()));
    }
    if !missing.is_empty() {
        let count = missing.len();
        let restored = restore(inner, missing).await;
        tracing::info!(node = %inner.node_id, channels = count, restored, "presence missing in Redis; restored");
    }
    Ok(())
}

/// Re-runs the join script for every mirrored connection of `channels`. It
/// announces nothing: the clients never saw these members leave.
async fn restore(inner: &Arc<Inner>, channels: Vec<(String, String)>) -> usize {
    let entries: Vec<(String, String, String, PresenceMember)> = {
        let mirror = inner.mirror.lock();
        channels
            .iter()
            .filter_map(|key| mirror.get(key).map(|sockets| (key, sockets)))
            .flat_map(|((app, channel), sockets)| {
                sockets.iter().map(|(socket, member)| {
                    (app.clone(), channel.clone(), socket.clone(), member.clone())
                })
            })
            .collect()
    };
    let restored = stream::iter(entries)
        .map(|(app, channel, socket_id, member)| {
            let inner = inner.clone();
            async move { restore_one(&inner, &app, &channel, &socket_id, &member).await }
        })
        .buffer_unordered(RESTORE_CONCURRENCY)
        .filter(|ok| std::future::ready(*ok))
        .count()
        .await;
    let members: Vec<String> = channels.iter().map(|(a, c)| index_member(a, c)).collect();
    if !members.is_empty() {
        let _: Result<i64, Error> = inner
            .redis
            .client
            .sadd(inner.keys.presence_index(), members)
            .await;
    }
    restored
}

async fn restore_one(
    inner: &Arc<Inner>,
    app: &str,
    channel: &str,
    socket_id: &str,
    member: &PresenceMember,
) -> bool {
    if !is_mirrored(inner, app, channel, socket_id) {
        return false;
    }
    // A restore is not refused for size: these members were admitted already.
    // No webhook: the member was announced when it first joined.
    match join_script(
        inner,
        app,
        channel,
        socket_id,
        member,
        usize::MAX,
        false,
        None,
    )
    .await
    {
        Ok(_) => {
            // The connection may have left while its join was in flight; its
            // own leave then ran first, so undo the write-back quietly.
            if !is_mirrored(inner, app, channel, socket_id) {
                let _ = leave_socket(
                    &inner.redis,
                    &inner.keys,
                    None,
                    app,
                    channel,
                    socket_id,
                    None,
                )
                .await;
                return false;
            }
            true
        }
        Err(e) => {
            tracing::warn!(error = %e, "presence restore failed; the next refresh retries");
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_keep_their_json_types() {
        let member = PresenceMember {
            user_id: "42".into(),
            user_id_json: "42".into(),
            user_info: Some(r#"{"name":"Ada","b":1}"#.into()),
        };
        let json = member_json(&member);
        assert_eq!(json, r#"[42,{"name":"Ada","b":1}]"#);
        assert_eq!(parse_member("42".into(), &json), Some(member));

        let string_id = PresenceMember {
            user_id: "7".into(),
            user_id_json: "\"7\"".into(),
            user_info: None,
        };
        assert_eq!(
            parse_member("7".into(), &member_json(&string_id)),
            Some(string_id)
        );
    }

    #[test]
    fn malformed_members_are_skipped() {
        assert_eq!(parse_member("1".into(), "not json"), None);
        assert_eq!(parse_member("1".into(), "[]"), None);
    }
}
