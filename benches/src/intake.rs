//! `belfry-bench intake`: how many envelopes per second a node's Redis bus
//! takes off a real redis-server, decodes and hands to the fan-out, measured
//! alone (the fan-out only counts). It runs the bus exactly as a node does,
//! with publishers pipelining `belfry_coordinator::Publisher` batches into
//! the same Redis, so the figure includes Redis's own pub/sub work.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::bus::Delivery;
use belfry_coordinator::keys::Keys;
use belfry_coordinator::redis::bus::RedisBus;
use belfry_coordinator::redis::Redis;
use belfry_coordinator::{Bus, CacheTtl, Envelope, Publisher};
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

/// Counts what the bus hands on; wakes the waiter at the target.
struct Counter {
    seen: AtomicU64,
    target: u64,
    done: tokio::sync::Notify,
}

impl Delivery for Counter {
    fn deliver(&self, _envelope: Envelope) -> BoxFuture<'_, ()> {
        if self.seen.fetch_add(1, Ordering::Relaxed) + 1 == self.target {
            self.done.notify_one();
        }
        Box::pin(async {})
    }
}

#[derive(Debug, serde::Serialize)]
pub struct IntakeReport {
    pub envelopes: u64,
    pub seconds: f64,
    pub envelopes_per_sec: f64,
    /// This process's CPU (bus intake and the publishers) per envelope.
    pub cpu_us_per_envelope: f64,
}

fn cpu_seconds() -> f64 {
    // SAFETY: getrusage only writes the struct it is given.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(usage.ru_utime) + t(usage.ru_stime)
}

pub async fn run(
    url: &str,
    count: u64,
    batch: usize,
    lanes: usize,
) -> anyhow::Result<IntakeReport> {
    let redis = Redis::connect(url).map_err(|e| anyhow::anyhow!("redis {url}: {e}"))?;
    anyhow::ensure!(
        redis.wait_connected(Duration::from_secs(5)).await,
        "redis {url}: not connected"
    );
    let keys = Keys::new("belfry-bench-intake");
    let counter = Arc::new(Counter {
        seen: AtomicU64::new(0),
        target: count,
        done: tokio::sync::Notify::new(),
    });
    let stop = CancellationToken::new();
    let bus = RedisBus::start(
        redis.clone(),
        keys.clone(),
        CacheTtl::default(),
        Default::default(),
        counter.clone(),
        stop.clone(),
        tokio_util::task::TaskTracker::new(),
    );
    bus.subscribe("bench", "intake")
        .await
        .map_err(|e| anyhow::anyhow!("subscribe: {e}"))?;
    let publisher = Publisher::new(redis.clone(), keys);
    let data = r#"{"order":12345,"status":"shipped","note":"a typical Laravel event"}"#;
    let started = Instant::now();
    let cpu_started = cpu_seconds();
    let per_lane = count.div_ceil(lanes as u64);
    let mut publishing = tokio::task::JoinSet::new();
    for lane in 0..lanes as u64 {
        let publisher = publisher.clone();
        let n = per_lane.min(count.saturating_sub(lane * per_lane));
        publishing.spawn_local(async move {
            let mut left = n;
            while left > 0 {
                let k = left.min(batch as u64);
                let envelopes = (0..k)
                    .map(|_| Envelope::event("bench", "intake", "OrderShipped", data.into()))
                    .collect();
                publisher
                    .publish_batch(envelopes)
                    .await
                    .map_err(|e| anyhow::anyhow!("publish: {e}"))?;
                left -= k;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = publishing.join_next().await {
        r??;
    }
    if counter.seen.load(Ordering::Relaxed) < count {
        tokio::time::timeout(Duration::from_secs(60), counter.done.notified())
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "only {} of {count} envelopes arrived",
                    counter.seen.load(Ordering::Relaxed)
                )
            })?;
    }
    let seconds = started.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_started;
    stop.cancel();
    let envelopes = counter.seen.load(Ordering::Relaxed);
    Ok(IntakeReport {
        envelopes,
        seconds,
        envelopes_per_sec: envelopes as f64 / seconds,
        cpu_us_per_envelope: cpu * 1e6 / envelopes as f64,
    })
}
