//! The `belfry-coordinator` daemon: the cluster chores no single edge node
//! should own, done by whichever replica holds the leader lock.
//!
//! Two replicas may run. Both campaign for the lock (`leader`); only the
//! leader sweeps (`sweep`): it removes presence connections whose node
//! stopped refreshing them, announces `member_removed` for users who left
//! with them, and reaps nodes that stopped heartbeating. A sweep is safe to
//! run twice (every removal is one atomic script whose result only one caller
//! sees), so a brief overlap of two leaders costs nothing but work. What a
//! replica answers on `/healthz` and `/readyz` is `health`; the port that
//! serves them is `crate::metrics_server`. The binary in `main.rs` only
//! parses flags and wires these together.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::keys::Keys;
use crate::publisher::Publisher;
use crate::redis::Redis;
use crate::webhook::{DispatchOptions, Dispatcher, WebhookApps};
use tokio_util::task::TaskTracker;

mod health;
mod leader;
mod sweep;

pub use health::Health;
pub use sweep::SweepReport;

/// Describes the coordinator's own metrics and registers them at 0, so
/// dashboards see 0 rather than nothing. Runs after the recorder is installed.
pub fn zero_metrics() {
    metrics::describe_gauge!(
        "belfry_coordinator_leader",
        "1 while this replica holds the leader lock"
    );
    metrics::describe_counter!(
        "belfry_coordinator_sweeps_total",
        "Sweeps run by this replica as leader"
    );
    metrics::describe_counter!(
        "belfry_coordinator_presence_removals_total",
        "Presence members removed after their connections expired (member_removed published)"
    );
    metrics::describe_counter!(
        "belfry_coordinator_nodes_reaped_total",
        "Nodes whose heartbeat lapsed and whose occupancy was removed"
    );
    metrics::gauge!("belfry_coordinator_leader").set(0.0);
    for counter in [
        "belfry_coordinator_sweeps_total",
        "belfry_coordinator_presence_removals_total",
        "belfry_coordinator_nodes_reaped_total",
    ] {
        metrics::counter!(counter).absolute(0);
    }
}

/// How the coordinator behaves; the binary's flags map onto these fields.
#[derive(Debug, Clone)]
pub struct CoordinatorOptions {
    /// This replica's name in the leader lock; unique per process.
    pub instance_id: String,
    /// How often the leader sweeps expired presence and dead nodes.
    pub sweep_interval: Duration,
    /// How long the leader lock outlives its holder's last renewal, which is
    /// how long a crashed leader leaves the cluster without sweeps. Renewed
    /// every third of it.
    pub leader_ttl: Duration,
    /// The apps' webhook URLs and secrets (from the nodes' apps TOML).
    pub webhooks: Arc<WebhookApps>,
    /// How the leader batches and retries webhooks.
    pub dispatch: DispatchOptions,
}

impl Default for CoordinatorOptions {
    fn default() -> Self {
        Self {
            instance_id: default_instance_id(),
            sweep_interval: Duration::from_millis(1000),
            leader_ttl: Duration::from_millis(5000),
            webhooks: Arc::default(),
            dispatch: DispatchOptions::default(),
        }
    }
}

/// `host-pid-nonce`: readable in `GET <prefix>:{coordinator}:leader`, and
/// distinct for two replicas even in one process (tests) or one pod name.
pub fn default_instance_id() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "coordinator".to_owned());
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nonce =
        crate::envelope::now_us() as u32 ^ NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{host}-{}-{nonce:08x}", std::process::id())
}

/// One coordinator replica.
pub struct Coordinator {
    redis: Redis,
    keys: Keys,
    options: CoordinatorOptions,
    publisher: Publisher,
    leader: watch::Sender<bool>,
}

impl Coordinator {
    pub fn new(redis: Redis, keys: Keys, options: CoordinatorOptions) -> Self {
        let publisher = Publisher::new(redis.clone(), keys.clone());
        // Leader wake-ups come through fred's subscriber.
        redis.start_subscriber();
        Self {
            redis,
            keys,
            options,
            publisher,
            leader: watch::Sender::new(false),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.options.instance_id
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }

    /// Follows leadership changes (for health endpoints and tests).
    pub fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }

    /// This replica's answers on the metrics port's probes.
    pub fn health(&self) -> Health {
        Health {
            redis: self.redis.clone(),
            leader: self.leadership(),
        }
    }

    /// Campaigns and, while leading, sweeps, until `shutdown` is cancelled.
    /// Then it finishes the sweep in progress and releases the lock, so the
    /// other replica takes over at once rather than after the lock's TTL.
    pub async fn run(&self, shutdown: CancellationToken) {
        let election = leader::Election::new(&self.redis, &self.keys, &self.options);
        tokio::join!(
            election.campaign(&self.leader, &shutdown),
            self.sweep_while_leading(&shutdown),
            self.deliver_webhooks_while_leading(&shutdown)
        );
        // Released even if we stepped down after a Redis error: the lock may
        // still be ours, and the script only deletes it if it is.
        // Bounded: with Redis gone, the lock expires by itself anyway.
        let released = tokio::time::timeout(Duration::from_secs(3), election.release()).await;
        match released.unwrap_or(Ok(false)) {
            Ok(true) => {
                tracing::info!(instance = %self.options.instance_id, "leadership released")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not release the leader lock; it expires by itself")
            }
        }
        self.leader.send_replace(false);
        metrics::gauge!("belfry_coordinator_leader").set(0.0);
    }

    async fn sweep_while_leading(&self, shutdown: &CancellationToken) {
        let mut tick =
            tokio::time::interval(self.options.sweep_interval.max(Duration::from_millis(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.is_leader() {
                continue;
            }
            // Not raced against shutdown: a sweep ends its removals and
            // announcements before the lock is handed over.
            if let Err(e) = self.sweep_once().await {
                tracing::warn!(error = %e, "sweep failed; retrying next interval");
            }
        }
    }

    /// While this replica leads, consumes the webhook stream and delivers
    /// it. Losing the lead stops delivery at once; whatever was read and not
    /// yet delivered stays pending for the next leader to claim.
    async fn deliver_webhooks_while_leading(&self, shutdown: &CancellationToken) {
        let mut leading = self.leadership();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = leading.wait_for(|l| *l) => if changed.is_err() { return },
            }
            if self.options.webhooks.is_empty() {
                // Nodes queue nothing for apps without webhooks; nothing to deliver.
                return;
            }
            tracing::info!("leading: delivering webhooks");
            let stop = shutdown.child_token();
            let tasks = TaskTracker::new();
            let dispatcher = Dispatcher::start(
                self.options.webhooks.clone(),
                self.options.dispatch.clone(),
                stop.clone(),
                tasks.clone(),
            );
            let consumer = crate::webhook::stream::consume(
                self.redis.clone(),
                self.keys.clone(),
                self.options.instance_id.clone(),
                dispatcher,
                stop.clone(),
            );
            let mut consumer = Box::pin(consumer);
            tokio::select! {
                _ = &mut consumer => {}
                _ = leading.wait_for(|l| !*l) => {}
                _ = shutdown.cancelled() => {}
            }
            // Stop before the consumer (and with it the dispatcher's queue)
            // goes: what it read stays pending for the next leader rather
            // than being sent or acknowledged on the way out.
            stop.cancel();
            drop(consumer);
            tasks.close();
            tasks.wait().await;
        }
    }

    /// One sweep, leader or not: expired presence, then dead nodes.
    pub async fn sweep_once(&self) -> Result<SweepReport, fred::error::Error> {
        let started = Instant::now();
        let mut report = sweep::sweep_presence(
            &self.redis,
            &self.keys,
            &self.publisher,
            &self.options.webhooks,
        )
        .await?;
        report.nodes_reaped =
            sweep::reap_nodes(&self.redis, &self.keys, &self.options.webhooks).await?;
        metrics::counter!("belfry_coordinator_sweeps_total").increment(1);
        if report.presence_removals > 0 || report.connections_expired > 0 || report.nodes_reaped > 0
        {
            tracing::info!(
                channels = report.channels,
                connections_expired = report.connections_expired,
                members_removed = report.presence_removals,
                nodes_reaped = report.nodes_reaped,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "sweep"
            );
        }
        Ok(report)
    }
}
