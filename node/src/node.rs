//! The node: configuration, the local registry, the bus and the presence
//! store, wired together once at start and shared by every connection and
//! request. It also owns admission (who may connect) and the drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use belfry_coordinator::keys::Keys;
use belfry_coordinator::redis::bus::RedisBus;
use belfry_coordinator::redis::occupancy::RedisOccupancy;
use belfry_coordinator::redis::presence::RedisPresence;
use belfry_coordinator::redis::Redis;
use belfry_coordinator::webhook::{
    stream::StreamSink, DispatchOptions, Dispatcher, Job, NoSink, Sink, WebhookApp, WebhookApps,
};
use belfry_coordinator::{
    Bus, CacheTtl, LocalBus, LocalOccupancy, MemoryPresence, Occupancy, OccupancyError,
    PresenceStore,
};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::hub::Hub;
use crate::outbox::ConnHandle;
use crate::protocol::{code, SocketId};
use crate::registry::{AppRegistry, Registry};
use crate::shutdown::Shutdown;

pub struct Node {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    /// The one owner of this node's interest in each channel.
    pub hub: Arc<Hub>,
    pub presence: Arc<dyn PresenceStore>,
    pub shutdown: Shutdown,
    /// Connection tasks, so the drain can wait for them.
    pub tasks: TaskTracker,
    connections: Mutex<HashMap<SocketId, ConnHandle>>,
    /// The node's own background tasks (the hub's sweep, the Redis bus's
    /// readers and health probe), stopped by `stop`.
    background: TaskTracker,
    stop: CancellationToken,
    /// Subscription and connection counts, cluster-wide in cluster mode;
    /// the source of the occupied/vacated webhooks.
    pub occupancy: Arc<dyn Occupancy>,
    clustered: bool,
    /// Which apps' URLs want which webhooks, and where the jobs the node
    /// decides by itself (client events) go.
    webhooks: Arc<WebhookApps>,
    webhook_sink: Arc<dyn Sink>,
}

/// The shared state behind its traits: in memory on a single node, in Redis
/// in a cluster.
struct Stores {
    bus: Arc<dyn Bus>,
    presence: Arc<dyn PresenceStore>,
    occupancy: Arc<dyn Occupancy>,
    clustered: bool,
    webhooks: Arc<WebhookApps>,
    webhook_sink: Arc<dyn Sink>,
}

/// Why a WebSocket is refused before it starts: the close code, the message
/// and the metric label.
pub struct Refusal {
    pub code: u16,
    pub message: String,
    pub reason: &'static str,
}

impl Node {
    /// A single node with the in-process bus and in-memory presence.
    pub fn embedded(config: Config) -> Arc<Node> {
        let stop = CancellationToken::new();
        let background = TaskTracker::new();
        let registry = Registry::new(&config.apps, config.fanout_shards(), &background, &stop);
        let bus = Arc::new(LocalBus::new(registry.clone(), cache_ttl(&config)));
        // A single node delivers its webhooks itself, from an in-process queue.
        let webhooks = webhook_apps(&config);
        let sink: Arc<dyn Sink> = if webhooks.is_empty() {
            Arc::new(NoSink)
        } else {
            let options = DispatchOptions {
                retry_for: Duration::from_secs(config.webhook_retry_secs),
                ..DispatchOptions::default()
            };
            Arc::new(Dispatcher::start(
                webhooks.clone(),
                options,
                stop.clone(),
                background.clone(),
            ))
        };
        let stores = Stores {
            bus,
            presence: Arc::new(MemoryPresence::with_webhooks(sink.clone())),
            occupancy: Arc::new(LocalOccupancy::new(sink.clone())),
            clustered: false,
            webhooks,
            webhook_sink: sink,
        };
        Self::new(config, registry, stores, stop, background)
    }

    /// A node of a cluster over Redis. It starts even while Redis is down
    /// (reporting not-ready) and catches up when Redis comes.
    pub async fn clustered(config: Config, redis_url: &str) -> Result<Arc<Node>, String> {
        let redis = Redis::connect_with_ca(redis_url, config.redis_tls_ca.as_deref())
            .map_err(|e| format!("cannot use the Redis URL {redis_url:?}: {e}"))?;
        if !redis.wait_connected(Duration::from_secs(5)).await {
            let why = redis.last_error().unwrap_or_else(|| "no answer yet".into());
            tracing::warn!(
                "Redis is not usable yet ({why}); serving sockets and reporting not ready until it is"
            );
        }
        let keys = Keys::new(&config.redis_prefix);
        let node_id = config.node_id.clone().unwrap_or_else(default_node_id);
        let stop = CancellationToken::new();
        let background = TaskTracker::new();
        let registry = Registry::new(&config.apps, config.fanout_shards(), &background, &stop);
        let laravel = config
            .apps
            .iter()
            .filter_map(|a| a.laravel_redis_prefix.clone().map(|p| (a.id.clone(), p)))
            .collect();
        let bus = Arc::new(RedisBus::start(
            redis.clone(),
            keys.clone(),
            cache_ttl(&config),
            laravel,
            registry.clone(),
            stop.clone(),
            background.clone(),
        ));
        let ttl = Duration::from_secs(config.presence_ttl_secs);
        let webhooks = webhook_apps(&config);
        let presence = Arc::new(RedisPresence::start(
            redis.clone(),
            keys.clone(),
            node_id.clone(),
            ttl,
            webhooks.clone(),
            stop.clone(),
        ));
        background.spawn(crate::leader_watch::run(
            redis.clone(),
            keys.clone(),
            stop.clone(),
        ));
        let webhook_sink: Arc<dyn Sink> = Arc::new(StreamSink::new(
            redis.clone(),
            keys.clone(),
            background.clone(),
        ));
        let occupancy = RedisOccupancy::start(
            redis.clone(),
            keys,
            node_id.clone(),
            webhooks.clone(),
            stop.clone(),
            &background,
        );
        background.spawn(count_reconnects(redis, stop.clone()));
        tracing::info!(node_id, "cluster mode over Redis");
        let stores = Stores {
            bus,
            presence,
            occupancy: Arc::new(occupancy),
            clustered: true,
            webhooks,
            webhook_sink,
        };
        Ok(Self::new(config, registry, stores, stop, background))
    }

    fn new(
        config: Config,
        registry: Arc<Registry>,
        stores: Stores,
        stop: CancellationToken,
        background: TaskTracker,
    ) -> Arc<Node> {
        let Stores {
            bus,
            presence,
            occupancy,
            clustered,
            webhooks,
            webhook_sink,
        } = stores;
        let hub = Arc::new(Hub::new(bus.clone()));
        background.spawn(hub.clone().run(stop.clone()));
        let node = Arc::new(Node {
            config,
            registry,
            bus,
            hub,
            presence,
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            connections: Mutex::new(HashMap::new()),
            background: background.clone(),
            stop: stop.clone(),
            occupancy,
            clustered,
            webhooks,
            webhook_sink,
        });
        // Holds the node only while it runs: it returns on `stop`.
        background.spawn(crate::subscription_count::run(node.clone(), stop));
        node
    }

    pub fn is_clustered(&self) -> bool {
        self.clustered
    }

    /// Whether a URL of `app` wants `name` webhooks for `channel`.
    pub fn wants_webhook(&self, app: &str, name: &str, channel: &str) -> bool {
        self.webhooks.wants(app, name, channel)
    }

    /// Hands a client event to the app's webhooks when a URL wants it
    /// (Pusher's `client_event`: the sender's socket, and its user on a
    /// presence channel). Never waits.
    pub fn client_event_webhook(
        &self,
        app: &str,
        channel: &str,
        event: &str,
        data: &str,
        socket_id: &str,
        user_id: Option<&str>,
    ) {
        if !self.webhooks.wants(app, "client_event", channel) {
            return;
        }
        let mut job = Job::new(app, channel, "client_event");
        job.event = Some(event.to_owned());
        job.data = Some(data.to_owned());
        job.socket_id = Some(socket_id.to_owned());
        // The envelope carries the id as JSON (`"u1"` or `42`); Pusher's
        // webhook has its string form.
        job.user_id = user_id.map(|id| match serde_json::from_str::<serde_json::Value>(id) {
            Ok(serde_json::Value::String(s)) => s,
            _ => id.to_owned(),
        });
        self.webhook_sink.send(job);
    }

    /// Hands a job the node decided by itself (a cache miss) to the app's
    /// webhooks when a URL wants it. Never waits.
    pub fn webhook(&self, job: Job) {
        if self.webhooks.wants(&job.app, &job.name, &job.channel) {
            self.webhook_sink.send(job);
        }
    }

    /// A local subscription began; counted before `subscription_succeeded`.
    pub async fn subscription_added(&self, app: &str, channel: &str) -> Result<(), OccupancyError> {
        self.occupancy.joined(app, channel).await
    }

    pub async fn subscription_removed(&self, app: &str, channel: &str) {
        if let Err(e) = self.occupancy.left(app, channel).await {
            tracing::warn!(error = %e, "occupancy not updated");
        }
    }

    /// Subscriptions on `channel`, cluster-wide in cluster mode.
    pub async fn subscription_count(
        &self,
        app: &AppRegistry,
        channel: &str,
    ) -> Result<usize, OccupancyError> {
        self.occupancy
            .subscription_count(&app.config.id, channel)
            .await
    }

    /// Occupied channels with their subscription counts, cluster-wide in cluster mode.
    pub async fn channels(
        &self,
        app: &AppRegistry,
    ) -> Result<Vec<(String, usize)>, OccupancyError> {
        self.occupancy.channels(&app.config.id).await
    }

    /// A connection of `app` ended.
    pub fn release(&self, app: &AppRegistry, reason: &'static str) {
        app.close_connection(reason);
        self.occupancy.connection_closed(&app.config.id);
    }

    /// After the drain: take this node off the cluster's books (the
    /// heartbeat stops first) and stop the background tasks.
    pub async fn leave_cluster(&self) {
        self.occupancy.close().await;
        self.presence.close().await;
        self.bus.close().await;
        self.stop.cancel();
        self.background.close();
        self.background.wait().await;
    }

    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_draining() && self.bus.is_ready()
    }

    /// Decides whether a new WebSocket for `app` may start, and counts it if so.
    pub fn admit(&self, app: &AppRegistry) -> Result<(), Refusal> {
        let refuse = |code, message: &str, reason| {
            Err(Refusal {
                code,
                message: message.to_owned(),
                reason,
            })
        };
        if self.shutdown.is_draining() {
            return refuse(code::OVER_CAPACITY, "Server is shutting down", "draining");
        }
        let max = self.config.max_connections;
        if max > 0 && self.registry.total_connections() >= max {
            return refuse(code::OVER_CAPACITY, "Server is over capacity", "capacity");
        }
        if self.config.max_memory_mb > 0
            && resident_mb().is_some_and(|mb| mb >= self.config.max_memory_mb)
        {
            return refuse(
                code::OVER_CAPACITY,
                "Server is over its memory ceiling",
                "memory",
            );
        }
        let quota = "Application is over connection quota";
        // Other nodes' counts are a second old at most: a burst across
        // nodes can overshoot the quota by what they admitted meanwhile.
        let max = app.config.max_connections;
        if max > 0 && app.connections() + self.occupancy.others_connections(&app.config.id) >= max {
            return refuse(code::OVER_QUOTA, quota, "app_quota");
        }
        if !app.try_open_connection() {
            return refuse(code::OVER_QUOTA, quota, "app_quota");
        }
        self.occupancy.connection_opened(&app.config.id);
        Ok(())
    }

    pub fn track(&self, handle: ConnHandle) {
        self.connections.lock().insert(handle.socket_id, handle);
    }

    pub fn untrack(&self, socket_id: SocketId) {
        self.connections.lock().remove(&socket_id);
    }

    /// Closes every connection with 4200 so clients reconnect elsewhere.
    pub fn close_all_for_shutdown(&self) -> usize {
        let handles: Vec<ConnHandle> = self.connections.lock().values().cloned().collect();
        for handle in &handles {
            handle.close(
                code::RECONNECT,
                "Server is shutting down; reconnect",
                "shutdown",
            );
        }
        handles.len()
    }
}

fn webhook_apps(config: &Config) -> Arc<WebhookApps> {
    let apps = config.apps.iter().map(|a| WebhookApp {
        id: a.id.clone(),
        key: a.key.clone(),
        secret: a.secret.clone(),
        webhooks: a.webhooks.clone(),
        webhook_grace_ms: a.webhook_grace_ms,
    });
    // The configuration was checked when it was loaded.
    Arc::new(WebhookApps::new(apps).unwrap_or_default())
}

fn cache_ttl(config: &Config) -> CacheTtl {
    CacheTtl {
        by_app: config
            .apps
            .iter()
            .map(|a| (a.id.clone(), Duration::from_secs(a.cache_ttl_secs)))
            .collect(),
        default: Duration::from_secs(1800),
    }
}

fn default_node_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .map(|h| h.trim().to_owned())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "node".into());
    format!(
        "{host}-{}-{}",
        std::process::id(),
        SocketId::random().1 % 100_000
    )
}

async fn count_reconnects(redis: Redis, stop: CancellationToken) {
    use fred::interfaces::EventInterface;
    let mut reconnects = redis.client.reconnect_rx();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            r = reconnects.recv() => match r {
                Ok(server) => {
                    crate::telemetry::redis_reconnect();
                    tracing::info!(%server, "reconnected to Redis");
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(_) => return,
            }
        }
    }
}

/// This process's resident memory in MiB, from /proc.
pub fn resident_mb() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096 / (1024 * 1024))
}
