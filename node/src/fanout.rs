//! The fan-out engine: how an envelope from the bus becomes bytes in every
//! local subscriber's outgoing buffer, and how those buffers are written.
//!
//! Connections are split over N shards (`fanout_shards`, one per CPU by
//! default). Each shard owns its connections' subscriber lists (in
//! `registry.rs`) and runs one flusher task. An event is encoded, WebSocket
//! frame included, once; the same bytes are handed to every shard that has a
//! subscriber of the channel, and each shard appends them to its own
//! subscribers' buffers. No shard waits on another's sockets, so one
//! channel's fan-out runs on every core.
//!
//! A flusher writes its dirty connections 64 at a time and yields in
//! between. Publishes that arrive meanwhile are appended to buffers that
//! have not been written yet, so under load one write carries many frames
//! and the number of writes per second stays about flat as the event rate
//! rises. When buffers get long the flusher stops taking new envelopes
//! until it has written what it has; its bounded inbound queue then fills
//! and `deliver` waits, which slows the bus reader and the HTTP API down
//! instead of growing memory.

use std::collections::VecDeque;
use std::sync::Arc;

use belfry_coordinator::{Envelope, EnvelopeKind};
use bytes::{Bytes, BytesMut};
use metrics::{counter, Counter};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::outbox::ConnHandle;
use crate::protocol::frame::Encode;
use crate::protocol::SocketId;
use crate::registry::{AppRegistry, ONLINE_CHANNEL};
use crate::websocket;

/// Connections written between two yields: small enough that a publish
/// waits at most a few hundred microseconds for the core, large enough that
/// yielding costs nothing next to the writes.
const FLUSH_CHUNK: usize = 64;
/// Envelopes taken from the queue at a time.
const ROUND: usize = 256;
/// Envelopes waiting per shard. When a shard is full, `deliver` waits.
const QUEUE: usize = 8192;
/// Frames waiting for one socket's next write past which a shard is behind:
/// it writes what it has before taking more. Bounds a shard's memory to
/// about this many frames per connection.
const BEHIND_FRAMES: usize = 128;

/// One event, encoded once, on its way to the shards.
struct Prepared {
    app: Arc<AppRegistry>,
    channel: Box<str>,
    /// The whole WebSocket text frame.
    framed: Bytes,
    payload_len: usize,
    exclude: Option<SocketId>,
    published_us: u64,
}

/// The shards' inbound queues.
pub struct FanOut {
    queues: Box<[mpsc::Sender<Arc<Prepared>>]>,
    /// Held while one envelope is handed to every shard, so all shards see
    /// concurrent publishes in the same order and two subscribers of a
    /// channel never disagree on it.
    sequence: tokio::sync::Mutex<()>,
}

/// One shard's counters: together they show the coalescing (deliveries per
/// write) and that every shard works on a channel.
struct ShardMetrics {
    deliveries: Counter,
    writes: Counter,
}

impl FanOut {
    /// Starts `shards` flushers on `tasks`. They end on `stop`, or when this
    /// is dropped (their queues close with it).
    pub fn start(shards: usize, tasks: &TaskTracker, stop: &CancellationToken) -> Self {
        let mut queues = Vec::with_capacity(shards);
        for index in 0..shards {
            let (tx, rx) = mpsc::channel(QUEUE);
            queues.push(tx);
            let label = index.to_string();
            let metrics = ShardMetrics {
                deliveries: counter!("belfry_fanout_deliveries_total", "shard" => label.clone()),
                writes: counter!("belfry_fanout_writes_total", "shard" => label),
            };
            metrics.deliveries.absolute(0);
            metrics.writes.absolute(0);
            tasks.spawn(flusher(index, rx, metrics, stop.clone()));
        }
        Self {
            queues: queues.into(),
            sequence: tokio::sync::Mutex::new(()),
        }
    }

    pub fn shards(&self) -> usize {
        self.queues.len()
    }

    /// Delivers one envelope of `app` to this node's subscribers.
    pub async fn deliver(&self, app: &Arc<AppRegistry>, envelope: Envelope) {
        match envelope.kind {
            EnvelopeKind::Event if envelope.channel == ONLINE_CHANNEL => {
                // Who is online: member events of the internal channel become
                // watchlist events for the users' watchers.
                let name = match envelope.event.as_str() {
                    "pusher_internal:member_added" => "online",
                    "pusher_internal:member_removed" => "offline",
                    _ => return,
                };
                let user = serde_json::from_str::<serde_json::Value>(&envelope.data)
                    .ok()
                    .and_then(|v| v.get("user_id").cloned());
                if let Some(serde_json::Value::String(user_id)) = user {
                    app.notify_watchers(&user_id, name);
                }
            }
            EnvelopeKind::Event => {
                if app.occupancy(&envelope.channel).subscriptions == 0 {
                    return;
                }
                let text = Encode::event_with_user(
                    &envelope.event,
                    Some(&envelope.channel),
                    &envelope.data,
                    envelope.user_id.as_deref(),
                );
                let mut framed = BytesMut::with_capacity(text.len() + 10);
                websocket::encode(&mut framed, websocket::OP_TEXT, text.as_str().as_bytes());
                let prepared = Arc::new(Prepared {
                    app: app.clone(),
                    exclude: envelope.socket_id.as_deref().and_then(SocketId::parse),
                    channel: envelope.channel.into_boxed_str(),
                    framed: framed.freeze(),
                    payload_len: text.len(),
                    published_us: envelope.ts_us,
                });
                self.hand_over(prepared).await;
            }
            EnvelopeKind::Terminate => {
                if let Some(user_id) = &envelope.user_id {
                    app.terminate_user(user_id);
                }
            }
        }
    }

    async fn hand_over(&self, prepared: Arc<Prepared>) {
        // A send fails only once the flusher is gone (shutdown).
        if self.queues.len() == 1 {
            let _ = self.queues[0].send(prepared).await;
            return;
        }
        let _order = self.sequence.lock().await;
        for (shard, queue) in self.queues.iter().enumerate() {
            // A subscriber that joins this shard after the check was not
            // subscribed when the event was published.
            if prepared.app.shard_has(shard, &prepared.channel) {
                let _ = queue.send(prepared.clone()).await;
            }
        }
    }
}

/// One shard's flusher: appends each envelope to its subscribers' buffers
/// and writes the connections that have something to send, a chunk at a
/// time, taking in new envelopes between chunks.
async fn flusher(
    shard: usize,
    mut inbound: mpsc::Receiver<Arc<Prepared>>,
    metrics: ShardMetrics,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(ROUND);
    let mut dirty: VecDeque<ConnHandle> = VecDeque::new();
    let mut behind = false;
    loop {
        if dirty.is_empty() {
            behind = false;
            let received = tokio::select! {
                n = inbound.recv_many(&mut batch, ROUND) => n,
                _ = stop.cancelled() => 0,
            };
            if received == 0 {
                return;
            }
        } else if !behind {
            while batch.len() < ROUND {
                match inbound.try_recv() {
                    Ok(p) => batch.push(p),
                    Err(_) => break,
                }
            }
        }
        for prepared in batch.drain(..) {
            let (sent, backlog) = prepared.app.fan_out(
                shard,
                &prepared.channel,
                &prepared.framed,
                prepared.exclude,
                &mut dirty,
            );
            behind |= backlog >= BEHIND_FRAMES;
            metrics.deliveries.increment(sent as u64);
            prepared
                .app
                .metrics
                .delivered(sent, prepared.payload_len, prepared.published_us);
        }
        let mut written = 0;
        while written < FLUSH_CHUNK {
            let Some(handle) = dirty.pop_front() else {
                break;
            };
            handle.outbox.flush();
            written += 1;
        }
        metrics.writes.increment(written as u64);
        if !dirty.is_empty() {
            // Let the HTTP API, the bus and the connections' own tasks run;
            // what they publish meanwhile joins buffers not yet written.
            tokio::task::yield_now().await;
        }
    }
}
