//! Connections to Redis (a single server or a Redis Cluster) and the Redis
//! implementations of the cluster's shared state.
//!
//! Clients reconnect by themselves with backoff; a command sent while Redis
//! is away fails within the command timeout instead of queueing forever, so
//! the HTTP API can answer 503 quickly. A command is sent once: fred would
//! otherwise send it again after a reconnect, and a publish Redis had
//! already taken would reach clients twice.
//!
//! A connection can be up while Redis does not answer (a stalled or paused
//! server): `probe_health` PINGs with a deadline and readiness follows it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{
    ConnectionConfig, PerformanceConfig, ReconnectPolicy, ServerConfig, TlsConfig, TlsConnector,
    TlsHostMapping,
};

pub mod bus;
pub mod occupancy;
pub mod presence;
pub mod resp;
pub mod subscriber;
pub mod tls;

/// How long one Redis command may take before it is reported as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the health probe PINGs, and how long a PING may take.
const PROBE_EVERY: Duration = Duration::from_millis(500);
const PROBE_DEADLINE: Duration = Duration::from_millis(1000);

/// A command client to one Redis deployment, and what the bus needs to open
/// pub/sub connections of its own.
#[derive(Clone)]
pub struct Redis {
    pub client: Client,
    /// A fred subscriber, connected only by those that call
    /// `start_subscriber` (the coordinator's leader wake-ups, which may be
    /// lossy). The node's bus reads pub/sub on its own connections.
    pub subscriber: SubscriberClient,
    /// Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH) instead of SUBSCRIBE/PUBLISH.
    pub clustered: bool,
    config: Arc<Config>,
    /// `rediss://`: what both fred and our pub/sub connections trust.
    tls: Option<tls::RedisTls>,
    /// Last health probe answered in time.
    healthy: Arc<AtomicBool>,
    subscriber_started: Arc<AtomicBool>,
    /// What went wrong last on the command connection, worded for the log.
    last_error: Arc<parking_lot::Mutex<Option<String>>>,
}

/// A Redis or connection error worded for an operator: refused credentials
/// are named as such, anything else keeps Redis's own words.
pub fn describe_error(message: &str) -> String {
    if subscriber::is_auth_error(message) {
        format!("Redis refused the credentials (check the username and password in the Redis URL): {message}")
    } else {
        message.to_owned()
    }
}

impl Redis {
    /// Builds both clients and starts connecting. It does not wait: a node
    /// starts while Redis is down and reports not-ready until it is back.
    /// `redis://` is one server, `redis-cluster://host:port?node=host:port` a cluster.
    pub fn connect(url: &str) -> Result<Redis, Error> {
        Self::connect_with_ca(url, None)
    }

    /// As `connect`; a `rediss://` URL also trusts the PEM CA certificates
    /// in `tls_ca` besides the system's.
    pub fn connect_with_ca(url: &str, tls_ca: Option<&std::path::Path>) -> Result<Redis, Error> {
        let mut config = Config::from_url(url)?;
        let tls = if tls::url_uses_tls(url) {
            let tls = tls::RedisTls::new(tls_ca).map_err(|e| Error::new(ErrorKind::Tls, e))?;
            config.tls = Some(TlsConfig {
                connector: TlsConnector::from((*tls.0).clone()),
                // Cluster nodes are reached by the address CLUSTER SLOTS
                // gives, but their certificate names the URL's host.
                hostnames: TlsHostMapping::DefaultHost,
            });
            Some(tls)
        } else {
            if tls_ca.is_some() {
                tracing::warn!(
                    "redis_tls_ca is set but the Redis URL is not rediss://; it is not used"
                );
            }
            None
        };
        // Keep retrying a first connection that fails too: a node or the
        // coordinator started before Redis must connect once Redis is up.
        config.fail_fast = false;
        let clustered = config.server.is_clustered();
        let shared_config = Arc::new(config.clone());
        let mut builder = Builder::from_config(config);
        builder
            .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
            .set_performance_config(PerformanceConfig {
                default_command_timeout: COMMAND_TIMEOUT,
                ..PerformanceConfig::default()
            })
            .set_connection_config(ConnectionConfig {
                connection_timeout: Duration::from_secs(2),
                internal_command_timeout: COMMAND_TIMEOUT,
                max_command_attempts: 1,
                ..ConnectionConfig::default()
            });
        let client = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        let last_error = Arc::new(parking_lot::Mutex::new(None::<String>));
        if tokio::runtime::Handle::try_current().is_ok() {
            let last = last_error.clone();
            // fred retries quietly; each new kind of failure is logged once,
            // so a wrong password or a TLS mismatch is visible at once.
            client.on_error(move |(error, server)| {
                let text = describe_error(&error.to_string());
                let server = server.map(|s| s.to_string()).unwrap_or_default();
                let mut last = last.lock();
                if last.as_deref() != Some(text.as_str()) {
                    tracing::error!(%server, "Redis connection failed: {text}");
                    *last = Some(text);
                }
                std::future::ready(Ok(()))
            });
        }
        client.connect();
        Ok(Redis {
            client,
            subscriber,
            clustered,
            config: shared_config,
            tls,
            healthy: Arc::new(AtomicBool::new(false)),
            subscriber_started: Arc::new(AtomicBool::new(false)),
            last_error,
        })
    }

    /// Connects the fred subscriber (lossy under bursts: only for wake-ups),
    /// once however often it is called.
    pub fn start_subscriber(&self) {
        if self.subscriber_started.swap(true, Ordering::Relaxed) {
            return;
        }
        self.subscriber.connect();
        // Re-issues every tracked (S)SUBSCRIBE after a reconnect.
        self.subscriber.manage_subscriptions();
    }

    /// Waits up to `timeout` for the command client to connect.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        let connected = tokio::time::timeout(timeout, self.client.wait_for_connect())
            .await
            .is_ok()
            && self.is_connected();
        if connected {
            self.healthy.store(true, Ordering::Relaxed);
        }
        connected
    }

    /// The last connection error, for a log line saying why Redis is not usable.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().clone()
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected()
    }

    /// Connected, and the last PING was answered within its deadline.
    pub fn is_healthy(&self) -> bool {
        self.client.is_connected() && self.healthy.load(Ordering::Relaxed)
    }

    /// PINGs Redis every 500 ms with a 1 s deadline and records whether it
    /// answered, until `stop`. Readiness and publishing follow the result:
    /// while Redis is stalled a publish is refused before it is sent.
    pub async fn probe_health(self, stop: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(PROBE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let answered = matches!(
                tokio::time::timeout(PROBE_DEADLINE, self.client.ping::<()>(None)).await,
                Ok(Ok(()))
            );
            let was = self.healthy.swap(answered, Ordering::Relaxed);
            if was && !answered {
                tracing::error!("Redis did not answer a PING within {PROBE_DEADLINE:?}; not ready, publishes are refused");
            } else if !was && answered {
                tracing::info!("Redis answers again");
            }
        }
    }

    /// Where the bus opens its pub/sub connection on a single server.
    pub fn endpoints(&self) -> Vec<subscriber::Endpoint> {
        match &self.config.server {
            ServerConfig::Centralized { server } => {
                vec![self.endpoint_for(&server.host, server.port)]
            }
            ServerConfig::Clustered { hosts, .. } => hosts
                .iter()
                .map(|h| self.endpoint_for(&h.host, h.port))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// A server of this deployment, with the URL's credentials.
    pub fn endpoint_for(&self, host: &str, port: u16) -> subscriber::Endpoint {
        subscriber::Endpoint {
            host: host.to_owned(),
            port,
            tls: self.tls.clone(),
            username: self.config.username.clone(),
            password: self.config.password.clone(),
            database: if self.clustered {
                None
            } else {
                self.config.database
            },
        }
    }
}
