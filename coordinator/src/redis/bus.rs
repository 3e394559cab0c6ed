//! The Redis bus: one Redis pub/sub channel per Pusher channel, subscribed
//! only while this node has local subscribers on it, so an event reaches
//! only the nodes that need it.
//!
//! Subscribes and unsubscribes go through one task that takes every change
//! queued since its last round and sends them as one SUBSCRIBE and one
//! UNSUBSCRIBE, so churn costs a few commands rather than one per socket. A
//! subscriber waits until Redis confirmed its channel, so an event published
//! after `subscription_succeeded` cannot be missed. Publishing is one
//! pipeline per request and fails fast while Redis is away.
//!
//! Laravel's Redis broadcaster is read too: for apps with a
//! `laravel_redis_prefix`, the node also subscribes to `{prefix}{channel}`
//! and turns Laravel's `{"event","data","socket"}` into an envelope.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;
use futures_util::future::BoxFuture;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use super::{Redis, COMMAND_TIMEOUT};
use crate::bus::{is_cache_channel, is_cacheable_event, Bus, BusError, CacheTtl, Delivery};
use crate::envelope::{Envelope, EnvelopeKind};
use crate::keys::Keys;

/// How long a subscriber waits for Redis to confirm its channel.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(5);
/// Most channels sent in one SUBSCRIBE.
const SUBSCRIBE_BATCH: usize = 512;

#[derive(Default)]
struct Subscription {
    /// A local subscriber wants this Redis channel.
    wanted: bool,
    /// Redis confirmed the subscription and it has not been dropped since.
    confirmed: bool,
    waiters: Vec<oneshot::Sender<Result<(), BusError>>>,
}

struct Shared {
    redis: Redis,
    keys: Keys,
    cache_ttl: CacheTtl,
    /// app id -> Laravel Redis prefix.
    laravel: HashMap<String, String>,
    subscriptions: Mutex<HashMap<String, Subscription>>,
    changes: mpsc::UnboundedSender<String>,
}

pub struct RedisBus {
    shared: Arc<Shared>,
}

/// Laravel's Redis broadcaster payload.
#[derive(serde::Deserialize)]
struct LaravelMessage {
    event: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    socket: Option<String>,
}

impl RedisBus {
    /// Starts the bus's tasks (subscription batching, message intake); they
    /// stop when `stop` is cancelled.
    pub fn start(
        redis: Redis,
        keys: Keys,
        cache_ttl: CacheTtl,
        laravel_prefixes: HashMap<String, String>,
        delivery: Arc<dyn Delivery>,
        stop: CancellationToken,
    ) -> RedisBus {
        let (changes, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            redis,
            keys,
            cache_ttl,
            laravel: laravel_prefixes,
            subscriptions: Mutex::new(HashMap::new()),
            changes,
        });
        // The control channel (terminate_connections) is always wanted.
        shared.want(shared.keys.control());
        tokio::spawn(subscription_task(shared.clone(), rx, stop.clone()));
        tokio::spawn(intake_task(shared.clone(), delivery, stop));
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
    /// Marks `name` wanted; returns a receiver if confirmation is pending.
    fn want(&self, name: String) -> Option<oneshot::Receiver<Result<(), BusError>>> {
        let mut subs = self.subscriptions.lock();
        let sub = subs.entry(name.clone()).or_default();
        sub.wanted = true;
        if sub.confirmed {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        sub.waiters.push(tx);
        drop(subs);
        let _ = self.changes.send(name);
        Some(rx)
    }

    fn publish_channel(&self, envelope: &Envelope) -> String {
        match envelope.kind {
            EnvelopeKind::Event => self.keys.events(&envelope.app, &envelope.channel),
            EnvelopeKind::Terminate => self.keys.control(),
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
        let message: LaravelMessage = match serde_json::from_slice(payload) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(channel, error = %e, "dropping a Laravel broadcast that is not JSON");
                return None;
            }
        };
        let data = match message.data {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let mut envelope = Envelope::event(app, pusher_channel, &message.event, data);
        envelope.socket_id = message.socket.filter(|s| !s.is_empty());
        Some(envelope)
    }
}

async fn subscription_task(
    shared: Arc<Shared>,
    mut changes: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            n = changes.recv_many(&mut batch, SUBSCRIBE_BATCH * 4) => if n == 0 { return },
        }
        let touched: HashSet<String> = batch.drain(..).collect();
        let (mut subscribe, mut unsubscribe) = (Vec::new(), Vec::new());
        {
            let subs = shared.subscriptions.lock();
            for name in touched {
                match subs.get(&name) {
                    Some(s) if s.wanted && !s.confirmed => subscribe.push(name),
                    Some(s) if !s.wanted && s.confirmed => unsubscribe.push(name),
                    _ => {}
                }
            }
        }
        for chunk in subscribe.chunks(SUBSCRIBE_BATCH) {
            let result = if shared.redis.clustered {
                // Sharded channels of one SSUBSCRIBE must share a slot.
                let all = chunk
                    .iter()
                    .map(|c| shared.redis.subscriber.ssubscribe(c.clone()));
                futures_util::future::try_join_all(all).await.map(|_| ())
            } else {
                shared.redis.subscriber.subscribe(chunk.to_vec()).await
            };
            let mut subs = shared.subscriptions.lock();
            for name in chunk {
                let Some(sub) = subs.get_mut(name) else {
                    continue;
                };
                let outcome = match &result {
                    Ok(()) => {
                        sub.confirmed = true;
                        Ok(())
                    }
                    Err(e) => Err(BusError::Unavailable(format!("SUBSCRIBE failed: {e}"))),
                };
                for waiter in sub.waiters.drain(..) {
                    let _ = waiter.send(outcome.clone());
                }
                if !sub.wanted {
                    // Left while we were subscribing: drop it next round.
                    let _ = shared.changes.send(name.clone());
                }
            }
        }
        if !unsubscribe.is_empty() {
            let result = if shared.redis.clustered {
                let all = unsubscribe
                    .iter()
                    .map(|c| shared.redis.subscriber.sunsubscribe(c.clone()));
                futures_util::future::try_join_all(all).await.map(|_| ())
            } else {
                shared
                    .redis
                    .subscriber
                    .unsubscribe(unsubscribe.clone())
                    .await
            };
            if let Err(e) = &result {
                tracing::warn!(error = %e, "UNSUBSCRIBE failed; channels stay subscribed until reconnect");
            }
            let mut subs = shared.subscriptions.lock();
            for name in unsubscribe {
                if let Some(sub) = subs.get_mut(&name) {
                    if !sub.wanted {
                        sub.confirmed = false;
                        if sub.waiters.is_empty() {
                            subs.remove(&name);
                        }
                    } else if result.is_ok() {
                        // Wanted again while leaving: subscribe afresh.
                        sub.confirmed = false;
                        let _ = shared.changes.send(name.clone());
                    }
                }
            }
        }
    }
}

async fn intake_task(shared: Arc<Shared>, delivery: Arc<dyn Delivery>, stop: CancellationToken) {
    let mut messages = shared.redis.subscriber.message_rx();
    loop {
        let message = tokio::select! {
            _ = stop.cancelled() => return,
            m = messages.recv() => m,
        };
        match message {
            Ok(message) => {
                let Some(bytes) = message.value.as_bytes() else {
                    continue;
                };
                if let Some(envelope) = shared.decode(&message.channel, bytes) {
                    delivery.deliver(envelope).await;
                }
            }
            Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                tracing::error!(
                    missed = n,
                    "bus intake fell behind; {n} messages were dropped"
                );
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
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
        let mut subs = self.shared.subscriptions.lock();
        for name in self.redis_channels(app, channel) {
            if let Some(sub) = subs.get_mut(&name) {
                sub.wanted = false;
                let _ = self.shared.changes.send(name);
            }
        }
    }

    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'static, Result<(), BusError>> {
        let shared = self.shared.clone();
        Box::pin(async move {
            if !shared.redis.client.is_connected() {
                return Err(BusError::Unavailable("Redis is unreachable".into()));
            }
            let pipeline = shared.redis.client.pipeline();
            for envelope in &envelopes {
                let bytes = envelope.encode();
                let queued = async {
                    if envelope.kind == EnvelopeKind::Event
                        && is_cache_channel(&envelope.channel)
                        && is_cacheable_event(&envelope.event)
                    {
                        let ttl = shared.cache_ttl.for_app(&envelope.app).as_millis() as i64;
                        let key = shared.keys.cache(&envelope.app, &envelope.channel);
                        let _: () = pipeline
                            .set(
                                key,
                                bytes.as_slice(),
                                Some(Expiration::PX(ttl.max(1))),
                                None,
                                false,
                            )
                            .await?;
                    }
                    let channel = shared.publish_channel(envelope);
                    if shared.redis.clustered {
                        pipeline
                            .spublish::<(), _, _>(channel, bytes.as_slice())
                            .await
                    } else {
                        pipeline
                            .publish::<(), _, _>(channel, bytes.as_slice())
                            .await
                    }
                };
                queued
                    .await
                    .map_err(|e| BusError::Unavailable(format!("cannot queue the publish: {e}")))?;
            }
            match tokio::time::timeout(COMMAND_TIMEOUT, pipeline.all::<Vec<Value>>()).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(e)) => Err(BusError::Unavailable(format!(
                    "Redis refused the publish: {e}"
                ))),
                Err(_) => Err(BusError::Unavailable("Redis did not answer in time".into())),
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
        self.shared.redis.is_connected()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_for_decode() -> Option<Shared> {
        // Decoding needs no connection; building clients does not connect.
        let redis = Redis::connect("redis://127.0.0.1:1").ok()?;
        let (changes, _) = mpsc::unbounded_channel();
        Some(Shared {
            redis,
            keys: Keys::default(),
            cache_ttl: CacheTtl::default(),
            laravel: HashMap::from([("app1".to_owned(), "laravel_database_".to_owned())]),
            subscriptions: Mutex::new(HashMap::new()),
            changes,
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
