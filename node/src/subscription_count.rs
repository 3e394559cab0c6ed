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
use tokio_util::sync::CancellationToken;

use crate::node::Node;
use crate::registry::ONLINE_CHANNEL;

/// How often counts are looked at: Pusher's "at most once a second".
pub const EVERY: Duration = Duration::from_secs(1);

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

/// One look at every counted channel this node holds subscribers of: one
/// batched count lookup per app.
async fn round(node: &Arc<Node>, told: &mut HashMap<(String, String), Told>) {
    let mut still = HashMap::with_capacity(told.len());
    for app in node
        .registry
        .apps()
        .filter(|a| a.config.subscription_count_events)
    {
        let id = &app.config.id;
        let (names, locals): (Vec<String>, Vec<usize>) = app
            .channels()
            .into_iter()
            .filter(|(channel, _)| counted(channel))
            .map(|(channel, local)| (channel, local.subscriptions))
            .unzip();
        let Ok(counts) = node.occupancy.counts_to_report(id, names.clone()).await else {
            // Redis is away: say nothing rather than a wrong count.
            for name in names {
                let key = (id.clone(), name);
                if let Some(last) = told.remove(&key) {
                    still.insert(key, last);
                }
            }
            continue;
        };
        for ((name, local), (total, reporter)) in names.into_iter().zip(locals).zip(counts) {
            let key = (id.clone(), name);
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
    }
    // Channels this node no longer holds are forgotten.
    *told = still;
}
