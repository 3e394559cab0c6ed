//! Publishing envelopes straight into Redis, without a node in between: for
//! Rust services that want to broadcast, for the coordinator's own
//! `member_removed` announcements, and for `belfry-coordinator publish`.
//!
//! It writes exactly what a node's HTTP API would: one envelope per Pusher
//! channel on that channel's pub/sub channel (`SPUBLISH` on a Redis Cluster),
//! and for cache channels the last event under the channel's cache key first,
//! in the same pipeline, so a client subscribing right after sees it. It is
//! not a bus: it never subscribes.

use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;

use crate::bus::{is_cache_channel, is_cacheable_event};
use crate::envelope::{Envelope, EnvelopeKind};
use crate::keys::Keys;
use crate::redis::Redis;

/// How long a cache channel keeps its last event unless told otherwise
/// (the node's `cache_ttl_secs` default).
pub const DEFAULT_CACHE_TTL: Duration = Duration::from_secs(30 * 60);

/// Envelopes per pipeline, so that one huge batch does not become one huge write.
const PIPELINE_LIMIT: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("Redis did not take the publish: {0}")]
    Unavailable(#[from] Error),
}

/// Writes envelopes into Redis. Clone it freely; it shares the Redis client.
#[derive(Clone)]
pub struct Publisher {
    redis: Redis,
    keys: Keys,
    cache_ttl: Duration,
}

impl Publisher {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            cache_ttl: DEFAULT_CACHE_TTL,
        }
    }

    /// How long cache channels keep their last event.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl = ttl;
        self
    }

    /// Publishes one event. `data` is the event data as clients receive it
    /// (a string, usually JSON text); `socket_id` is left out of the fan-out.
    pub async fn publish(
        &self,
        app: &str,
        channel: &str,
        event: &str,
        data: String,
        socket_id: Option<String>,
    ) -> Result<(), PublishError> {
        let mut envelope = Envelope::event(app, channel, event, data);
        envelope.socket_id = socket_id;
        self.publish_batch(vec![envelope]).await.map(|_| ())
    }

    /// Publishes envelopes in order and returns, per envelope, how many
    /// subscribers Redis handed it to (nodes with local subscribers, not
    /// sockets). Resolves only after Redis took all of them.
    pub async fn publish_batch(&self, envelopes: Vec<Envelope>) -> Result<Vec<i64>, PublishError> {
        let mut receivers = Vec::with_capacity(envelopes.len());
        for batch in envelopes.chunks(PIPELINE_LIMIT) {
            let pipeline = self.redis.client.pipeline();
            // Which pipeline replies are PUBLISH counts (the SETs are not).
            let mut is_publish = Vec::with_capacity(batch.len() * 2);
            for envelope in batch {
                let bytes = envelope.encode();
                let target = match envelope.kind {
                    EnvelopeKind::Event => self.keys.events(&envelope.app, &envelope.channel),
                    EnvelopeKind::Terminate => self.keys.control(),
                };
                if should_cache(envelope) {
                    let () = pipeline
                        .set(
                            self.keys.cache(&envelope.app, &envelope.channel),
                            bytes.as_slice(),
                            Some(Expiration::PX(self.cache_ttl.as_millis().max(1) as i64)),
                            None,
                            false,
                        )
                        .await?;
                    is_publish.push(false);
                }
                if self.redis.clustered {
                    let () = pipeline.spublish(target, bytes).await?;
                } else {
                    let () = pipeline.publish(target, bytes).await?;
                }
                is_publish.push(true);
            }
            let replies: Vec<Value> = pipeline.all().await?;
            receivers.extend(
                replies
                    .into_iter()
                    .zip(is_publish)
                    .filter(|(_, publish)| *publish)
                    .map(|(reply, _)| reply.as_i64().unwrap_or(0)),
            );
        }
        Ok(receivers)
    }
}

fn should_cache(envelope: &Envelope) -> bool {
    envelope.kind == EnvelopeKind::Event
        && is_cache_channel(&envelope.channel)
        && is_cacheable_event(&envelope.event)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_ordinary_events_on_cache_channels_are_cached() {
        let cached = Envelope::event("a", "cache-prices", "update", "{}".into());
        assert!(should_cache(&cached));
        let client_event = Envelope::event("a", "private-cache-x", "client-typing", "{}".into());
        assert!(!should_cache(&client_event));
        let internal = Envelope::event(
            "a",
            "presence-cache-x",
            "pusher_internal:member_removed",
            "{}".into(),
        );
        assert!(!should_cache(&internal));
        assert!(!should_cache(&Envelope::event(
            "a",
            "prices",
            "update",
            "{}".into()
        )));
        assert!(!should_cache(&Envelope::terminate("a", "1")));
    }
}
