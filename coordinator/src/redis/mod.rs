//! Connections to Redis (a single server or a Redis Cluster) and the Redis
//! implementations of the cluster's shared state.
//!
//! Clients reconnect by themselves with backoff; a command sent while Redis
//! is away fails within the command timeout instead of queueing forever, so
//! the HTTP API can answer 503 quickly.

use std::time::Duration;

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::{ConnectionConfig, PerformanceConfig, ReconnectPolicy};

pub mod bus;
pub mod occupancy;
pub mod presence;

/// How long one Redis command may take before it is reported as failed.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(2);

/// A command client and a subscriber client to one Redis deployment.
#[derive(Clone)]
pub struct Redis {
    pub client: Client,
    pub subscriber: SubscriberClient,
    /// Redis Cluster: sharded pub/sub (SSUBSCRIBE/SPUBLISH) instead of SUBSCRIBE/PUBLISH.
    pub clustered: bool,
}

impl Redis {
    /// Builds both clients and starts connecting. It does not wait: a node
    /// starts while Redis is down and reports not-ready until it is back.
    /// `redis://` is one server, `redis-cluster://host:port?node=host:port` a cluster.
    pub fn connect(url: &str) -> Result<Redis, Error> {
        let mut config = Config::from_url(url)?;
        // Keep retrying a first connection that fails too: a node or the
        // coordinator started before Redis must connect once Redis is up.
        config.fail_fast = false;
        let clustered = config.server.is_clustered();
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
                max_command_attempts: 2,
                ..ConnectionConfig::default()
            });
        let client = builder.build()?;
        let subscriber = builder.build_subscriber_client()?;
        client.connect();
        subscriber.connect();
        // Re-issues every tracked (S)SUBSCRIBE after a reconnect.
        subscriber.manage_subscriptions();
        Ok(Redis {
            client,
            subscriber,
            clustered,
        })
    }

    /// Waits up to `timeout` for both clients to connect.
    pub async fn wait_connected(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, async {
            let _ = self.client.wait_for_connect().await;
            let _ = self.subscriber.wait_for_connect().await;
        })
        .await
        .is_ok()
            && self.is_connected()
    }

    pub fn is_connected(&self) -> bool {
        self.client.is_connected() && self.subscriber.is_connected()
    }
}
