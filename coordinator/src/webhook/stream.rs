//! The durable webhook queue on Redis: a capped stream of jobs that the
//! occupancy scripts XADD to, consumed by the coordinator's leader with a
//! consumer group.
//!
//! An entry is acknowledged (XACK, then XDEL) only when every URL that
//! wanted it took it or gave up, so a leader killed mid-batch leaves its
//! entries pending; the next leader claims them (XAUTOCLAIM) and delivers
//! them again, with the same `X-Belfry-Webhook-Id`. Entries the cap trimmed
//! before anyone read them are counted as dropped.

use std::sync::Arc;
use std::time::Duration;

use fred::prelude::*;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

use super::dispatch::{Dispatcher, Done};
use super::{Job, WebhookApps};
use crate::keys::Keys;
use crate::redis::Redis;

/// The consumer group every coordinator replica joins.
pub const GROUP: &str = "belfry";
/// Approximate cap on the stream's length (XADD MAXLEN ~).
pub const MAX_LEN: u64 = 100_000;
/// Jobs read but not yet acknowledged, at most.
const IN_FLIGHT: usize = 10_000;
const READ_COUNT: u64 = 100;
const BLOCK_MS: u64 = 1000;

/// The stream entry's fields, as the scripts and `add` write them.
pub fn fields(job: &Job) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("app", job.app.clone()),
        ("channel", job.channel.clone()),
        ("name", job.name.clone()),
    ];
    for (field, value) in job.optional_fields() {
        if let Some(value) = value {
            f.push((field, value.clone()));
        }
    }
    if let Some(n) = job.subscription_count {
        f.push(("subscription_count", n.to_string()));
    }
    f
}

/// Adds a job to the stream as a step of its own (Redis Cluster, where the
/// stream is in another slot than the channel's script keys).
pub async fn add(redis: &Redis, keys: &Keys, job: &Job) -> Result<(), Error> {
    let _: String = redis
        .client
        .xadd(
            keys.webhook_queue(),
            false,
            ("MAXLEN", "~", MAX_LEN as i64),
            "*",
            fields(job),
        )
        .await?;
    Ok(())
}

/// After a script decided an edge: on a Redis Cluster, where the script
/// could not reach the stream's slot, queue the job as a step of its own.
/// Elsewhere the script queued it already.
pub async fn queue_after_script(redis: &Redis, keys: &Keys, webhooks: &WebhookApps, job: Job) {
    if !redis.clustered || !webhooks.wants(&job.app, &job.name, &job.channel) {
        return;
    }
    if let Err(e) = add(redis, keys, &job).await {
        metrics::counter!("belfry_webhook_dropped_total", "reason" => "redis").increment(1);
        tracing::error!(app = job.app, channel = job.channel, name = job.name, error = %e, "webhook job not queued");
    }
}

/// A `Sink` into the Redis stream, for jobs a node decides by itself (a
/// client event is one sender's, so no script is needed to decide it). Each
/// job is one `XADD` on the node's task tracker; `send` never waits.
pub struct StreamSink {
    redis: Redis,
    keys: Keys,
    tasks: tokio_util::task::TaskTracker,
}

impl StreamSink {
    pub fn new(redis: Redis, keys: Keys, tasks: tokio_util::task::TaskTracker) -> StreamSink {
        StreamSink { redis, keys, tasks }
    }
}

impl super::Sink for StreamSink {
    fn send(&self, job: Job) {
        let (redis, keys) = (self.redis.clone(), self.keys.clone());
        self.tasks.spawn(async move {
            if let Err(e) = add(&redis, &keys, &job).await {
                metrics::counter!("belfry_webhook_dropped_total", "reason" => "redis").increment(1);
                tracing::error!(app = job.app, channel = job.channel, name = job.name, error = %e, "webhook job not queued");
            }
        });
    }
}

fn job_from(id: &str, fields: Vec<(String, String)>) -> Option<Job> {
    let mut job = Job::new("", "", "");
    for (k, v) in fields {
        match k.as_str() {
            "app" => job.app = v,
            "channel" => job.channel = v,
            "name" => job.name = v,
            "user_id" => job.user_id = Some(v),
            "event" => job.event = Some(v),
            "data" => job.data = Some(v),
            "socket_id" => job.socket_id = Some(v),
            "subscription_count" => job.subscription_count = v.parse().ok(),
            _ => {}
        }
    }
    job.at_ms = id.split('-').next()?.parse().ok()?;
    job.id = id.to_owned();
    (!job.app.is_empty() && !job.name.is_empty()).then_some(job)
}

/// `[[id, [k, v, ...]], ...]` as XREADGROUP and XAUTOCLAIM answer; an
/// entry trimmed meanwhile comes back with no fields.
/// A stream entry: its id and its fields, `None` when it was trimmed.
type Entry = (String, Option<Vec<(String, String)>>);

fn entries(value: Value) -> Vec<Entry> {
    let Value::Array(items) = value else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Value::Array(mut pair) = item else {
            continue;
        };
        if pair.is_empty() {
            continue;
        }
        let fields = if pair.len() > 1 {
            pair.remove(1)
        } else {
            Value::Null
        };
        let Some(id) = pair.remove(0).as_string() else {
            continue;
        };
        let fields = match fields {
            Value::Array(kv) => Some(
                kv.chunks(2)
                    .filter_map(|c| Some((c.first()?.as_string()?, c.get(1)?.as_string()?)))
                    .collect(),
            ),
            Value::Map(m) => Some(
                m.inner()
                    .into_iter()
                    .filter_map(|(k, v)| Some((k.into_string()?, v.as_string()?)))
                    .collect(),
            ),
            _ => None,
        };
        out.push((id, fields));
    }
    out
}

/// Takes delivered (or trimmed) jobs off the stream. A failure leaves them
/// pending, so a later leader sends them again: at least once.
async fn acknowledge(client: &Client, queue: &str, ids: Vec<String>) {
    let _: Result<i64, _> = client.xack(queue, GROUP, ids.clone()).await;
    let _: Result<i64, _> = client.xdel(queue, ids).await;
}

/// Consumes the stream until `stop`: first what earlier consumers left
/// pending, then new entries.
pub async fn consume(
    redis: Redis,
    keys: Keys,
    consumer: String,
    dispatcher: Dispatcher,
    stop: CancellationToken,
) {
    // XREADGROUP BLOCK would hold up every other command on the shared connection.
    let reader = redis.client.clone_new();
    reader.connect();
    let queue = keys.webhook_queue();
    // Bounded by the slots: a delivered job's acknowledgement carries its
    // slot until the acker has taken it, so at most IN_FLIGHT wait here and
    // `try_send` always finds room.
    let (ack_tx, mut ack_rx) = mpsc::channel::<(String, OwnedSemaphorePermit)>(IN_FLIGHT);
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let client = redis.client.clone();
    let acker = {
        let client = client.clone();
        let queue = queue.clone();
        // Awaited below, before `consume` returns.
        tokio::spawn(async move {
            let mut acks = Vec::new();
            while ack_rx.recv_many(&mut acks, 500).await > 0 {
                let ids: Vec<String> = acks.drain(..).map(|(id, _slot)| id).collect();
                acknowledge(&client, &queue, ids).await;
            }
        })
    };
    // Where XAUTOCLAIM goes on; `None` once the pending entries are all claimed.
    let mut claim_from = Some("0-0".to_owned());
    while !stop.is_cancelled() {
        let group: Result<Value, Error> = reader.xgroup_create(&queue, GROUP, "0", true).await;
        if let Err(e) = &group {
            if !format!("{e:?}").contains("BUSYGROUP") {
                tracing::warn!(error = %e, "webhook consumer group not created; retrying");
                tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        }
        let batch = if claim_from.is_none() {
            reader
                .xreadgroup::<Value, _, _, _, _>(
                    GROUP,
                    consumer.as_str(),
                    Some(READ_COUNT),
                    Some(BLOCK_MS),
                    false,
                    queue.as_str(),
                    ">",
                )
                .await
                .map(|v| match v {
                    // {queue: entries} in RESP2 as [[queue, entries]].
                    Value::Array(mut streams) if !streams.is_empty() => match streams.remove(0) {
                        Value::Array(mut kv) if kv.len() == 2 => (None, kv.remove(1)),
                        _ => (None, Value::Null),
                    },
                    Value::Map(m) => (None, m.inner().into_values().next().unwrap_or(Value::Null)),
                    _ => (None, Value::Null),
                })
        } else {
            // Everything another consumer (a dead leader) read and never acknowledged.
            reader
                .xautoclaim::<Value, _, _, _, _>(
                    &queue,
                    GROUP,
                    consumer.as_str(),
                    0,
                    claim_from.clone().unwrap_or_default(),
                    Some(READ_COUNT),
                    false,
                )
                .await
                .map(|v| match v {
                    Value::Array(mut parts) if parts.len() >= 2 => {
                        let cursor = parts.remove(0).as_string();
                        let trimmed = parts.get(1).cloned();
                        let entries = parts.remove(0);
                        (Some((cursor, trimmed)), entries)
                    }
                    _ => (Some((Some("0-0".into()), None)), Value::Null),
                })
        };
        let (claim, batch) = match batch {
            Ok(b) => b,
            Err(e) => {
                if !stop.is_cancelled() {
                    tracing::warn!(error = %e, "reading the webhook stream failed; retrying");
                    tokio::select! { _ = stop.cancelled() => break, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                }
                continue;
            }
        };
        if let Some((cursor, trimmed)) = claim {
            if let Some(Value::Array(gone)) = trimmed {
                // Claimed entries the cap trimmed before they were delivered.
                let ids: Vec<String> = gone.into_iter().filter_map(|v| v.as_string()).collect();
                if !ids.is_empty() {
                    metrics::counter!("belfry_webhook_dropped_total", "reason" => "trimmed")
                        .increment(ids.len() as u64);
                    acknowledge(&client, &queue, ids).await;
                }
            }
            claim_from = cursor.filter(|c| c != "0-0");
        }
        for (id, fields) in entries(batch) {
            let Some(job) = fields.and_then(|f| job_from(&id, f)) else {
                metrics::counter!("belfry_webhook_dropped_total", "reason" => "trimmed")
                    .increment(1);
                acknowledge(&client, &queue, vec![id]).await;
                continue;
            };
            let slot = tokio::select! {
                _ = stop.cancelled() => break,
                s = slots.clone().acquire_owned() => s,
            };
            let Ok(slot) = slot else { break };
            let ack_tx = ack_tx.clone();
            let id = job.id.clone();
            let done = Done::new(stop.clone(), move || {
                // Never full (a slot per permit, and this holds one) and never
                // closed (the acker runs while any sender lives); were it
                // either, the entry would only stay pending for a re-delivery.
                let _ = ack_tx.try_send((id, slot));
            });
            metrics::counter!("belfry_webhook_queued_total").increment(1);
            dispatcher.send_waiting(job, done).await;
        }
    }
    drop(ack_tx);
    let _ = acker.await;
    let _ = reader.quit().await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_entries_and_spots_trimmed_ones() {
        let s = |t: &str| Value::String(t.into());
        let reply = Value::Array(vec![
            Value::Array(vec![
                s("1700000000000-0"),
                Value::Array(vec![
                    s("app"),
                    s("a"),
                    s("channel"),
                    s("c"),
                    s("name"),
                    s("channel_occupied"),
                ]),
            ]),
            Value::Array(vec![s("1700000000001-0"), Value::Null]),
        ]);
        let got = entries(reply);
        assert_eq!(got.len(), 2);
        let job = job_from(&got[0].0, got[0].1.clone().unwrap()).unwrap();
        assert_eq!(
            (job.app.as_str(), job.channel.as_str(), job.name.as_str()),
            ("a", "c", "channel_occupied")
        );
        assert_eq!(job.at_ms, 1_700_000_000_000);
        assert!(got[1].1.is_none());
    }

    #[test]
    fn a_client_event_job_survives_the_stream() {
        let mut job = Job::new("a", "presence-c", "client_event");
        job.event = Some("client-typing".into());
        job.data = Some(r#"{"x":1}"#.into());
        job.socket_id = Some("1.2".into());
        job.user_id = Some("5".into());
        let fields = fields(&job)
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
        let back = job_from("1700000000000-0", fields).unwrap();
        assert_eq!(
            (back.event, back.data, back.socket_id, back.user_id),
            (job.event, job.data, job.socket_id, job.user_id)
        );
    }
}
