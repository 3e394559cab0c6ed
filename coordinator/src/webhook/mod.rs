//! Webhooks: Pusher's POSTs to an app's URLs when a channel becomes occupied
//! or vacated (and the other event types the app asks for).
//!
//! A `Job` is one event to report. Whoever decides an edge hands the job to
//! a `Sink`: on a single node the in-process queue, in a cluster the Redis
//! stream the occupancy scripts write to themselves. The `Dispatcher` batches
//! jobs per app and URL, signs and POSTs them, and retries; `stream` feeds it
//! from the Redis stream on the coordinator's leader and acknowledges a job
//! only once every URL that wanted it answered 2xx or gave up.
//!
//! Not here: deciding the edges (the occupancy and presence scripts,
//! `occupancy.rs` and `presence.rs`).

pub mod client;
pub mod config;
pub mod dispatch;
pub mod format;
pub mod stream;

pub use config::{WebhookApp, WebhookApps, WebhookTarget};
pub use dispatch::{DispatchOptions, Dispatcher};

/// Registers the webhook metrics at 0, so dashboards show 0 rather than no
/// data before the first webhook. Call once the recorder is installed.
pub fn zero_metrics() {
    metrics::counter!("belfry_webhook_queued_total").absolute(0);
    metrics::counter!("belfry_webhook_sent_total").absolute(0);
    metrics::counter!("belfry_webhook_retried_total").absolute(0);
    metrics::counter!("belfry_webhook_debounced_total").absolute(0);
    for reason in ["retries_exhausted", "queue_full", "trimmed", "redis"] {
        metrics::counter!("belfry_webhook_dropped_total", "reason" => reason).absolute(0);
    }
    let _ = metrics::histogram!("belfry_webhook_latency_seconds");
}

/// One event for the webhooks: the fields Pusher defines for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Job {
    pub app: String,
    pub channel: String,
    /// Pusher's event name: `channel_occupied`, `channel_vacated`, ...
    pub name: String,
    /// `member_added` / `member_removed` (and `client_event` on presence).
    pub user_id: Option<String>,
    /// `client_event`: the event's name, its data and the sender's socket.
    pub event: Option<String>,
    pub data: Option<String>,
    pub socket_id: Option<String>,
    /// `subscription_count`: the channel's cluster-wide subscriptions.
    pub subscription_count: Option<usize>,
    /// When the edge was decided, ms since the epoch (for the latency metric).
    pub at_ms: u64,
    /// Where the job came from, so a re-delivery carries the same
    /// `X-Belfry-Webhook-Id`: the stream entry id, or a local sequence.
    pub id: String,
}

impl Job {
    pub fn new(app: &str, channel: &str, name: &str) -> Job {
        Job {
            app: app.to_owned(),
            channel: channel.to_owned(),
            name: name.to_owned(),
            user_id: None,
            event: None,
            data: None,
            socket_id: None,
            subscription_count: None,
            at_ms: crate::envelope::now_us() / 1000,
            id: String::new(),
        }
    }
}

impl Job {
    /// The optional string fields, by their Pusher (and stream) names.
    pub fn optional_fields(&self) -> [(&'static str, Option<&String>); 4] {
        [
            ("user_id", self.user_id.as_ref()),
            ("event", self.event.as_ref()),
            ("data", self.data.as_ref()),
            ("socket_id", self.socket_id.as_ref()),
        ]
    }
}

/// Where a decided edge goes. `send` never waits: an unreachable webhook
/// URL must not slow the sockets.
pub trait Sink: Send + Sync + 'static {
    fn send(&self, job: Job);
}

/// For nodes whose edges are queued elsewhere (the Redis scripts) or not at all.
pub struct NoSink;

impl Sink for NoSink {
    fn send(&self, _job: Job) {}
}
