//! Leader election over one Redis key: `SET <leader> <id> NX PX ttl` to take
//! it, a compare-and-pexpire script to keep it, a compare-and-del script to
//! hand it over on shutdown.
//!
//! A follower does not poll blindly: when the lock is held it sleeps until
//! the lock's own expiry (PTTL), so a crashed leader is replaced about one
//! TTL after its last renewal, and a leader that shuts down publishes a
//! wake-up on the lock's name so the follower takes over at once.

use std::sync::LazyLock;
use std::time::Duration;

use fred::prelude::*;
use fred::types::scripts::Script;
use fred::types::{Expiration, SetOptions};
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::CoordinatorOptions;
use crate::keys::Keys;
use crate::redis::Redis;

static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/leader_renew.lua")));
static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::from_lua(include_str!("../lua/leader_release.lua")));

/// A follower re-checks at least this soon after the lock vanished, so a
/// lock deleted between SET NX and PTTL does not become a busy loop.
const MIN_RETRY: Duration = Duration::from_millis(5);

pub(super) struct Election {
    redis: Redis,
    key: String,
    id: String,
    ttl: Duration,
}

enum Attempt {
    Leading,
    Following { retry_in: Duration },
}

impl Election {
    pub(super) fn new(redis: &Redis, keys: &Keys, options: &CoordinatorOptions) -> Self {
        Self {
            redis: redis.clone(),
            key: keys.leader(),
            id: options.instance_id.clone(),
            ttl: options.leader_ttl.max(Duration::from_millis(30)),
        }
    }

    fn period(&self) -> Duration {
        self.ttl / 3
    }

    /// Keeps trying to lead (and keeps leading) until `shutdown`; publishes
    /// the outcome of each attempt on `leader`. It does not release the lock:
    /// the caller does that after the sweep in progress has ended.
    pub(super) async fn campaign(
        &self,
        leader: &watch::Sender<bool>,
        shutdown: &CancellationToken,
    ) {
        let mut wakeups = Some(self.redis.subscriber.message_rx());
        let mut listening = false;
        let mut last_renewal: Option<Instant> = None;
        loop {
            if !listening {
                listening = self.listen_for_release().await;
            }
            let started = Instant::now();
            let wait = match self.attempt().await {
                Ok(Attempt::Leading) => {
                    last_renewal = Some(started);
                    self.set_leading(leader, true);
                    self.period()
                }
                Ok(Attempt::Following { retry_in }) => {
                    last_renewal = None;
                    self.set_leading(leader, false);
                    retry_in.clamp(MIN_RETRY, self.period())
                }
                Err(e) => {
                    // The lock was extended to at least `last_renewal + ttl`:
                    // keep leading through a short blip, well before that.
                    let still_ours = last_renewal.is_some_and(|at| at.elapsed() < self.ttl / 2);
                    if !still_ours {
                        self.set_leading(leader, false);
                    }
                    tracing::warn!(error = %e, "leader election: Redis unavailable");
                    self.period()
                }
            };
            let deadline = started + wait;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    released = next_message(&mut wakeups) => {
                        if released.as_deref() == Some(self.key.as_str()) && !*leader.borrow() {
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Renew if we hold the lock, else try to take it.
    async fn attempt(&self) -> Result<Attempt, Error> {
        let client = &self.redis.client;
        let ttl_ms = self.ttl.as_millis() as i64;
        let renewed: i64 = RENEW
            .evalsha_with_reload(
                client,
                vec![self.key.clone()],
                vec![self.id.clone(), ttl_ms.to_string()],
            )
            .await?;
        if renewed == 1 {
            return Ok(Attempt::Leading);
        }
        let taken: Option<String> = client
            .set(
                &self.key,
                self.id.as_str(),
                Some(Expiration::PX(ttl_ms)),
                Some(SetOptions::NX),
                false,
            )
            .await?;
        if taken.is_some() {
            return Ok(Attempt::Leading);
        }
        let pttl: i64 = client.pttl(&self.key).await?;
        let retry_in = match pttl {
            // Gone since the SET: try again right away.
            -2 => MIN_RETRY,
            // Set without an expiry by someone else: poll.
            -1 => self.period(),
            ms => Duration::from_millis(ms.max(0) as u64 + 2),
        };
        Ok(Attempt::Following { retry_in })
    }

    /// Deletes the lock if it is ours and wakes the follower.
    pub(super) async fn release(&self) -> Result<bool, Error> {
        let client = &self.redis.client;
        let released: i64 = RELEASE
            .evalsha_with_reload(client, vec![self.key.clone()], vec![self.id.clone()])
            .await?;
        if released == 1 {
            let woken: Result<i64, Error> = if self.redis.clustered {
                client.spublish(&self.key, self.id.as_str()).await
            } else {
                client.publish(&self.key, self.id.as_str()).await
            };
            if let Err(e) = woken {
                tracing::debug!(error = %e, "release wake-up not published; the follower polls");
            }
        }
        Ok(released == 1)
    }

    async fn listen_for_release(&self) -> bool {
        let subscriber = &self.redis.subscriber;
        let subscribed = if self.redis.clustered {
            subscriber.ssubscribe(self.key.as_str()).await
        } else {
            subscriber.subscribe(self.key.as_str()).await
        };
        subscribed.is_ok()
    }

    fn set_leading(&self, leader: &watch::Sender<bool>, leading: bool) {
        let changed =
            leader.send_if_modified(|current| std::mem::replace(current, leading) != leading);
        metrics::gauge!("belfry_coordinator_leader").set(if leading { 1.0 } else { 0.0 });
        if changed {
            if leading {
                tracing::info!(instance = %self.id, "became the leader");
            } else {
                tracing::warn!(instance = %self.id, "no longer the leader");
            }
        }
    }
}

/// The channel of the next pub/sub message, or never when the receiver is
/// gone (the subscriber client was dropped): the follower then just polls.
async fn next_message(
    messages: &mut Option<tokio::sync::broadcast::Receiver<fred::types::Message>>,
) -> Option<String> {
    let Some(receiver) = messages else {
        return std::future::pending().await;
    };
    match receiver.recv().await {
        Ok(message) => Some(message.channel.to_string()),
        Err(RecvError::Lagged(_)) => None,
        Err(RecvError::Closed) => {
            *messages = None;
            None
        }
    }
}
