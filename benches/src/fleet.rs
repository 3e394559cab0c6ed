//! The simulated clients: a few OS threads, each running a single-threaded
//! tokio runtime that owns thousands of small connection tasks.
//!
//! A connection task is one socket, one read buffer and a `Session` (what
//! it subscribed to and which sequence numbers it saw). Everything a task
//! records goes to its thread's `Shard`, locked once per socket read, so the
//! generator spends its time in the kernel and in the server rather than in
//! bookkeeping. The controller hands out connections round-robin with
//! `Fleet::spawn` and learns progress only through the shards (`stats`).
//! Dropping the fleet (or `stop`) drops every socket at once.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Semaphore, SemaphorePermit};

use crate::pusher::{self, App, Auth, Incoming};
use crate::stats::{Latency, SeqTracker, Shard, ShardStats};
use crate::ws::{self, Endpoint};

/// Initial read buffer per connection; it grows only for larger frames.
const READ_BUF: usize = 4096;
/// From TCP connect to subscribed (or, for churners, to connected).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// What the fleet connects to and how.
#[derive(Debug, Clone)]
pub struct FleetConfig {
    pub endpoints: Vec<Endpoint>,
    pub app: App,
    /// Spread client sockets over 127.0.0.1 ..= 127.0.0.K (0 = let the kernel choose).
    pub source_addrs: u32,
    pub threads: usize,
    /// Connections allowed between TCP connect and subscribed at once.
    pub connect_concurrency: usize,
}

/// What one connection does once connected.
#[derive(Debug, Clone)]
pub enum Role {
    /// Subscribes to one channel and counts what arrives on it.
    Subscriber { channel: String, auth: Auth },
    /// Presence churn: joins and leaves `channel` as user `user_id` on the
    /// schedule published in `plan`; `observers` is how many subscribers on
    /// the channel should see each join and leave.
    Churner {
        channel: String,
        user_id: String,
        observers: u64,
        /// Where in each period this churner joins, 0.0..1.0.
        slot: f64,
        plan: watch::Receiver<Option<ChurnPlan>>,
    },
}

/// When churners run: joins at `start + period * (k + slot)` until `end`,
/// each followed by a leave half a period later.
#[derive(Debug, Clone, Copy)]
pub struct ChurnPlan {
    pub start: Instant,
    pub end: Instant,
    pub period: Duration,
}

struct Shared {
    config: FleetConfig,
    ws_paths: Vec<String>,
    connect_gate: Semaphore,
}

struct Spec {
    index: usize,
    role: Role,
}

struct ClientThread {
    tx: mpsc::UnboundedSender<Spec>,
    handle: std::thread::JoinHandle<()>,
    shard: Shard,
}

/// The set of client threads and the connections they hold.
pub struct Fleet {
    threads: Vec<ClientThread>,
    spawned: usize,
}

impl Fleet {
    pub fn start(config: FleetConfig) -> anyhow::Result<Self> {
        anyhow::ensure!(!config.endpoints.is_empty(), "no WebSocket URL");
        let ws_paths = config
            .endpoints
            .iter()
            .map(|e| {
                format!(
                    "{}/app/{}?protocol=7&client=js&version=8.4.0&flash=false",
                    e.prefix, config.app.key
                )
            })
            .collect();
        let shared = Arc::new(Shared {
            connect_gate: Semaphore::new(config.connect_concurrency.max(1)),
            ws_paths,
            config,
        });
        let mut threads = Vec::new();
        for i in 0..shared.config.threads.max(1) {
            let (tx, rx) = mpsc::unbounded_channel();
            let shard = Shard::default();
            let handle = {
                let shared = shared.clone();
                let shard = shard.clone();
                std::thread::Builder::new()
                    .name(format!("bench-client-{i}"))
                    .spawn(move || client_thread(rx, shared, shard))?
            };
            threads.push(ClientThread { tx, handle, shard });
        }
        Ok(Fleet {
            threads,
            spawned: 0,
        })
    }

    /// Starts one connection on the next thread.
    pub fn spawn(&mut self, role: Role) {
        let index = self.spawned;
        self.spawned += 1;
        let thread = &self.threads[index % self.threads.len()];
        // A send fails only if the thread died, which its shard errors show.
        let _ = thread.tx.send(Spec { index, role });
    }

    pub fn shards(&self) -> Vec<Shard> {
        self.threads.iter().map(|t| t.shard.clone()).collect()
    }

    /// Closes every connection and joins the client threads.
    pub fn stop(self) {
        for t in self.threads {
            drop(t.tx);
            let _ = t.handle.join();
        }
    }
}

fn client_thread(mut rx: mpsc::UnboundedReceiver<Spec>, shared: Arc<Shared>, shard: Shard) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            shard.lock().error(format!("client runtime: {e}"));
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        while let Some(spec) = rx.recv().await {
            tokio::task::spawn_local(run_connection(spec, shared.clone(), shard.clone()));
        }
    });
    // Dropping `local` here drops every connection task and closes its socket.
}

async fn run_connection(spec: Spec, shared: Arc<Shared>, shard: Shard) {
    let mut permit = shared.connect_gate.acquire().await.ok();
    let endpoint_index = spec.index % shared.config.endpoints.len();
    let endpoint = &shared.config.endpoints[endpoint_index];
    let source = source_addr(&shared.config, endpoint, spec.index);
    let mut buf = BytesMut::with_capacity(READ_BUF);
    let setup = tokio::time::timeout(SETUP_TIMEOUT, async {
        let mut stream = ws::tcp_connect(endpoint.addr, source).await?;
        ws::handshake(
            &mut stream,
            &endpoint.host_header,
            &shared.ws_paths[endpoint_index],
            &mut buf,
        )
        .await?;
        Ok::<_, std::io::Error>(stream)
    })
    .await;
    let stream = match setup {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return connect_failed(&shard, format!("connect: {e}")),
        Err(_) => return connect_failed(&shard, "connect: timed out".into()),
    };
    let mut session = Session::new(spec.index, spec.role, &shared.config.app);
    let mut conn = Conn {
        stream,
        buf,
        out: Vec::new(),
        mask: ws::MaskSource::new(spec.index as u64 + 1),
        fragment: Vec::new(),
    };
    let outcome = conn.run(&mut session, &shard, &mut permit).await;
    let mut s = shard.lock();
    match outcome {
        Ended::Closed(code) => {
            if session.established {
                s.counters.disconnected += 1;
            } else {
                s.counters.connect_failed += 1;
            }
            if let Some(code) = code {
                *s.close_codes.entry(code).or_insert(0) += 1;
            }
        }
        Ended::Error(e) => {
            if session.established {
                s.counters.disconnected += 1;
            } else {
                s.counters.connect_failed += 1;
            }
            s.error(e);
        }
    }
    if session.established && session.awaiting_subscription() {
        s.counters.subscribe_failed += 1;
    }
}

fn connect_failed(shard: &Shard, message: String) {
    let mut s = shard.lock();
    s.counters.connect_failed += 1;
    s.error(message);
}

fn source_addr(config: &FleetConfig, endpoint: &Endpoint, index: usize) -> Option<Ipv4Addr> {
    let k = config.source_addrs.min(254);
    if k == 0 || !endpoint.addr.ip().is_loopback() {
        return None;
    }
    Some(Ipv4Addr::new(127, 0, 0, 1 + (index as u32 % k) as u8))
}

enum Ended {
    /// The server closed (with a close code if it sent one).
    Closed(Option<u16>),
    Error(String),
}

/// Per-connection protocol state: what to subscribe to and what was seen.
struct Session {
    role: Role,
    app: App,
    established: bool,
    socket_id: String,
    phase: Phase,
    seq: SeqTracker,
    /// Churners: next join/leave time and the cycle number.
    next_action: Option<Instant>,
    cycle: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Phase {
    Connecting,
    Subscribing {
        sent: Instant,
    },
    Subscribed,
    /// Churner between a leave and its next join.
    Out,
    /// Churner waiting for the start of the churn plan.
    Waiting,
}

impl Session {
    fn new(_index: usize, role: Role, app: &App) -> Self {
        Session {
            role,
            app: app.clone(),
            established: false,
            socket_id: String::new(),
            phase: Phase::Connecting,
            seq: SeqTracker::default(),
            next_action: None,
            cycle: 0,
        }
    }

    fn awaiting_subscription(&self) -> bool {
        matches!(self.role, Role::Subscriber { .. }) && !matches!(self.phase, Phase::Subscribed)
    }

    fn subscribe(&mut self, out: &mut Outbox) {
        let frame = match &self.role {
            Role::Subscriber { channel, auth } => {
                pusher::subscribe_frame(&self.app, &self.socket_id, channel, auth)
            }
            Role::Churner {
                channel, user_id, ..
            } => pusher::subscribe_frame(
                &self.app,
                &self.socket_id,
                channel,
                &Auth::Presence {
                    user_id: user_id.clone(),
                },
            ),
        };
        out.text(frame.as_bytes());
        self.phase = Phase::Subscribing {
            sent: Instant::now(),
        };
    }

    /// Handles one complete text message from the server.
    fn on_message(
        &mut self,
        payload: &[u8],
        now_ns: u64,
        stats: &mut ShardStats,
        out: &mut Outbox,
    ) -> Result<(), String> {
        match pusher::classify(payload) {
            Incoming::Bench { seq, t } => {
                if self.seq.record(seq) {
                    stats.counters.deliveries += 1;
                    stats.record_latency(Latency::Delivery, now_ns.saturating_sub(t) / 1000);
                } else {
                    stats.counters.duplicates += 1;
                }
            }
            Incoming::ConnectionEstablished { socket_id } => {
                self.socket_id = socket_id.to_string();
                self.established = true;
                stats.counters.connected += 1;
                match self.role {
                    Role::Subscriber { .. } => self.subscribe(out),
                    Role::Churner { .. } => self.phase = Phase::Waiting,
                }
            }
            Incoming::SubscriptionSucceeded => {
                if let Phase::Subscribing { sent } = self.phase {
                    self.phase = Phase::Subscribed;
                    match &self.role {
                        Role::Subscriber { .. } => stats.counters.subscribed += 1,
                        Role::Churner { observers, .. } => {
                            stats.counters.joins += 1;
                            stats.counters.expected_member_added += observers;
                            let us = sent.elapsed().as_micros() as u64;
                            stats.record_latency(Latency::Join, us);
                        }
                    }
                }
            }
            Incoming::MemberAdded { t } => {
                if let Role::Subscriber { .. } = self.role {
                    stats.counters.member_added += 1;
                    if let Some(t) = t {
                        let us = now_ns.saturating_sub(t) / 1000;
                        stats.record_latency(Latency::MemberAdded, us);
                    }
                }
            }
            Incoming::MemberRemoved => {
                if let Role::Subscriber { .. } = self.role {
                    stats.counters.member_removed += 1;
                }
            }
            Incoming::Ping => {
                out.text(pusher::PONG_FRAME);
                stats.counters.pings_answered += 1;
            }
            Incoming::Error { code } => {
                let text = String::from_utf8_lossy(&payload[..payload.len().min(200)]);
                if matches!(self.phase, Phase::Subscribing { .. }) {
                    return Err(format!("subscribe refused: {text}"));
                }
                stats.error(format!("server error {code:?}: {text}"));
            }
            Incoming::Other => stats.counters.other_frames += 1,
        }
        Ok(())
    }

    /// Churners: acts on the join/leave schedule.
    fn on_timer(&mut self, now: Instant, stats: &mut ShardStats, out: &mut Outbox) {
        let (observers, slot, plan) = match &self.role {
            Role::Churner {
                observers,
                slot,
                plan,
                ..
            } => (*observers, *slot, *plan.borrow()),
            Role::Subscriber { .. } => (0, 0.0, None),
        };
        let Some(plan) = plan else {
            self.next_action = None;
            return;
        };
        let join_at = |cycle: u64| plan.start + plan.period.mul_f64(cycle as f64 + slot);
        match self.phase {
            Phase::Out => {
                let at = join_at(self.cycle);
                if at >= plan.end {
                    self.next_action = None;
                } else if now < at {
                    self.next_action = Some(at);
                } else {
                    self.subscribe(out);
                    self.next_action = Some(at + plan.period / 2);
                }
            }
            Phase::Subscribing { .. } | Phase::Subscribed => {
                if self.phase == Phase::Subscribed {
                    stats.counters.leaves += 1;
                    stats.counters.expected_member_removed += observers;
                } else {
                    stats.error("presence join not confirmed within half a period".into());
                }
                if let Role::Churner { channel, .. } = &self.role {
                    out.text(pusher::unsubscribe_frame(channel).as_bytes());
                }
                self.phase = Phase::Out;
                self.cycle += 1;
                let next = join_at(self.cycle);
                self.next_action = (next < plan.end).then_some(next.max(now));
            }
            Phase::Connecting | Phase::Waiting => self.next_action = None,
        }
    }
}

/// Frames waiting to be written, masked as a client must.
struct Outbox<'a> {
    out: &'a mut Vec<u8>,
    mask: &'a mut ws::MaskSource,
}

impl Outbox<'_> {
    fn text(&mut self, payload: &[u8]) {
        let mask = self.mask.next_mask();
        ws::encode_client_frame(self.out, ws::OP_TEXT, payload, mask);
    }

    fn pong(&mut self, payload: &[u8]) {
        let mask = self.mask.next_mask();
        ws::encode_client_frame(self.out, ws::OP_PONG, payload, mask);
    }
}

struct Conn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    mask: ws::MaskSource,
    /// A fragmented message being reassembled (rare; servers send whole frames).
    fragment: Vec<u8>,
}

impl Conn {
    async fn run(
        &mut self,
        session: &mut Session,
        shard: &Shard,
        permit: &mut Option<SemaphorePermit<'_>>,
    ) -> Ended {
        let setup_deadline = tokio::time::Instant::now() + SETUP_TIMEOUT;
        loop {
            let closed = match self.process_buffered(session, shard) {
                Ok(closed) => closed,
                Err(e) => return Ended::Error(e),
            };
            if !self.out.is_empty() {
                if let Err(e) = self.stream.write_all(&self.out).await {
                    return Ended::Error(format!("write: {e}"));
                }
                self.out.clear();
            }
            if let Some(code) = closed {
                return Ended::Closed(code);
            }
            // Setup is done: let the next connection start its handshake.
            if permit.is_some()
                && matches!(
                    (&session.role, session.phase),
                    (Role::Subscriber { .. }, Phase::Subscribed)
                        | (Role::Churner { .. }, Phase::Waiting)
                )
            {
                *permit = None;
            }
            if session.phase == Phase::Waiting {
                if let Role::Churner { plan, .. } = &mut session.role {
                    // Nothing arrives before this connection subscribes.
                    if plan.wait_for(|p| p.is_some()).await.is_err() {
                        return Ended::Closed(None);
                    }
                    session.phase = Phase::Out;
                    session.next_action = Some(Instant::now());
                }
            }
            let in_setup = permit.is_some();
            if self.buf.capacity() - self.buf.len() < 1024 {
                self.buf.reserve(READ_BUF);
            }
            let read = match (session.next_action, in_setup) {
                (Some(at), _) => {
                    tokio::select! {
                        r = self.stream.read_buf(&mut self.buf) => Some(r),
                        _ = tokio::time::sleep_until(at.into()) => None,
                    }
                }
                (None, true) => {
                    tokio::select! {
                        r = self.stream.read_buf(&mut self.buf) => Some(r),
                        _ = tokio::time::sleep_until(setup_deadline) => {
                            return Ended::Error("setup timed out (no subscription_succeeded)".into());
                        }
                    }
                }
                (None, false) => Some(self.stream.read_buf(&mut self.buf).await),
            };
            match read {
                None => {
                    let mut stats = shard.lock();
                    let mut outbox = Outbox {
                        out: &mut self.out,
                        mask: &mut self.mask,
                    };
                    session.on_timer(Instant::now(), &mut stats, &mut outbox);
                }
                Some(Ok(0)) => return Ended::Closed(None),
                Some(Ok(_)) => {}
                Some(Err(e)) => return Ended::Error(format!("read: {e}")),
            }
        }
    }

    /// Handles every complete frame in the buffer. Returns `Some(code)` once
    /// the server sent a close frame.
    fn process_buffered(
        &mut self,
        session: &mut Session,
        shard: &Shard,
    ) -> Result<Option<Option<u16>>, String> {
        if self.buf.is_empty() {
            return Ok(None);
        }
        let now_ns = pusher::unix_nanos();
        let mut stats = shard.lock();
        stats.counters.reads += 1;
        let mut outbox = Outbox {
            out: &mut self.out,
            mask: &mut self.mask,
        };
        let mut consumed = 0;
        let mut closed = None;
        while let Some(h) = ws::parse_header(&self.buf[consumed..]).map_err(|e| e.to_string())? {
            if self.buf.len() - consumed < h.total_len() {
                self.buf.reserve(h.total_len());
                break;
            }
            let payload = &self.buf[consumed + h.header_len..consumed + h.total_len()];
            match h.opcode {
                ws::OP_TEXT | ws::OP_BINARY | ws::OP_CONTINUATION => {
                    if h.fin && h.opcode != ws::OP_CONTINUATION && self.fragment.is_empty() {
                        session.on_message(payload, now_ns, &mut stats, &mut outbox)?;
                    } else {
                        self.fragment.extend_from_slice(payload);
                        if h.fin {
                            let message = std::mem::take(&mut self.fragment);
                            session.on_message(&message, now_ns, &mut stats, &mut outbox)?;
                        }
                    }
                }
                ws::OP_PING => {
                    outbox.pong(payload);
                    stats.counters.pings_answered += 1;
                }
                ws::OP_CLOSE => {
                    let code =
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                    closed = Some(code);
                    consumed += h.total_len();
                    break;
                }
                _ => {}
            }
            consumed += h.total_len();
        }
        self.buf.advance(consumed);
        Ok(closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn app() -> App {
        App {
            id: "a".into(),
            key: "k".into(),
            secret: "s".into(),
        }
    }

    fn subscriber() -> Session {
        Session::new(
            0,
            Role::Subscriber {
                channel: "c".into(),
                auth: Auth::Public,
            },
            &app(),
        )
    }

    #[test]
    fn subscriber_subscribes_after_handshake_and_counts_events() {
        let mut s = subscriber();
        let mut stats = ShardStats::default();
        let mut out = Vec::new();
        let mut mask = ws::MaskSource::new(1);
        let mut outbox = Outbox {
            out: &mut out,
            mask: &mut mask,
        };
        let est = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":30}"}"#;
        s.on_message(est, 0, &mut stats, &mut outbox).unwrap();
        assert!(!outbox.out.is_empty(), "subscribe frame queued");
        let ok = br#"{"event":"pusher_internal:subscription_succeeded","data":"{}","channel":"c"}"#;
        s.on_message(ok, 0, &mut stats, &mut outbox).unwrap();
        assert_eq!(stats.counters.subscribed, 1);
        for seq in [0u64, 1, 1, 2] {
            let ev = format!(
                r#"{{"event":"bench-event","data":"{{\"seq\":{seq},\"t\":1000000}}","channel":"c"}}"#
            );
            s.on_message(ev.as_bytes(), 3_000_000, &mut stats, &mut outbox)
                .unwrap();
        }
        assert_eq!(stats.counters.deliveries, 3);
        assert_eq!(stats.counters.duplicates, 1);
    }

    #[test]
    fn subscription_error_fails_the_connection() {
        let mut s = subscriber();
        let mut stats = ShardStats::default();
        let mut out = Vec::new();
        let mut mask = ws::MaskSource::new(1);
        let mut outbox = Outbox {
            out: &mut out,
            mask: &mut mask,
        };
        let est = br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":30}"}"#;
        s.on_message(est, 0, &mut stats, &mut outbox).unwrap();
        let err =
            br#"{"event":"pusher:subscription_error","data":"{\"code\":4009}","channel":"c"}"#;
        assert!(s.on_message(err, 0, &mut stats, &mut outbox).is_err());
    }

    #[test]
    fn source_addresses_cycle_over_loopback() {
        let config = FleetConfig {
            endpoints: vec![],
            app: app(),
            source_addrs: 3,
            threads: 1,
            connect_concurrency: 1,
        };
        let ep = Endpoint::parse("ws://127.0.0.1:1").unwrap();
        let ips: Vec<_> = (0..4)
            .map(|i| source_addr(&config, &ep, i).unwrap())
            .collect();
        assert_eq!(ips[0], Ipv4Addr::new(127, 0, 0, 1));
        assert_eq!(ips[2], Ipv4Addr::new(127, 0, 0, 3));
        assert_eq!(ips[3], Ipv4Addr::new(127, 0, 0, 1));
    }

    /// Reads one masked client frame from `s`; returns (opcode, payload).
    async fn read_client_frame(s: &mut TcpStream, buf: &mut Vec<u8>) -> (u8, Vec<u8>) {
        loop {
            if buf.len() >= 2 {
                let len7 = (buf[1] & 0x7F) as usize;
                let (hl, len) = match len7 {
                    126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                    126 => (usize::MAX, 0),
                    n => (2, n),
                };
                if hl != usize::MAX && buf.len() >= hl + 4 + len {
                    let key = [buf[hl], buf[hl + 1], buf[hl + 2], buf[hl + 3]];
                    let payload = buf[hl + 4..hl + 4 + len]
                        .iter()
                        .enumerate()
                        .map(|(i, b)| b ^ key[i & 3])
                        .collect();
                    let op = buf[0] & 0x0F;
                    buf.drain(..hl + 4 + len);
                    return (op, payload);
                }
            }
            let mut tmp = [0u8; 4096];
            let n = s.read(&mut tmp).await.unwrap();
            assert!(n > 0, "client closed");
            buf.extend_from_slice(&tmp[..n]);
        }
    }

    fn server_frame(op: u8, payload: &[u8]) -> Vec<u8> {
        assert!(payload.len() < 126);
        let mut f = vec![0x80 | op, payload.len() as u8];
        f.extend_from_slice(payload);
        f
    }

    /// A fake Pusher server: handshake, subscription, five events (one
    /// duplicated, split across writes) and a ping that must be answered.
    async fn fake_server_connection(mut s: TcpStream) {
        let mut buf = Vec::new();
        while ws::find(&buf, b"\r\n\r\n").is_none() {
            let mut tmp = [0u8; 1024];
            let n = s.read(&mut tmp).await.unwrap();
            buf.extend_from_slice(&tmp[..n]);
        }
        assert!(buf.starts_with(b"GET /app/k?protocol=7"));
        buf.clear();
        let mut out = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".to_vec();
        out.extend(server_frame(
            ws::OP_TEXT,
            br#"{"event":"pusher:connection_established","data":"{\"socket_id\":\"1.2\",\"activity_timeout\":30}"}"#,
        ));
        s.write_all(&out).await.unwrap();
        let (op, sub) = read_client_frame(&mut s, &mut buf).await;
        assert_eq!(op, ws::OP_TEXT);
        let v: serde_json::Value = serde_json::from_slice(&sub).unwrap();
        assert_eq!(v["event"], "pusher:subscribe");
        assert_eq!(v["data"]["channel"], "c");
        let mut out = server_frame(
            ws::OP_TEXT,
            br#"{"event":"pusher_internal:subscription_succeeded","data":"{}","channel":"c"}"#,
        );
        for seq in [0, 1, 2, 2, 3, 4] {
            let t = pusher::unix_nanos();
            let ev = format!(
                r#"{{"event":"bench-event","data":"{{\"seq\":{seq},\"t\":{t}}}","channel":"c"}}"#
            );
            out.extend(server_frame(ws::OP_TEXT, ev.as_bytes()));
        }
        out.extend(server_frame(ws::OP_PING, b"hi"));
        // Split mid-frame to exercise partial reads.
        let (a, b) = out.split_at(out.len() / 2 + 3);
        s.write_all(a).await.unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.write_all(b).await.unwrap();
        let (op, pong) = read_client_frame(&mut s, &mut buf).await;
        assert_eq!((op, pong.as_slice()), (ws::OP_PONG, &b"hi"[..]));
        // Close with a code the client should record.
        s.write_all(&server_frame(ws::OP_CLOSE, &4200u16.to_be_bytes()))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn fleet_subscribes_counts_and_answers_pings() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let clients = 20;
        let server = tokio::spawn(async move {
            let mut tasks = Vec::new();
            for _ in 0..clients {
                let (s, _) = listener.accept().await.unwrap();
                tasks.push(tokio::spawn(fake_server_connection(s)));
            }
            for t in tasks {
                t.await.unwrap();
            }
        });
        let mut fleet = Fleet::start(FleetConfig {
            endpoints: vec![Endpoint::parse(&format!("ws://127.0.0.1:{port}")).unwrap()],
            app: app(),
            source_addrs: 4,
            threads: 2,
            connect_concurrency: 8,
        })
        .unwrap();
        for _ in 0..clients {
            fleet.spawn(Role::Subscriber {
                channel: "c".into(),
                auth: Auth::Public,
            });
        }
        server.await.unwrap();
        let mut collector = crate::stats::Collector::new(fleet.shards());
        let deadline = Instant::now() + Duration::from_secs(5);
        let totals = loop {
            let t = collector.collect();
            if t.disconnected == clients || Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        fleet.stop();
        assert_eq!(totals.connected, clients);
        assert_eq!(totals.subscribed, clients);
        assert_eq!(totals.deliveries, 5 * clients);
        assert_eq!(totals.duplicates, clients);
        assert_eq!(totals.pings_answered, clients);
        assert_eq!(collector.close_codes.get(&4200), Some(&clients));
        assert_eq!(
            collector.latency(crate::stats::Latency::Delivery).run.len(),
            5 * clients
        );
    }
}
