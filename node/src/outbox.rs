//! A connection's outgoing side: the bytes waiting to be written, and the
//! handle through which the rest of the node reaches the connection.
//!
//! Frames are appended (as WebSocket frames) to one buffer per connection
//! and written with as few syscalls as the socket allows: whoever queued
//! them flushes, a fan-out flushes each recipient once per batch of events,
//! and when the socket is full the connection's own task finishes the write
//! once it is writable again. A client that lets too many frames pile up is
//! a slow consumer: it is closed with 4100, never buffered without bound.
//!
//! The outbox writes through a [`Wire`]: anything that takes bytes without
//! waiting. In the node that is the connection's `tls::Socket`; in tests it
//! is a fake that records what it took, so the queueing, coalescing and
//! slow-consumer rules here and the fan-out in `fanout.rs` are tested
//! without a network. The outbox does not own its wire (the connection task
//! does), nor read from it.

use std::io;
use std::sync::{Arc, Weak};

use bytes::{Buf, BytesMut};
use parking_lot::Mutex;
use tokio::sync::Notify;

use crate::protocol::{code, SocketId};
use crate::telemetry::AppMetrics;
use crate::websocket;

/// Buffers larger than this are given back once drained, so a burst does not
/// pin memory to an idle connection.
const KEEP_CAPACITY: usize = 16 * 1024;

thread_local! {
    /// Where `send` encodes a reply it writes at once.
    static SEND_SCRATCH: std::cell::RefCell<BytesMut> = std::cell::RefCell::new(BytesMut::new());
}

/// Where an outbox writes: a stream that takes bytes without waiting, like
/// `TcpStream::try_write`. `Ok(n)` took the first `n` bytes, `WouldBlock`
/// means it is full, and any other error that it is gone.
pub trait Wire: Send + Sync {
    fn try_write(&self, buf: &[u8]) -> io::Result<usize>;
}

/// How far a write that must not wait got.
enum Wrote {
    All,
    /// The socket took this many bytes, then was full.
    Blocked(usize),
    /// The socket took this many bytes, then nothing (a zero-length write).
    Eof(usize),
    Failed,
}

/// Writes `buf` until it is out or the socket is full, without waiting.
fn write_nonblocking(stream: &dyn Wire, buf: &[u8]) -> Wrote {
    let mut at = 0;
    while at < buf.len() {
        match stream.try_write(&buf[at..]) {
            Ok(0) => return Wrote::Eof(at),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Wrote::Blocked(at),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return Wrote::Failed,
        }
    }
    Wrote::All
}

/// After `written` bytes of `pending` went out, how many bytes of the frame
/// they ended in are still unsent. `pending` starts with `partial` bytes
/// that finish an earlier frame, then whole (unmasked, server) frames.
fn unsent_of_frame(pending: &[u8], partial: usize, written: usize) -> usize {
    if written < partial {
        return partial - written;
    }
    let mut at = partial;
    while at < written {
        let Some(len) = frame_len(&pending[at..]) else {
            return 0;
        };
        if at + len > written {
            return at + len - written;
        }
        at += len;
    }
    0
}

/// The length, header included, of the server frame at the start of `buf`.
fn frame_len(buf: &[u8]) -> Option<usize> {
    let short = *buf.get(1)? & 0x7f;
    let (header, payload) = match short {
        126 => (
            4,
            u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize,
        ),
        127 => (
            10,
            u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize,
        ),
        n => (2, n as usize),
    };
    Some(header + payload)
}

/// Why the connection is to close: its close code, message and metric label.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    pub code: u16,
    pub message: String,
    pub reason: &'static str,
}

#[derive(Default)]
struct State {
    pending: BytesMut,
    /// Bytes at the front of `pending` that finish a frame the socket took
    /// only part of: whatever else is dropped, these must still go out, or
    /// the client reads the next frame as their payload.
    partial: u32,
    frames: usize,
    /// The socket refused more bytes; the connection task writes when it can.
    blocked: bool,
    /// Already in some fan-out's list of connections to flush.
    flush_queued: bool,
    close: Option<CloseRequest>,
    /// Nothing more may be written (a close frame went out, or the socket failed).
    finished: bool,
}

pub struct Outbox {
    /// Weak: the connection task owns the socket, and a fan-out still
    /// holding this outbox must not keep a closed connection's socket open.
    stream: Weak<dyn Wire>,
    state: Mutex<State>,
    /// Wakes the connection task: a close was requested or the socket blocked.
    pub wake: Notify,
    max_frames: usize,
    metrics: Option<Arc<AppMetrics>>,
}

/// What queueing a frame asks of the caller.
#[derive(Debug, PartialEq, Eq)]
pub enum Queued {
    /// Queued; call `flush` (once, after queueing to everyone) to send it.
    NeedsFlush,
    /// Queued behind a flush that is already due.
    Pending,
    /// Not queued: the connection is closing.
    Dropped,
}

impl Outbox {
    pub fn new<W: Wire + 'static>(
        stream: &Arc<W>,
        max_frames: usize,
        metrics: Option<Arc<AppMetrics>>,
    ) -> Self {
        Self {
            stream: Arc::<W>::downgrade(stream),
            state: Mutex::new(State::default()),
            wake: Notify::new(),
            max_frames,
            metrics,
        }
    }

    /// Appends a text frame.
    pub fn queue(&self, text: &str) -> Queued {
        self.queue_frame(websocket::OP_TEXT, text.as_bytes())
    }

    pub fn queue_frame(&self, opcode: u8, payload: &[u8]) -> Queued {
        self.push(|out| websocket::encode(out, opcode, payload)).0
    }

    /// Appends bytes that are already a whole WebSocket frame (a fan-out
    /// encodes each event's frame once for all its recipients). Also returns
    /// how many frames now wait for this socket's next write.
    pub fn queue_framed(&self, framed: &[u8]) -> (Queued, usize) {
        self.push(|out| out.extend_from_slice(framed))
    }

    fn push(&self, append: impl FnOnce(&mut BytesMut)) -> (Queued, usize) {
        let mut state = self.state.lock();
        if state.close.is_some() || state.finished {
            return (Queued::Dropped, 0);
        }
        // Only frames held back by a full socket count: a fan-out may queue
        // many frames to a healthy client while it waits for its turn.
        if state.blocked && state.frames >= self.max_frames {
            let partial = state.partial as usize;
            state.pending.truncate(partial);
            state.close = Some(CloseRequest {
                code: code::OVER_CAPACITY,
                message: "Slow consumer: too many frames waiting to be sent".into(),
                reason: "slow_consumer",
            });
            drop(state);
            if let Some(m) = &self.metrics {
                m.slow_consumers.increment(1);
            }
            self.wake.notify_one();
            return (Queued::Dropped, 0);
        }
        append(&mut state.pending);
        state.frames += 1;
        let queued = if state.blocked || state.flush_queued {
            Queued::Pending
        } else {
            state.flush_queued = true;
            Queued::NeedsFlush
        };
        (queued, state.frames)
    }

    /// Queues and writes at once: replies to the connection's own requests.
    /// With nothing waiting, the frame is written straight from a per-thread
    /// scratch buffer, so a connection that only ever got its handshake and
    /// subscription replies holds no write buffer at all; only what the
    /// socket does not take is kept.
    pub fn send(&self, text: &str) {
        let mut state = self.state.lock();
        let direct = state.pending.is_empty()
            && !state.blocked
            && !state.flush_queued
            && !state.finished
            && state.close.is_none();
        if !direct {
            drop(state);
            if self.queue(text) == Queued::NeedsFlush {
                self.flush();
            }
            return;
        }
        SEND_SCRATCH.with(|scratch| {
            let mut frame = scratch.borrow_mut();
            frame.clear();
            websocket::encode(&mut frame, websocket::OP_TEXT, text.as_bytes());
            self.write_direct(&mut state, &frame);
            if frame.capacity() > KEEP_CAPACITY {
                *frame = BytesMut::new();
            }
        });
    }

    /// Writes `frame` with nothing queued before it; keeps the rest, as a
    /// queued frame, if the socket is full.
    fn write_direct(&self, state: &mut State, frame: &[u8]) {
        let Some(stream) = self.stream.upgrade() else {
            state.finished = true;
            return;
        };
        match write_nonblocking(&*stream, frame) {
            Wrote::All => {}
            Wrote::Blocked(n) => {
                state.pending.extend_from_slice(&frame[n..]);
                state.partial = if n == 0 { 0 } else { (frame.len() - n) as u32 };
                state.frames = 1;
                self.block(state);
            }
            Wrote::Eof(_) | Wrote::Failed => state.finished = true,
        }
    }

    /// The socket is full: the connection task finishes the write once it
    /// is writable.
    fn block(&self, state: &mut State) {
        state.blocked = true;
        self.wake.notify_one();
    }

    /// Writes what is pending without waiting. If the socket is full, the
    /// connection task is woken to finish when it becomes writable.
    pub fn flush(&self) {
        let mut state = self.state.lock();
        state.flush_queued = false;
        if state.blocked || state.finished {
            return;
        }
        self.write_locked(&mut state);
    }

    fn write_locked(&self, state: &mut State) {
        let Some(stream) = self.stream.upgrade() else {
            state.finished = true;
            return;
        };
        match write_nonblocking(&*stream, &state.pending) {
            Wrote::All => {
                state.pending.clear();
                state.partial = 0;
            }
            Wrote::Blocked(n) => {
                state.partial = unsent_of_frame(&state.pending, state.partial as usize, n) as u32;
                state.pending.advance(n);
                self.block(state);
                return;
            }
            Wrote::Eof(n) => {
                state.partial = unsent_of_frame(&state.pending, state.partial as usize, n) as u32;
                state.pending.advance(n);
                state.finished = true;
            }
            Wrote::Failed => {
                // The peer is gone; the reader will see it and clean up.
                state.finished = true;
                state.pending.clear();
                state.partial = 0;
            }
        }
        state.frames = 0;
        if state.pending.capacity() > KEEP_CAPACITY {
            state.pending = BytesMut::new();
        }
    }

    /// Whether the connection task should wait for the socket to be writable.
    pub fn is_blocked(&self) -> bool {
        self.state.lock().blocked
    }

    /// Called by the connection task once the socket is writable again.
    pub fn resume(&self) {
        let mut state = self.state.lock();
        state.blocked = false;
        if !state.finished {
            self.write_locked(&mut state);
        }
    }

    /// Asks the connection to close. The first request wins; returns whether
    /// this was it.
    pub fn close(&self, code: u16, message: &str, reason: &'static str) -> bool {
        let mut state = self.state.lock();
        if state.close.is_some() {
            return false;
        }
        state.close = Some(CloseRequest {
            code,
            message: message.to_owned(),
            reason,
        });
        drop(state);
        self.wake.notify_one();
        true
    }

    pub fn close_request(&self) -> Option<CloseRequest> {
        self.state.lock().close.clone()
    }

    /// The last frames: `pusher:error` (for Pusher codes) and the close frame,
    /// written past any close request. Nothing is sent after them.
    pub fn finish(&self, code: u16, message: &str) {
        let mut state = self.state.lock();
        if state.finished {
            return;
        }
        if code >= 4000 {
            let frame = crate::protocol::frame::Encode::error(Some(code), message);
            websocket::encode(
                &mut state.pending,
                websocket::OP_TEXT,
                frame.as_str().as_bytes(),
            );
        }
        websocket::encode_close(&mut state.pending, code, message);
        state.blocked = false;
        self.write_locked(&mut state);
        state.finished = true;
    }

    /// Bytes still waiting (for the final drain before closing).
    pub fn has_pending(&self) -> bool {
        !self.state.lock().pending.is_empty()
    }

    /// Writes what `finish` left behind, for a socket that was full.
    pub fn write_remaining(&self) {
        let mut state = self.state.lock();
        let finished = state.finished;
        state.finished = false;
        self.write_locked(&mut state);
        state.finished = finished || state.finished;
    }
}

/// A cheap handle to a connection: its id, its outbox and the fan-out
/// shard that owns its subscriptions.
#[derive(Clone)]
pub struct ConnHandle {
    pub socket_id: SocketId,
    pub outbox: Arc<Outbox>,
    pub shard: usize,
}

impl ConnHandle {
    /// Queues and writes a frame now.
    pub fn send(&self, text: &str) {
        self.outbox.send(text);
    }

    pub fn close(&self, code: u16, message: &str, reason: &'static str) -> bool {
        self.outbox.close(code, message, reason)
    }
}

/// A wire for tests: it records every byte it took, and can be told to take
/// only so many more bytes (then report `WouldBlock`) or to fail.
#[cfg(test)]
pub(crate) mod fake_wire {
    use std::io;
    use std::sync::Arc;

    use parking_lot::Mutex;
    use tokio_tungstenite::tungstenite::protocol::frame::FrameHeader;

    use super::Wire;

    #[derive(Default)]
    pub struct FakeWire {
        state: Mutex<State>,
    }

    #[derive(Default)]
    struct State {
        taken: Vec<u8>,
        /// `try_write` calls that took bytes.
        writes: usize,
        /// Bytes it takes before it is full; `None`: no limit.
        room: Option<usize>,
        failed: bool,
    }

    impl FakeWire {
        /// A wire that takes everything.
        pub fn open() -> Arc<Self> {
            Arc::new(Self::default())
        }

        /// A wire that takes `n` more bytes, then is full.
        pub fn with_room(n: usize) -> Arc<Self> {
            let wire = Self::open();
            wire.set_room(Some(n));
            wire
        }

        /// From now on it takes `room` more bytes (`None`: all of them).
        pub fn set_room(&self, room: Option<usize>) {
            self.state.lock().room = room;
        }

        /// From now on every write fails, as on a reset connection.
        pub fn fail(&self) {
            self.state.lock().failed = true;
        }

        pub fn taken(&self) -> Vec<u8> {
            self.state.lock().taken.clone()
        }

        pub fn writes(&self) -> usize {
            self.state.lock().writes
        }

        /// What it took, as the frames a client would read.
        pub fn frames(&self) -> Vec<(u8, Vec<u8>)> {
            decode(&self.taken())
        }

        /// The payloads of the text frames it took.
        pub fn texts(&self) -> Vec<String> {
            self.frames()
                .into_iter()
                .map(|(opcode, payload)| {
                    assert_eq!(opcode, crate::websocket::OP_TEXT, "a text frame");
                    String::from_utf8(payload).expect("UTF-8 text")
                })
                .collect()
        }
    }

    impl Wire for FakeWire {
        fn try_write(&self, buf: &[u8]) -> io::Result<usize> {
            let mut state = self.state.lock();
            if state.failed {
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            let n = state.room.map_or(buf.len(), |room| room.min(buf.len()));
            if n == 0 && !buf.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            if let Some(room) = &mut state.room {
                *room -= n;
            }
            state.taken.extend_from_slice(&buf[..n]);
            state.writes += 1;
            Ok(n)
        }
    }

    /// Splits server bytes into whole, final, unmasked frames (opcode and
    /// payload) with tungstenite's parser, so the check does not share code
    /// with the encoder. Panics on a cut-off frame or anything else.
    pub fn decode(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
        let mut cursor = io::Cursor::new(bytes);
        let mut frames = Vec::new();
        while (cursor.position() as usize) < bytes.len() {
            let (header, len) = FrameHeader::parse(&mut cursor)
                .expect("a valid frame header")
                .expect("a whole frame header");
            assert!(header.is_final, "an unfragmented frame");
            assert!(header.mask.is_none(), "server frames are not masked");
            assert!(
                !(header.rsv1 || header.rsv2 || header.rsv3),
                "no reserved bits"
            );
            let at = cursor.position() as usize;
            let end = at + len as usize;
            assert!(
                end <= bytes.len(),
                "a frame cut off after {} frames",
                frames.len()
            );
            frames.push((u8::from(header.opcode), bytes[at..end].to_vec()));
            cursor.set_position(end as u64);
        }
        frames
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::fake_wire::{decode, FakeWire};
    use super::*;
    use crate::websocket::{OP_BINARY, OP_CLOSE, OP_TEXT};

    fn text(s: &str) -> (u8, Vec<u8>) {
        (OP_TEXT, s.as_bytes().to_vec())
    }

    fn close_frame(code: u16, reason: &str) -> (u8, Vec<u8>) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        (OP_CLOSE, payload)
    }

    /// Whether the connection task was woken (a permit is waiting).
    fn woken(outbox: &Outbox) -> bool {
        outbox.wake.notified().now_or_never().is_some()
    }

    #[test]
    fn frames_queued_before_a_flush_go_out_in_one_write_in_order() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 8, None);
        // Payload lengths for each of the three header sizes.
        let long = "m".repeat(300);
        let huge = "h".repeat(70_000);
        let mut framed = BytesMut::new();
        websocket::encode(&mut framed, OP_TEXT, b"pre-encoded");

        assert_eq!(outbox.queue("first"), Queued::NeedsFlush);
        assert_eq!(
            outbox.queue(&long),
            Queued::Pending,
            "one flush is due already"
        );
        assert_eq!(outbox.queue_frame(OP_BINARY, b"\x00\x01"), Queued::Pending);
        assert_eq!(outbox.queue_framed(&framed), (Queued::Pending, 4));
        assert_eq!(outbox.queue(&huge), Queued::Pending);
        assert!(
            wire.taken().is_empty(),
            "nothing is written before the flush"
        );

        outbox.flush();
        assert_eq!(wire.writes(), 1);
        assert_eq!(
            wire.frames(),
            vec![
                text("first"),
                text(&long),
                (OP_BINARY, vec![0, 1]),
                text("pre-encoded"),
                text(&huge),
            ]
        );
        assert!(!outbox.has_pending());
        // The next frame needs a flush of its own.
        assert_eq!(outbox.queue("next"), Queued::NeedsFlush);
        outbox.flush();
        assert_eq!(wire.frames().last(), Some(&text("next")));
    }

    #[test]
    fn send_writes_at_once_but_stays_behind_frames_already_queued() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 8, None);
        outbox.send("hello");
        assert_eq!(wire.frames(), vec![text("hello")]);

        // A fan-out queued a frame and will flush it: a reply goes after it.
        assert_eq!(outbox.queue("event"), Queued::NeedsFlush);
        outbox.send("reply");
        outbox.flush();
        assert_eq!(
            wire.frames(),
            vec![text("hello"), text("event"), text("reply")]
        );
    }

    #[test]
    fn a_full_socket_keeps_the_rest_and_resume_sends_it_in_order() {
        let wire = FakeWire::with_room(10);
        let outbox = Outbox::new(&wire, 64, None);
        let sent: Vec<String> = (0..5).map(|i| format!("{{\"n\":{i}}}")).collect();
        outbox.queue(&sent[0]);
        outbox.queue(&sent[1]);
        outbox.queue(&sent[2]);
        outbox.flush();
        assert_eq!(
            wire.taken().len(),
            10,
            "the socket took what it had room for"
        );
        assert!(outbox.is_blocked() && outbox.has_pending());
        assert!(woken(&outbox), "the connection task waits for writable");

        // Meanwhile frames queue behind the rest, for the connection task.
        assert_eq!(outbox.queue(&sent[3]), Queued::Pending);

        // Writable, but only a little: still blocked, still in order.
        wire.set_room(Some(7));
        outbox.resume();
        assert_eq!(wire.taken().len(), 17);
        assert!(outbox.is_blocked());
        assert_eq!(outbox.queue(&sent[4]), Queued::Pending);

        wire.set_room(None);
        outbox.resume();
        assert!(!outbox.is_blocked() && !outbox.has_pending());
        assert_eq!(wire.texts(), sent, "nothing lost, nothing doubled");
        assert_eq!(outbox.queue("after"), Queued::NeedsFlush, "flushes resume");
    }

    #[test]
    fn a_reply_to_a_full_socket_is_finished_by_resume() {
        let wire = FakeWire::with_room(3);
        let outbox = Outbox::new(&wire, 8, None);
        outbox.send("{\"event\":\"pusher:pong\"}");
        assert!(outbox.is_blocked() && outbox.has_pending());
        assert_eq!(outbox.queue("event"), Queued::Pending);
        wire.set_room(None);
        outbox.resume();
        assert_eq!(
            wire.frames(),
            vec![text("{\"event\":\"pusher:pong\"}"), text("event")]
        );
    }

    #[test]
    fn a_healthy_client_may_get_more_than_max_frames_in_one_flush() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 3, None);
        for i in 0..10 {
            assert_ne!(outbox.queue(&i.to_string()), Queued::Dropped, "frame {i}");
        }
        outbox.flush();
        assert!(outbox.close_request().is_none());
        assert_eq!(wire.texts().len(), 10);
    }

    #[test]
    fn a_slow_consumer_is_closed_with_4100_and_its_backlog_dropped() {
        let wire = FakeWire::with_room(0);
        let outbox = Outbox::new(&wire, 3, None);
        assert_eq!(outbox.queue("0"), Queued::NeedsFlush);
        outbox.flush();
        assert!(outbox.is_blocked());
        assert!(woken(&outbox));
        assert_eq!(outbox.queue("1"), Queued::Pending);
        assert_eq!(outbox.queue("2"), Queued::Pending);
        assert!(
            outbox.close_request().is_none(),
            "three frames wait: the limit"
        );

        assert_eq!(outbox.queue("3"), Queued::Dropped);
        let close = outbox.close_request().expect("closed as a slow consumer");
        assert_eq!((close.code, close.reason), (4100, "slow_consumer"));
        assert!(!outbox.has_pending(), "its backlog is let go");
        assert!(woken(&outbox), "the connection task closes it");
        assert_eq!(outbox.queue("4"), Queued::Dropped);
        assert_eq!(outbox.queue_framed(b"\x81\x015"), (Queued::Dropped, 0));
        assert!(
            !outbox.close(4200, "later", "other"),
            "the first close wins"
        );

        // The connection task's last frames, once the client reads again.
        outbox.finish(close.code, &close.message);
        wire.set_room(None);
        outbox.write_remaining();
        let frames = wire.frames();
        assert_eq!(frames.len(), 2, "no dropped event reaches it: {frames:?}");
        let error: serde_json::Value = serde_json::from_slice(&frames[0].1).unwrap();
        assert_eq!(error["event"], "pusher:error");
        assert_eq!(error["data"]["code"], 4100);
        assert_eq!(frames[1], close_frame(4100, &close.message));
    }

    #[test]
    fn finish_sends_the_last_frames_past_a_full_socket_and_nothing_after() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 8, None);
        outbox.send("established");
        wire.set_room(Some(4));
        outbox.finish(1000, "bye");
        assert!(
            outbox.has_pending(),
            "the socket took only part of the close"
        );
        assert_eq!(outbox.queue("late"), Queued::Dropped);
        outbox.send("late reply");
        wire.set_room(None);
        outbox.write_remaining();
        assert!(!outbox.has_pending());
        // A WebSocket code, not a Pusher one: no pusher:error before it.
        assert_eq!(
            wire.frames(),
            vec![text("established"), close_frame(1000, "bye")]
        );
        outbox.finish(1000, "again");
        outbox.write_remaining();
        assert_eq!(wire.frames().len(), 2, "one close frame only");
    }

    #[test]
    fn a_failed_write_finishes_the_outbox() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 8, None);
        outbox.send("established");
        wire.fail();
        assert_eq!(outbox.queue("event"), Queued::NeedsFlush);
        outbox.flush();
        assert!(!outbox.has_pending(), "what could not be sent is let go");
        assert!(!outbox.is_blocked(), "nobody waits for a dead socket");
        assert_eq!(outbox.queue("more"), Queued::Dropped);
        outbox.send("reply");
        outbox.finish(4200, "closing");
        assert!(!outbox.has_pending(), "no close frame for a dead socket");
        // The reader sees the failure and closes; no close was requested here.
        assert!(outbox.close_request().is_none());
        assert_eq!(wire.frames(), vec![text("established")]);
    }

    #[test]
    fn a_socket_already_dropped_is_not_written_and_does_not_panic() {
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 1, None);
        assert_eq!(outbox.queue("event"), Queued::NeedsFlush);
        drop(wire);
        outbox.flush();
        assert_eq!(outbox.queue("more"), Queued::Dropped);
        outbox.send("reply");
        outbox.resume();
        outbox.finish(4100, "gone");
        outbox.write_remaining();
        assert!(!outbox.is_blocked());

        // A reply straight to a dropped socket.
        let wire = FakeWire::open();
        let outbox = Outbox::new(&wire, 1, None);
        drop(wire);
        outbox.send("reply");
        assert_eq!(outbox.queue("event"), Queued::Dropped);
    }

    #[test]
    fn a_slow_consumer_blocked_inside_a_frame_still_gets_a_readable_close() {
        // The socket took part of a frame when it filled up. Letting the
        // backlog go must keep the rest of that frame, or the error and
        // close frames are read as its payload and the client never sees
        // 4100.
        let wire = FakeWire::with_room(3);
        let outbox = Outbox::new(&wire, 2, None);
        let first = "a frame longer than what the socket took";
        outbox.queue(first);
        outbox.flush();
        outbox.queue("1");
        outbox.queue("2");
        assert_eq!(outbox.queue("3"), Queued::Dropped);
        let close = outbox.close_request().expect("closed as a slow consumer");
        outbox.finish(close.code, &close.message);
        wire.set_room(None);
        outbox.write_remaining();
        let frames = wire.frames();
        assert_eq!(frames.first(), Some(&text(first)));
        assert_eq!(frames.last(), Some(&close_frame(4100, &close.message)));
    }

    #[test]
    fn a_slow_consumer_blocked_inside_a_later_long_frame_gets_that_frame_whole() {
        // Blocked inside the second of three queued frames, whose length
        // needs the 16-bit header: the walk over the frames must find where
        // it ends, across two partial writes.
        let long = "x".repeat(300);
        let first = "first";
        let wire = FakeWire::with_room(2 + first.len() + 6);
        let outbox = Outbox::new(&wire, 2, None);
        outbox.queue(first);
        outbox.queue(&long);
        outbox.queue("third");
        outbox.flush();
        assert!(outbox.is_blocked());
        wire.set_room(Some(100));
        outbox.resume();
        assert!(outbox.is_blocked(), "still inside the long frame");
        outbox.queue("4");
        outbox.queue("5");
        assert_eq!(outbox.queue("6"), Queued::Dropped);
        let close = outbox.close_request().expect("closed as a slow consumer");
        outbox.finish(close.code, &close.message);
        wire.set_room(None);
        outbox.write_remaining();
        let frames = wire.frames();
        assert_eq!(frames[0], text(first));
        assert_eq!(frames[1], text(&long));
        assert_eq!(
            frames.len(),
            4,
            "the long frame, then the error and the close: {frames:?}"
        );
        assert_eq!(frames[3], close_frame(4100, &close.message));
    }

    #[test]
    fn the_fake_wire_decodes_what_the_encoder_writes() {
        // The check the tests above rely on: a cut-off frame is caught.
        let mut bytes = BytesMut::new();
        websocket::encode(&mut bytes, OP_TEXT, b"abc");
        assert_eq!(decode(&bytes), vec![text("abc")]);
        let cut = std::panic::catch_unwind(|| decode(&bytes[..bytes.len() - 1]));
        assert!(cut.is_err());
    }
}
