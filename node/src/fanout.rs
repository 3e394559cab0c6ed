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
use crate::protocol::watchlist::{self, ONLINE_CHANNEL};
use crate::protocol::SocketId;
use crate::registry::AppRegistry;
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
                // Who is online: what the internal channel's events mean is
                // the protocol's (`protocol/watchlist.rs`); this tells the watchers.
                if let Some((user_id, name)) = watchlist::change(&envelope.event, &envelope.data) {
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

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use belfry_coordinator::Delivery;

    use super::*;
    use crate::config::AppConfig;
    use crate::outbox::fake_wire::FakeWire;
    use crate::outbox::Outbox;
    use crate::registry::Registry;

    /// A connected pair over loopback: the server side for an outbox, the
    /// client side to read what it was sent (blocking; the flushers run on
    /// the runtime's workers).
    async fn pair() -> (Arc<crate::tls::Socket>, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let server = tokio::net::TcpStream::from_std(server).unwrap();
        // The reactor learns the socket is writable on its first poll;
        // without a connection task, wait for that here.
        server.writable().await.unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        (Arc::new(crate::tls::Socket::Plain(server)), client)
    }

    /// Reads unmasked server text frames until `want` arrived.
    fn read_texts(client: &mut std::net::TcpStream, want: usize) -> Vec<String> {
        let mut buf = Vec::new();
        let mut out = Vec::new();
        let mut chunk = [0u8; 65536];
        while out.len() < want {
            let n = client.read(&mut chunk).expect("frames arrive");
            assert!(n > 0, "socket closed after {} frames", out.len());
            buf.extend_from_slice(&chunk[..n]);
            loop {
                if buf.len() < 2 {
                    break;
                }
                let (len, head) = match buf[1] & 0x7f {
                    126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
                    126 => break,
                    127 => unreachable!("test frames are small"),
                    n => (n as usize, 2),
                };
                if buf.len() < head + len {
                    break;
                }
                assert_eq!(buf[0], 0x81, "a final text frame");
                out.push(String::from_utf8(buf[head..head + len].to_vec()).unwrap());
                buf.drain(..head + len);
            }
        }
        out
    }

    fn n_of(text: &str) -> u64 {
        let v: serde_json::Value = serde_json::from_str(text).unwrap();
        let data: serde_json::Value = serde_json::from_str(v["data"].as_str().unwrap()).unwrap();
        data["n"].as_u64().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_shard_delivers_every_event_in_order_but_to_the_excluded_socket() {
        let app = AppConfig {
            id: "a".into(),
            key: "k".into(),
            secret: "s".into(),
            ..AppConfig::default()
        };
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let registry = Registry::new(&[app], 3, &tasks, &stop);
        let apps = registry.by_id("a").unwrap().clone();
        let mut clients = Vec::new();
        let mut handles = Vec::new();
        for i in 0..6u64 {
            let (server, client) = pair().await;
            let handle = ConnHandle {
                socket_id: SocketId(i + 1, i + 1),
                outbox: Arc::new(Outbox::new(&server, 1024, None)),
                shard: registry.assign_shard(),
            };
            apps.add_subscriber("c", handle.clone(), &[]);
            handles.push((server, handle));
            clients.push(client);
        }
        let shards: std::collections::HashSet<_> = handles.iter().map(|(_, h)| h.shard).collect();
        assert_eq!(
            shards.len(),
            3,
            "round robin puts subscribers on every shard"
        );

        let excluded = handles[4].1.socket_id;
        let total = 500u64;
        for n in 0..total {
            let mut e = Envelope::event("a", "c", "e", format!("{{\"n\":{n}}}"));
            if n == 7 {
                e.socket_id = Some(excluded.to_string());
            }
            registry.deliver(e).await;
        }
        for (i, client) in clients.iter_mut().enumerate() {
            let skips = usize::from(i == 4);
            let got: Vec<u64> = read_texts(client, total as usize - skips)
                .iter()
                .map(|t| n_of(t))
                .collect();
            let want: Vec<u64> = (0..total).filter(|&n| !(skips == 1 && n == 7)).collect();
            assert_eq!(got, want, "subscriber {i}");
        }
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_channel_with_no_local_subscriber_costs_no_shard_work() {
        let app = AppConfig {
            id: "a".into(),
            ..AppConfig::default()
        };
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let registry = Registry::new(&[app], 2, &tasks, &stop);
        let apps = registry.by_id("a").unwrap().clone();
        let (server, mut client) = pair().await;
        let handle = ConnHandle {
            socket_id: SocketId(1, 1),
            outbox: Arc::new(Outbox::new(&server, 1024, None)),
            shard: 1,
        };
        apps.add_subscriber("here", handle.clone(), &[]);
        assert!(!apps.shard_has(0, "here") && apps.shard_has(1, "here"));
        registry
            .deliver(Envelope::event("a", "elsewhere", "e", "{\"n\":0}".into()))
            .await;
        registry
            .deliver(Envelope::event("a", "here", "e", "{\"n\":1}".into()))
            .await;
        let got = read_texts(&mut client, 1);
        assert_eq!(n_of(&got[0]), 1);
        assert!(apps.remove_subscriber("here", &handle));
        assert_eq!(apps.occupancy("here").subscriptions, 0);
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    /// One app ("a") over `shards` fan-out shards, its flushers running.
    fn one_app(
        shards: usize,
    ) -> (
        Arc<Registry>,
        Arc<AppRegistry>,
        TaskTracker,
        CancellationToken,
    ) {
        let app = AppConfig {
            id: "a".into(),
            ..AppConfig::default()
        };
        let tasks = TaskTracker::new();
        let stop = CancellationToken::new();
        let registry = Registry::new(&[app], shards, &tasks, &stop);
        let apps = registry.by_id("a").unwrap().clone();
        (registry, apps, tasks, stop)
    }

    /// A connection on `wire`, on the next shard, subscribed to `channels`.
    fn subscribe(
        registry: &Registry,
        app: &AppRegistry,
        wire: &Arc<FakeWire>,
        id: u64,
        max_frames: usize,
        channels: &[&str],
    ) -> ConnHandle {
        let handle = ConnHandle {
            socket_id: SocketId(id, id),
            outbox: Arc::new(Outbox::new(wire, max_frames, None)),
            shard: registry.assign_shard(),
        };
        for channel in channels {
            app.add_subscriber(channel, handle.clone(), &[]);
        }
        handle
    }

    /// Lets the flushers run until `done`, for at most five seconds.
    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out waiting until {what}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// The channel and `n` of each event a wire took.
    fn events(wire: &FakeWire) -> Vec<(String, u64)> {
        wire.texts()
            .iter()
            .map(|t| {
                let v: serde_json::Value = serde_json::from_str(t).unwrap();
                assert_eq!(v["event"], "e");
                (v["channel"].as_str().unwrap().to_owned(), n_of(t))
            })
            .collect()
    }

    async fn stop_all(tasks: TaskTracker, stop: CancellationToken) {
        stop.cancel();
        tasks.close();
        tasks.wait().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_subscriber_gets_each_event_of_its_channels_once_in_publish_order() {
        let (registry, app, tasks, stop) = one_app(3);
        // Nine connections, round robin over three shards: on every shard one
        // is on "a", one on "b" and one on both.
        let mut subscribers = Vec::new();
        for i in 0..9u64 {
            let channels: &[&str] = match i / 3 {
                0 => &["a"],
                1 => &["b"],
                _ => &["a", "b"],
            };
            let wire = FakeWire::open();
            let handle = subscribe(&registry, &app, &wire, i + 1, 1024, channels);
            subscribers.push((wire, handle, channels));
        }
        let shards: std::collections::HashSet<_> =
            subscribers.iter().map(|(_, h, _)| h.shard).collect();
        assert_eq!(shards.len(), 3);

        let published: Vec<(String, u64)> = (0..200u64)
            .map(|n| (if n % 3 == 0 { "b" } else { "a" }.to_owned(), n))
            .collect();
        for (channel, n) in &published {
            registry
                .deliver(Envelope::event("a", channel, "e", format!("{{\"n\":{n}}}")))
                .await;
        }
        for (i, (wire, _, channels)) in subscribers.iter().enumerate() {
            let want: Vec<(String, u64)> = published
                .iter()
                .filter(|(channel, _)| channels.contains(&channel.as_str()))
                .cloned()
                .collect();
            until(&format!("subscriber {i} has {} events", want.len()), || {
                wire.texts().len() >= want.len()
            })
            .await;
            assert_eq!(events(wire), want, "subscriber {i} on {channels:?}");
        }
        stop_all(tasks, stop).await;
        for (i, (wire, _, channels)) in subscribers.iter().enumerate() {
            let want = published
                .iter()
                .filter(|(channel, _)| channels.contains(&channel.as_str()))
                .count();
            assert_eq!(wire.texts().len(), want, "subscriber {i}: nothing doubled");
        }
    }

    #[tokio::test]
    async fn events_queued_before_a_flush_share_a_write() {
        // One thread: the flushers run only once the publisher waits, so
        // the events published meanwhile are all queued before one flush.
        let (registry, app, tasks, stop) = one_app(2);
        let wires: Vec<Arc<FakeWire>> = (0..4).map(|_| FakeWire::open()).collect();
        for (i, wire) in wires.iter().enumerate() {
            subscribe(&registry, &app, wire, i as u64 + 1, 1024, &["c"]);
        }
        let total = 20u64;
        for n in 0..total {
            registry
                .deliver(Envelope::event("a", "c", "e", format!("{{\"n\":{n}}}")))
                .await;
        }
        until("every subscriber has every event", || {
            wires.iter().all(|w| w.texts().len() == total as usize)
        })
        .await;
        for (i, wire) in wires.iter().enumerate() {
            let got: Vec<u64> = events(wire).into_iter().map(|(_, n)| n).collect();
            assert_eq!(got, (0..total).collect::<Vec<_>>(), "subscriber {i}");
            assert!(
                wire.writes() < total as usize,
                "subscriber {i}: {} events took {} writes",
                total,
                wire.writes()
            );
        }
        stop_all(tasks, stop).await;
    }

    #[tokio::test]
    async fn a_slow_subscriber_is_closed_and_the_others_get_every_event() {
        let (registry, app, tasks, stop) = one_app(2);
        let full = FakeWire::with_room(0);
        let slow = subscribe(&registry, &app, &full, 1, 4, &["c"]);
        let healthy: Vec<Arc<FakeWire>> = (0..3).map(|_| FakeWire::open()).collect();
        for (i, wire) in healthy.iter().enumerate() {
            subscribe(&registry, &app, wire, i as u64 + 2, 4, &["c"]);
        }
        let publish = |n: u64| Envelope::event("a", "c", "e", format!("{{\"n\":{n}}}"));
        // The first event finds the slow client's socket full.
        registry.deliver(publish(0)).await;
        until("the full socket blocked", || slow.outbox.is_blocked()).await;
        let total = 30u64;
        for n in 1..total {
            registry.deliver(publish(n)).await;
        }
        until("the healthy subscribers have every event", || {
            healthy.iter().all(|w| w.texts().len() == total as usize)
        })
        .await;
        for (i, wire) in healthy.iter().enumerate() {
            let got: Vec<u64> = events(wire).into_iter().map(|(_, n)| n).collect();
            assert_eq!(
                got,
                (0..total).collect::<Vec<_>>(),
                "healthy subscriber {i}"
            );
        }
        let close = slow
            .outbox
            .close_request()
            .expect("the slow client is closed");
        assert_eq!((close.code, close.reason), (4100, "slow_consumer"));
        assert!(!slow.outbox.has_pending(), "its backlog is let go");
        assert!(full.taken().is_empty());
        stop_all(tasks, stop).await;
    }
}
