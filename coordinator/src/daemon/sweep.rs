//! The leader's sweep: expired presence connections out, `member_removed`
//! announced for each user who left with them, dead nodes' occupancy out.
//!
//! Every removal is the same leave script a node runs, with a cutoff so that
//! a connection refreshed after the sweep looked survives; its reply alone
//! decides whether a user left, so a user is announced once even if two
//! sweeps (or a sweep and the node itself) race.

use fred::prelude::*;
use futures_util::stream::{self, StreamExt, TryStreamExt};

use crate::envelope::Envelope;
use crate::keys::{parse_index_member, Keys};
use crate::publisher::Publisher;
use crate::redis::occupancy::{queue_edge, script_args, REAP};
use crate::redis::presence::{leave_socket, unindex_if_empty};
use crate::redis::Redis;
use crate::webhook::WebhookApps;

/// Expired connections handled per channel and sweep; the rest wait for the
/// next sweep, so one enormous channel cannot stall the others.
const EXPIRED_PER_CHANNEL: usize = 1000;
/// Channels with something due, swept concurrently.
const CHANNEL_CONCURRENCY: usize = 16;
/// Channels per pipeline in the first, cheap pass over the index.
const PEEK_PIPELINE: usize = 500;

/// What one sweep did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SweepReport {
    /// Presence channels looked at.
    pub channels: usize,
    /// Of those, channels with an expired connection (looked at closely).
    pub channels_due: usize,
    /// Connections removed because their expiry passed.
    pub connections_expired: usize,
    /// Users who left with them (`member_removed` published for each).
    pub presence_removals: usize,
    /// Nodes whose heartbeat lapsed and whose state was removed.
    pub nodes_reaped: usize,
}

pub(super) async fn sweep_presence(
    redis: &Redis,
    keys: &Keys,
    publisher: &Publisher,
    webhooks: &WebhookApps,
) -> Result<SweepReport, Error> {
    let index: Vec<String> = redis.client.smembers(keys.presence_index()).await?;
    let now = crate::envelope::now_us() / 1000;
    let mut channels = Vec::with_capacity(index.len());
    for member in &index {
        match parse_index_member(member) {
            Some(channel) => channels.push(channel),
            None => {
                // Not written by Belfry; it would be looked at forever.
                let _: i64 = redis
                    .client
                    .srem(keys.presence_index(), member.as_str())
                    .await?;
            }
        }
    }
    let mut report = SweepReport {
        channels: channels.len(),
        ..SweepReport::default()
    };
    let mut due = Vec::new();
    for batch in channels.chunks(PEEK_PIPELINE) {
        for (channel, state) in batch.iter().zip(peek(redis, keys, batch).await?) {
            match state {
                Earliest::Empty => unindex_if_empty(redis, keys, channel.0, channel.1).await,
                Earliest::At(ms) if ms <= now as f64 => {
                    due.push((channel.0.to_owned(), channel.1.to_owned()))
                }
                Earliest::At(_) => {}
            }
        }
    }
    report.channels_due = due.len();
    let per_channel: Vec<(usize, usize)> = stream::iter(due)
        .map(|(app, channel)| async move {
            sweep_channel(redis, keys, publisher, webhooks, &app, &channel, now).await
        })
        .buffer_unordered(CHANNEL_CONCURRENCY)
        .try_collect()
        .await?;
    for (expired, removed) in per_channel {
        report.connections_expired += expired;
        report.presence_removals += removed;
    }
    Ok(report)
}

/// The earliest expiry on a channel, or that it has no connection left.
enum Earliest {
    Empty,
    At(f64),
}

/// One `ZRANGE expiry 0 0 WITHSCORES` per channel, pipelined: most channels
/// have nothing due, and this is the cheapest way to know (O(log n), no script).
async fn peek(
    redis: &Redis,
    keys: &Keys,
    channels: &[(&str, &str)],
) -> Result<Vec<Earliest>, Error> {
    let pipeline = redis.client.pipeline();
    for (app, channel) in channels {
        let () = pipeline
            .zrange(
                keys.presence_expiry(app, channel),
                0,
                0,
                None,
                false,
                None,
                true,
            )
            .await?;
    }
    let replies: Vec<Value> = pipeline.all().await?;
    Ok(replies.into_iter().map(earliest).collect())
}

/// Reads `[member, score]` (RESP2) or `[[member, score]]` (RESP3).
fn earliest(reply: Value) -> Earliest {
    fn last_score(values: Vec<Value>) -> Option<f64> {
        match values.into_iter().last()? {
            Value::Array(inner) => last_score(inner),
            Value::Double(score) => Some(score),
            other => other.as_string()?.parse().ok(),
        }
    }
    match reply {
        Value::Array(values) if values.is_empty() => Earliest::Empty,
        Value::Null => Earliest::Empty,
        Value::Array(values) => last_score(values).map_or(Earliest::At(0.0), Earliest::At),
        // Anything else is not ours to judge; look at the channel closely.
        _ => Earliest::At(0.0),
    }
}

/// Removes a channel's expired connections. Returns (connections expired,
/// users removed).
async fn sweep_channel(
    redis: &Redis,
    keys: &Keys,
    publisher: &Publisher,
    webhooks: &WebhookApps,
    app: &str,
    channel: &str,
    now: u64,
) -> Result<(usize, usize), Error> {
    let expired: Vec<String> = redis
        .client
        .zrangebyscore(
            keys.presence_expiry(app, channel),
            "-inf",
            now as f64,
            false,
            Some((0, EXPIRED_PER_CHANNEL as i64)),
        )
        .await?;
    let mut announcements = Vec::new();
    let mut removed_count = 0;
    let mut remaining = -1;
    for socket_id in &expired {
        let outcome = leave_socket(
            redis,
            keys,
            Some(webhooks),
            app,
            channel,
            socket_id,
            Some(now),
        )
        .await?;
        remaining = outcome.remaining;
        if let Some(member) = outcome.removed {
            tracing::info!(app, channel, user_id = %member.user_id, socket_id, "presence expired: member_removed");
            removed_count += 1;
            announcements.push(Envelope::member_removed(app, channel, &member.user_id_json));
        } else {
            tracing::debug!(
                app,
                channel,
                socket_id,
                "presence connection expired; the user is still present"
            );
        }
    }
    if !announcements.is_empty() {
        // The members are gone from Redis already; if this publish fails the
        // clients miss the announcement but never see a ghost on reconnect.
        if let Err(e) = publisher.publish_batch(announcements).await {
            tracing::error!(app, channel, error = %e, "member_removed not published");
        }
    }
    metrics::counter!("belfry_coordinator_presence_removals_total").increment(removed_count as u64);
    if remaining == 0 {
        unindex_if_empty(redis, keys, app, channel).await;
    }
    Ok((expired.len(), removed_count))
}

/// Removes every node whose heartbeat expiry passed: its per-channel
/// occupancy, its per-app connection counts and its channel list.
pub(super) async fn reap_nodes(
    redis: &Redis,
    keys: &Keys,
    webhooks: &WebhookApps,
) -> Result<usize, Error> {
    let now = (crate::envelope::now_us() / 1000) as f64;
    let dead: Vec<String> = redis
        .client
        .zrangebyscore(keys.nodes(), "-inf", now, false, None)
        .await?;
    for node in &dead {
        reap_node(redis, keys, webhooks, node).await?;
        metrics::counter!("belfry_coordinator_nodes_reaped_total").increment(1);
    }
    Ok(dead.len())
}

async fn reap_node(
    redis: &Redis,
    keys: &Keys,
    webhooks: &WebhookApps,
    node: &str,
) -> Result<(), Error> {
    let client = &redis.client;
    let channels: Vec<String> = client.smembers(keys.node_channels(node)).await?;
    for member in &channels {
        let Some((app, channel)) = parse_index_member(member) else {
            continue;
        };
        let (script_keys, argv) =
            script_args(redis, keys, webhooks, node, app, channel, "channel_vacated");
        // The dead node held the last subscribers: this is the channel's vacated edge.
        let (still_occupied, vacated): (i64, i64) =
            REAP.evalsha_with_reload(client, script_keys, argv).await?;
        if vacated == 1 {
            queue_edge(redis, keys, webhooks, app, channel, "channel_vacated").await;
        }
        if still_occupied == 0 {
            let _: i64 = client.srem(keys.channel_index(app), channel).await?;
        }
    }
    // Both keys carry the `{nodes}` tag: one DEL works on a Cluster too.
    let _: i64 = client
        .del(vec![keys.node_channels(node), keys.node_connections(node)])
        .await?;
    let _: i64 = client.zrem(keys.nodes(), node).await?;
    tracing::info!(
        node,
        channels = channels.len(),
        "reaped a node whose heartbeat lapsed"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(s: &str) -> Value {
        Value::String(s.into())
    }

    #[test]
    fn reads_the_earliest_expiry_in_either_protocol() {
        let resp2 = Value::Array(vec![text("1.1"), text("1764270000123")]);
        assert!(matches!(earliest(resp2), Earliest::At(ms) if ms == 1764270000123.0));
        let resp3 = Value::Array(vec![Value::Array(vec![text("1.1"), Value::Double(5.0)])]);
        assert!(matches!(earliest(resp3), Earliest::At(ms) if ms == 5.0));
        assert!(matches!(earliest(Value::Array(vec![])), Earliest::Empty));
        assert!(matches!(earliest(Value::Null), Earliest::Empty));
    }
}
