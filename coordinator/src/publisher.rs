//! Publishing envelopes straight into Redis, without a node in between: for
//! Rust services that want to broadcast, for the coordinator's own
//! `member_removed` announcements, and for `belfry-coordinator publish`.
//!
//! It is the one Redis publish path: a node's HTTP API and client events go
//! through it too (via the Redis bus). It writes one envelope per Pusher
//! channel on that channel's pub/sub channel (`SPUBLISH` on a Redis Cluster),
//! and for cache channels the last event under the channel's cache key first,
//! in the same pipeline, so a client subscribing right after sees it. It is
//! not a bus: it never subscribes.
//!
//! A publish is sent once. It fails with `NotSent` only when nothing was
//! handed to Redis (Redis is known to be down or stalled, or refused every
//! command), and with `Unknown` once something may have been written: a
//! retry of an `Unknown` publish may deliver it twice.

use std::time::Duration;

use fred::prelude::*;
use fred::types::Expiration;

use crate::bus::{is_cache_channel, is_cacheable_event, CacheTtl};
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
    /// Nothing was sent and nothing will be: retrying is safe.
    #[error("not published: {0}")]
    NotSent(String),
    /// It may have been published: retrying may duplicate it.
    #[error("outcome unknown, the events may have been published: {0}")]
    Unknown(String),
}

/// Writes envelopes into Redis. Clone it freely; it shares the Redis client.
#[derive(Clone)]
pub struct Publisher {
    redis: Redis,
    keys: Keys,
    cache_ttl: CacheTtl,
}

impl Publisher {
    pub fn new(redis: Redis, keys: Keys) -> Self {
        Self {
            redis,
            keys,
            cache_ttl: CacheTtl {
                by_app: Default::default(),
                default: DEFAULT_CACHE_TTL,
            },
        }
    }

    /// How long cache channels keep their last event.
    pub fn with_cache_ttl(mut self, ttl: Duration) -> Self {
        self.cache_ttl.default = ttl;
        self
    }

    /// How long each app's cache channels keep their last event.
    pub fn with_cache_ttls(mut self, ttls: CacheTtl) -> Self {
        self.cache_ttl = ttls;
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
        if !self.redis.is_healthy() {
            return Err(PublishError::NotSent(
                "Redis is unreachable or not answering".into(),
            ));
        }
        let mut receivers = Vec::with_capacity(envelopes.len());
        for (i, batch) in envelopes.chunks(PIPELINE_LIMIT).enumerate() {
            let pipeline = self.redis.client.pipeline();
            // Which pipeline replies are PUBLISH counts (the SETs are not).
            let mut is_publish = Vec::with_capacity(batch.len() * 2);
            for envelope in batch {
                let bytes = envelope.encode();
                let target = match envelope.kind {
                    EnvelopeKind::Event => self.keys.events(&envelope.app, &envelope.channel),
                    EnvelopeKind::Terminate => self.keys.control(),
                };
                // Queueing in a pipeline only buffers locally.
                let queued: Result<(), Error> = async {
                    if should_cache(envelope) {
                        let ttl = self.cache_ttl.for_app(&envelope.app).as_millis().max(1);
                        let () = pipeline
                            .set(
                                self.keys.cache(&envelope.app, &envelope.channel),
                                bytes.as_slice(),
                                Some(Expiration::PX(ttl as i64)),
                                None,
                                false,
                            )
                            .await?;
                        is_publish.push(false);
                    }
                    if self.redis.clustered {
                        pipeline.spublish(target, bytes).await
                    } else {
                        pipeline.publish(target, bytes).await
                    }
                }
                .await;
                queued.map_err(|e| PublishError::NotSent(format!("cannot queue: {e}")))?;
                is_publish.push(true);
            }
            let replies = pipeline.try_all::<Value>().await;
            let refused = replies.iter().filter(|r| r.is_err()).count();
            if refused > 0 {
                let first = replies
                    .iter()
                    .find_map(|r| r.as_ref().err())
                    .map(|e| e.to_string())
                    .unwrap_or_default();
                // Redis answering with an error for every command of the
                // first pipeline means none was taken; anything else may
                // have published part of the batch.
                let all_refused = i == 0
                    && refused == replies.len()
                    && replies.iter().all(|r| {
                        r.as_ref().err().is_some_and(|e| {
                            *e.kind() != ErrorKind::IO
                                && *e.kind() != ErrorKind::Timeout
                                && *e.kind() != ErrorKind::Canceled
                        })
                    });
                return Err(if all_refused {
                    PublishError::NotSent(format!("Redis refused the publish: {first}"))
                } else {
                    PublishError::Unknown(first)
                });
            }
            receivers.extend(
                replies
                    .into_iter()
                    .zip(is_publish)
                    .filter(|(_, publish)| *publish)
                    .map(|(reply, _)| reply.ok().and_then(|v| v.as_i64()).unwrap_or(0)),
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
