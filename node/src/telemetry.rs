//! What the node reports about itself: its metrics, and its answers on
//! `/healthz` and `/readyz` (on both ports; the metrics port itself is
//! `belfry_coordinator::metrics_server`, which also installs the recorder).
//! Logging is set up by `belfry_coordinator::logging`.
//!
//! Every metric is named `belfry_*` and labelled only with bounded values
//! (app id, reason, route, status): never a channel name or a socket id.
//! Per-app handles are registered once, so the hot paths only touch
//! atomics. `docs/operations.md` lists every metric.

use belfry_coordinator::metrics_server::{Probe, Probes};
use hyper::StatusCode;
use metrics::{counter, gauge, histogram, Counter, Gauge};
use serde_json::json;

use crate::node::Node;

/// The bodies are JSON the node's HTTP API also speaks (`json_response`).
impl Probes for Node {
    fn healthz(&self) -> Probe {
        Probe::json(StatusCode::OK, json!({ "status": "alive" }).to_string())
    }

    fn readyz(&self) -> Probe {
        if self.is_ready() {
            return Probe::json(StatusCode::OK, json!({ "status": "ready" }).to_string());
        }
        let why = if self.shutdown.is_draining() {
            "draining"
        } else {
            "bus unavailable"
        };
        Probe::json(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "status": "not ready", "reason": why }).to_string(),
        )
    }

    fn not_found(&self, path: &str) -> Probe {
        Probe::json(
            StatusCode::NOT_FOUND,
            json!({ "error": format!("No route {path}") }).to_string(),
        )
    }

    /// `belfry_ready` and `belfry_draining` are set where readiness changes
    /// by the node's own hand (start, drain); the bus's health changes on
    /// its own, so both are read again for every scrape.
    fn before_scrape(&self) {
        ready(self.is_ready(), self.shutdown.is_draining());
    }
}

/// Why a handshake can be refused (`belfry_connections_refused_total`).
pub const REFUSAL_REASONS: [&str; 10] = [
    "unknown_app",
    "origin",
    "app_quota",
    "capacity",
    "memory",
    "protocol",
    "draining",
    "ip_connections",
    "ip_rate",
    "fd_reserve",
];
/// Why a connection closes (`belfry_connections_closed_total`).
pub const CLOSE_REASONS: [&str; 7] = [
    "client",
    "error",
    "ping_timeout",
    "slow_consumer",
    "terminated",
    "shutdown",
    "too_large",
];
const API_ROUTES: [&str; 6] = [
    "events",
    "batch_events",
    "channels",
    "channel",
    "users",
    "terminate_connections",
];

/// Registers every series whose label values are known at start, so a
/// fresh node shows 0 instead of nothing and dashboards and alerts on
/// `rate()` or `increase()` work from the first scrape. Per-app series are
/// registered by `AppMetrics::new`.
pub fn zero_at_start(apps: &[String]) {
    for reason in REFUSAL_REASONS {
        counter!("belfry_connections_refused_total", "reason" => reason).absolute(0);
    }
    for app in apps {
        for reason in CLOSE_REASONS {
            counter!("belfry_connections_closed_total", "app" => app.clone(), "reason" => reason)
                .absolute(0);
        }
        counter!("belfry_rate_limited_total", "app" => app.clone(), "kind" => "api").absolute(0);
    }
    for route in API_ROUTES {
        counter!("belfry_http_requests_total", "route" => route, "status" => "200").absolute(0);
    }
    counter!("belfry_redis_reconnects_total").absolute(0);
    counter!(belfry_coordinator::redis::bus::DISCONNECTS_METRIC).absolute(0);
    let _ = histogram!("belfry_http_publish_seconds");
    let _ = histogram!("belfry_bus_lag_seconds");
    belfry_coordinator::webhook::zero_metrics();
    ready(false, false);
}

/// One app's metric handles.
pub struct AppMetrics {
    app: String,
    pub connections: Gauge,
    pub channels: Gauge,
    pub presence_members: Gauge,
    pub opened: Counter,
    pub messages_in: Counter,
    pub bytes_in: Counter,
    pub messages_out: Counter,
    pub bytes_out: Counter,
    pub client_events: Counter,
    pub slow_consumers: Counter,
    pub client_event_rate_limited: Counter,
}

impl AppMetrics {
    pub fn new(app: &str) -> Self {
        let a = app.to_owned();
        Self {
            connections: gauge!("belfry_connections", "app" => a.clone()),
            channels: gauge!("belfry_channels", "app" => a.clone()),
            presence_members: gauge!("belfry_presence_members", "app" => a.clone()),
            opened: counter!("belfry_connections_opened_total", "app" => a.clone()),
            messages_in: counter!("belfry_messages_in_total", "app" => a.clone()),
            bytes_in: counter!("belfry_bytes_in_total", "app" => a.clone()),
            messages_out: counter!("belfry_messages_out_total", "app" => a.clone()),
            bytes_out: counter!("belfry_bytes_out_total", "app" => a.clone()),
            client_events: counter!("belfry_client_events_total", "app" => a.clone()),
            slow_consumers: counter!("belfry_slow_consumer_disconnects_total", "app" => a.clone()),
            client_event_rate_limited: counter!("belfry_rate_limited_total", "app" => a.clone(), "kind" => "client_event"),
            app: a,
        }
    }

    pub fn closed(&self, reason: &'static str) {
        counter!("belfry_connections_closed_total", "app" => self.app.clone(), "reason" => reason)
            .increment(1);
    }

    /// One envelope fanned out to `recipients` local sockets.
    pub fn delivered(&self, recipients: usize, frame_len: usize, published_us: u64) {
        self.messages_out.increment(recipients as u64);
        self.bytes_out.increment((recipients * frame_len) as u64);
        if published_us > 0 {
            let lag_us = belfry_coordinator::envelope::now_us().saturating_sub(published_us);
            histogram!("belfry_bus_lag_seconds").record(lag_us as f64 / 1e6);
        }
    }
}

pub fn refused(reason: &'static str) {
    counter!("belfry_connections_refused_total", "reason" => reason).increment(1);
}

/// A signed API request over the app's `api_requests_per_second`.
pub fn api_rate_limited(app: &str) {
    counter!("belfry_rate_limited_total", "app" => app.to_owned(), "kind" => "api").increment(1);
}

pub fn http_request(route: &'static str, status: u16) {
    counter!("belfry_http_requests_total", "route" => route, "status" => status.to_string())
        .increment(1);
}

pub fn publish_latency(seconds: f64) {
    histogram!("belfry_http_publish_seconds").record(seconds);
}

pub fn redis_reconnect() {
    counter!("belfry_redis_reconnects_total").increment(1);
}

pub fn ready(ready: bool, draining: bool) {
    gauge!("belfry_ready").set(if ready { 1.0 } else { 0.0 });
    gauge!("belfry_draining").set(if draining { 1.0 } else { 0.0 });
}
