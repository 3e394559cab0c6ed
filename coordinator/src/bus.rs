//! The bus carries envelopes from any publisher to every node with local
//! subscribers for the envelope's channel.
//!
//! Two implementations stand behind one trait: `LocalBus` hands envelopes
//! straight back to this process (the single-node default), the Redis bus
//! publishes them to one Redis channel per Pusher channel. The node does not
//! know which one it has.

use std::sync::Arc;

use futures_util::future::BoxFuture;

use crate::envelope::Envelope;

/// Where a bus hands the envelopes that reach this node. The node's channel
/// registry implements it with bounded queues: when they are full the
/// returned future waits, so a bus stops reading (and Redis's socket fills)
/// instead of dropping what it was handed.
pub trait Delivery: Send + Sync + 'static {
    fn deliver(&self, envelope: Envelope) -> BoxFuture<'_, ()>;
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum BusError {
    /// Not done, and it never will be (a publish was not sent).
    #[error("the bus is unavailable: {0}")]
    Unavailable(String),
    /// A publish may or may not have been taken; a retry may duplicate it.
    #[error("outcome unknown: {0}")]
    Unknown(String),
}

pub trait Bus: Send + Sync + 'static {
    /// Start receiving envelopes for `channel` of `app`. Resolves once the
    /// subscription is confirmed, so that an event published afterwards is
    /// certain to arrive.
    fn subscribe(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), BusError>>;

    /// Stop receiving envelopes for `channel` (its last local subscriber left).
    fn unsubscribe(&self, app: &str, channel: &str);

    /// Publish envelopes in order. Resolves only after the bus took all of them.
    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'static, Result<(), BusError>>;

    /// The last event published on a cache channel, while its TTL lasts.
    fn cached(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Option<Envelope>, BusError>>;

    /// Whether publishes are expected to succeed now (readiness).
    fn is_ready(&self) -> bool;

    /// Stops taking envelopes (shutdown). The Redis bus's readers also stop
    /// on the node's stop token; the in-process bus has nothing to stop.
    fn close(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

/// The in-process bus: publishing is delivering.
pub struct LocalBus {
    delivery: Arc<dyn Delivery>,
    cache: parking_lot::Mutex<
        std::collections::HashMap<(String, String), (Envelope, std::time::Instant)>,
    >,
    cache_ttl: CacheTtl,
}

/// How long each app's cache channels keep their last event.
#[derive(Clone, Default)]
pub struct CacheTtl {
    pub by_app: std::collections::HashMap<String, std::time::Duration>,
    pub default: std::time::Duration,
}

impl CacheTtl {
    pub fn for_app(&self, app: &str) -> std::time::Duration {
        self.by_app.get(app).copied().unwrap_or(self.default)
    }
}

impl LocalBus {
    pub fn new(delivery: Arc<dyn Delivery>, cache_ttl: CacheTtl) -> Self {
        Self {
            delivery,
            cache: Default::default(),
            cache_ttl,
        }
    }
}

/// Cache channels keep their last event: `cache-`, `private-cache-`,
/// `presence-cache-`, `private-encrypted-cache-`.
pub fn is_cache_channel(channel: &str) -> bool {
    channel.starts_with("cache-")
        || channel.starts_with("private-cache-")
        || channel.starts_with("presence-cache-")
        || channel.starts_with("private-encrypted-cache-")
}

/// Client events and the server's own `pusher*` events are never cached.
pub fn is_cacheable_event(event: &str) -> bool {
    !event.starts_with("client-") && !event.starts_with("pusher")
}

impl Bus for LocalBus {
    fn subscribe(&self, _app: &str, _channel: &str) -> BoxFuture<'static, Result<(), BusError>> {
        Box::pin(async { Ok(()) })
    }

    fn unsubscribe(&self, _app: &str, _channel: &str) {}

    fn publish(&self, envelopes: Vec<Envelope>) -> BoxFuture<'static, Result<(), BusError>> {
        for envelope in &envelopes {
            if envelope.kind == crate::EnvelopeKind::Event
                && is_cache_channel(&envelope.channel)
                && is_cacheable_event(&envelope.event)
            {
                let key = (envelope.app.clone(), envelope.channel.clone());
                self.cache
                    .lock()
                    .insert(key, (envelope.clone(), std::time::Instant::now()));
            }
        }
        // Publishing waits for room in the fan-out, as a Redis publish waits
        // for Redis: the publisher is slowed down, nothing is dropped.
        let delivery = self.delivery.clone();
        Box::pin(async move {
            for envelope in envelopes {
                delivery.deliver(envelope).await;
            }
            Ok(())
        })
    }

    fn cached(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Option<Envelope>, BusError>> {
        let mut cache = self.cache.lock();
        let key = (app.to_owned(), channel.to_owned());
        let hit = match cache.get(&key) {
            Some((envelope, at)) if at.elapsed() < self.cache_ttl.for_app(app) => {
                Some(envelope.clone())
            }
            Some(_) => {
                cache.remove(&key);
                None
            }
            None => None,
        };
        Box::pin(async move { Ok(hit) })
    }

    fn is_ready(&self) -> bool {
        true
    }
}
