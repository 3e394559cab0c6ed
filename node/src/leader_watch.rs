//! Cluster mode: is some coordinator leading? Presence cleanup after a node
//! dies and webhook delivery are the leader's work, so a cluster without
//! one looks healthy while ghost members pile up. The node checks the
//! leader lock (`coordinator::keys::Keys::leader`) every few seconds, warns
//! when it is missing and reports it in `belfry_coordinator_leader_present`.

use std::time::Duration;

use belfry_coordinator::keys::Keys;
use belfry_coordinator::redis::Redis;
use fred::interfaces::KeysInterface;
use tokio_util::sync::CancellationToken;

/// How often the lock is looked at; the coordinator's lock lives 5 s by default.
const EVERY: Duration = Duration::from_secs(5);

pub async fn run(redis: Redis, keys: Keys, stop: CancellationToken) {
    let gauge = metrics::gauge!("belfry_coordinator_leader_present");
    let key = keys.leader();
    // None until the first answer, so the first absence is warned about.
    let mut last: Option<bool> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(if last.is_none() { Duration::from_secs(1) } else { EVERY }) => {}
        }
        // Redis being away is reported by readiness; say nothing of the leader then.
        let Ok(n) = redis.client.exists::<i64, _>(key.as_str()).await else {
            continue;
        };
        let present = n > 0;
        gauge.set(if present { 1.0 } else { 0.0 });
        if last != Some(present) {
            if present {
                if last.is_some() {
                    tracing::info!("a belfry-coordinator leads the cluster again");
                }
            } else {
                tracing::warn!(
                    lock = %key,
                    "no belfry-coordinator leads this cluster: presence of crashed nodes is not \
                     cleaned up and webhooks are not delivered until one runs (same Redis and redis_prefix)"
                );
            }
            last = Some(present);
        }
    }
}
