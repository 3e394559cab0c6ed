//! Pusher's subscription counting: `pusher_internal:subscription_count` to
//! the subscribers of each channel (pusher-js surfaces it as
//! `pusher:subscription_count`), for apps with `subscription_count_events`.
//!
//! Coalesced by polling, not by event: once a second every node reads the
//! cluster-wide count of each channel it holds subscribers of and tells its
//! own subscribers when the count differs from what it last told them. A
//! thousand clients joining at once therefore cost each subscriber at most
//! one frame a second, the last value wins, and no message crosses the bus:
//! each node serves its own sockets from the same shared count. Presence
//! channels never get it (their member list is the count).
//!
//! The `subscription_count` webhook follows the same ticks, from one node
//! per channel (the occupancy store names it) and only when the cluster-wide
//! count changed; so it needs apps with `subscription_count_events` too.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use belfry_coordinator::webhook::Job;
use belfry_coordinator::{Delivery, Envelope};
use futures_util::stream::{self, StreamExt};
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::registry::ONLINE_CHANNEL;

/// How often counts are looked at: Pusher's "at most once a second".
pub const EVERY: Duration = Duration::from_secs(1);
/// Count lookups in flight at once (one Redis round trip each in a cluster).
const LOOKUPS: usize = 32;

/// Whether `channel` gets subscription counts.
fn counted(channel: &str) -> bool {
    !channel.starts_with("presence-") && channel != ONLINE_CHANNEL && !channel.starts_with('#')
}

/// Sends counts until `stop` is cancelled. Returns at once when no app has
/// `subscription_count_events`.
pub async fn run(node: Arc<Node>, stop: CancellationToken) {
    if !node
        .registry
        .apps()
        .any(|a| a.config.subscription_count_events)
    {
        return;
    }
    let mut told = HashMap::new();
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        round(&node, &mut told).await;
    }
}

/// What a node last did for one channel.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Told {
    /// The cluster-wide count its subscribers were told.
    total: usize,
    /// Its local subscriptions then.
    local: usize,
}

/// One look at every counted channel this node holds subscribers of.
async fn round(node: &Arc<Node>, told: &mut HashMap<(String, String), Told>) {
    let mut held = Vec::new();
    for app in node
        .registry
        .apps()
        .filter(|a| a.config.subscription_count_events)
    {
        for (channel, local) in app.channels() {
            if counted(&channel) {
                held.push((app.config.id.clone(), channel, local.subscriptions));
            }
        }
    }
    let counts: Vec<_> = stream::iter(held)
        .map(|(app, channel, local)| async move {
            let total = node.occupancy.count_to_report(&app, &channel).await;
            (app, channel, local, total)
        })
        .buffer_unordered(LOOKUPS)
        .collect()
        .await;
    let mut still = HashMap::with_capacity(counts.len());
    for (app, channel, local, total) in counts {
        let key = (app, channel);
        let Ok((total, reporter)) = total else {
            // Redis is away: say nothing rather than a wrong count.
            if let Some(last) = told.remove(&key) {
                still.insert(key, last);
            }
            continue;
        };
        let now = Told { total, local };
        let last = told.remove(&key);
        // The local count is compared too: a subscriber who joined as
        // another left elsewhere has not been told the (unchanged) count.
        if last != Some(now) {
            let data = serde_json::json!({ "subscription_count": total }).to_string();
            let envelope =
                Envelope::event(&key.0, &key.1, "pusher_internal:subscription_count", data);
            node.registry.deliver(envelope).await;
        }
        if reporter && last.map(|l| l.total) != Some(total) {
            let mut job = Job::new(&key.0, &key.1, "subscription_count");
            job.subscription_count = Some(total);
            node.webhook(job);
        }
        still.insert(key, now);
    }
    // Channels this node no longer holds are forgotten.
    *told = still;
}
