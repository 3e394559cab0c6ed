//! A connection's outgoing side: the bytes waiting to be written, and the
//! handle through which the rest of the node reaches the connection.
//!
//! Frames are appended (as WebSocket frames) to one buffer per connection
//! and written with as few syscalls as the socket allows: whoever queued
//! them flushes, a fan-out flushes each recipient once per batch of events,
//! and when the socket is full the connection's own task finishes the write
//! once it is writable again. A client that lets too many frames pile up is
//! a slow consumer: it is closed with 4100, never buffered without bound.

use std::io;
use std::sync::{Arc, Weak};

use crate::tls::Socket;
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
fn write_nonblocking(stream: &Socket, buf: &[u8]) -> Wrote {
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
    stream: Weak<Socket>,
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
    pub fn new(stream: &Arc<Socket>, max_frames: usize, metrics: Option<Arc<AppMetrics>>) -> Self {
        Self {
            stream: Arc::downgrade(stream),
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
            state.pending.clear();
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
        match write_nonblocking(&stream, frame) {
            Wrote::All => {}
            Wrote::Blocked(n) => {
                state.pending.extend_from_slice(&frame[n..]);
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
        match write_nonblocking(&stream, &state.pending) {
            Wrote::All => state.pending.clear(),
            Wrote::Blocked(n) => {
                state.pending.advance(n);
                self.block(state);
                return;
            }
            Wrote::Eof(n) => {
                state.pending.advance(n);
                state.finished = true;
            }
            Wrote::Failed => {
                // The peer is gone; the reader will see it and clean up.
                state.finished = true;
                state.pending.clear();
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
