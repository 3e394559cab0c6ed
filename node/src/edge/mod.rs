//! The node's edge: what is decided about a client before the Pusher
//! protocol sees it. Who the client is (`address`), how many connections an
//! address may hold and open (`rate`), how fast an app may call the HTTP
//! API (`rate`), and the descriptor reserve that keeps an overloaded node
//! answering (`fds`). Deadlines on request heads and bodies live with the
//! listener (`server.rs`) and the API (`api/`).

pub mod address;
pub mod fds;
pub mod rate;

use std::sync::Arc;
use std::time::Instant;

use crate::config::Config;
use address::{Cidr, TrustedProxies};
use fds::FdBudget;
use rate::{ApiRates, PerIpLimiter};

/// The edge's shared state, made once at start.
pub struct Edge {
    pub proxies: TrustedProxies,
    pub per_ip: Arc<PerIpLimiter>,
    pub api: ApiRates,
    pub fds: Arc<FdBudget>,
}

impl Edge {
    /// Built from a validated configuration (bad CIDRs were refused there).
    pub fn new(config: &Config) -> Arc<Edge> {
        let ranges = config
            .trusted_proxies
            .iter()
            .filter_map(|c| Cidr::parse(c).ok())
            .collect();
        Arc::new(Edge {
            proxies: TrustedProxies::new(ranges),
            per_ip: PerIpLimiter::new(
                config.max_connections_per_ip,
                config.connections_per_ip_per_minute,
            ),
            api: ApiRates::new(
                config
                    .apps
                    .iter()
                    .map(|a| (a.id.as_str(), a.api_requests_per_second)),
                Instant::now(),
            ),
            fds: FdBudget::new(config.fd_reserve),
        })
    }
}
