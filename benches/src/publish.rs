//! Getting benchmark events into the server at a steady rate.
//!
//! `Publisher` is the way in: either the signed HTTP API
//! (`POST /apps/{id}/events`) over a few keep-alive connections with a
//! hand-written HTTP/1.1 client, or the cluster bus itself, writing envelopes
//! straight into Redis with `belfry_coordinator::Publisher` (what a backend
//! service publishing without a node in between does; see
//! `docs/wire-format.md`). Each variant has "lanes": independent requests in
//! flight, one at a time per lane, so a slow answer does not stall the
//! schedule. HTTP lanes are connections; Redis lanes share one multiplexed
//! client and only bound how many publishes wait for their reply.
//!
//! `run_paced` is the schedule: event k is due at `start + k / rate` and
//! carries that *scheduled* time as `t`, so time an event spends waiting for
//! a free lane (the server being slow to answer) counts as latency instead of
//! silently lowering the rate (no coordinated omission).

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::{Buf, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::pusher::{self, App};
use crate::stats::new_histogram;
use crate::ws::{self, Endpoint};

/// Largest API response accepted (the events endpoint answers `{}`).
const MAX_RESPONSE: usize = 1024 * 1024;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Where events go in.
pub enum Publisher {
    Http(HttpApi),
    Redis(RedisBus),
}

/// One connection of a publisher, used by one request at a time.
pub enum Lane {
    Http(Option<HttpConn>),
    /// Redis lanes share the client; a lane is only a slot for one publish.
    Redis,
}

impl Publisher {
    pub fn new_lane(&self) -> Lane {
        match self {
            Publisher::Http(_) => Lane::Http(None),
            Publisher::Redis(_) => Lane::Redis,
        }
    }

    /// Publishes one benchmark event (`data` is the event's data string,
    /// as clients receive it); `Err` carries a short reason.
    pub async fn send(&self, lane: &mut Lane, channel: &str, data: String) -> Result<(), String> {
        match (self, lane) {
            (Publisher::Http(api), Lane::Http(conn)) => {
                let body = pusher::event_body(channel, &data);
                api.trigger(conn, body.as_bytes()).await
            }
            (Publisher::Redis(bus), Lane::Redis) => bus.publish(channel, data).await,
            _ => Err("lane of another publisher".into()),
        }
    }
}

/// The cluster bus: envelopes PUBLISHed into Redis, the way
/// `belfry_coordinator::Publisher` does for any Rust service.
pub struct RedisBus {
    publisher: belfry_coordinator::Publisher,
    app_id: String,
}

/// How long `RedisBus::connect` waits for Redis to answer.
const REDIS_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

impl RedisBus {
    /// Connects to `url` (`redis://` or `redis-cluster://`); keys and
    /// channels under `prefix`, as the nodes' `redis_prefix`.
    pub async fn connect(url: &str, prefix: &str, app_id: &str) -> anyhow::Result<Self> {
        let redis = belfry_coordinator::redis::Redis::connect(url)
            .map_err(|e| anyhow::anyhow!("redis {url}: {e}"))?;
        anyhow::ensure!(
            redis.wait_connected(REDIS_CONNECT_TIMEOUT).await,
            "redis {url}: not connected within {REDIS_CONNECT_TIMEOUT:?}"
        );
        let keys = belfry_coordinator::keys::Keys::new(prefix);
        Ok(RedisBus {
            publisher: belfry_coordinator::Publisher::new(redis, keys),
            app_id: app_id.to_owned(),
        })
    }

    async fn publish(&self, channel: &str, data: String) -> Result<(), String> {
        self.publisher
            .publish(&self.app_id, channel, pusher::BENCH_EVENT, data, None)
            .await
            .map_err(|e| format!("redis: {e}"))
    }
}

/// The signed Pusher HTTP API of one server.
pub struct HttpApi {
    endpoint: Endpoint,
    app: App,
}

/// A keep-alive HTTP/1.1 connection.
pub struct HttpConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl HttpApi {
    pub fn new(endpoint: Endpoint, app: App) -> Self {
        HttpApi { endpoint, app }
    }

    /// `POST /apps/{id}/events`; reconnects a dropped connection first.
    pub async fn trigger(&self, conn: &mut Option<HttpConn>, body: &[u8]) -> Result<(), String> {
        let path = format!("/apps/{}/events", self.app.id);
        let timestamp = pusher::unix_nanos() / 1_000_000_000;
        let query = self.app.signed_query("POST", &path, body, timestamp);
        let mut request = format!(
            "POST {}{path}?{query} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n",
            self.endpoint.prefix,
            self.endpoint.host_header,
            body.len()
        )
        .into_bytes();
        request.extend_from_slice(body);

        // A kept-alive connection the server closed while it sat idle (the
        // node closes idle ones after `header_timeout_secs`) fails before any
        // response byte: the request was never read, so it is sent once more
        // on a fresh connection, as curl does.
        let mut fresh = conn.is_none();
        let (status, keep_alive, response) = loop {
            if conn.is_none() {
                let stream = ws::tcp_connect(self.endpoint.addr, None)
                    .await
                    .map_err(|e| format!("api connect: {e}"))?;
                *conn = Some(HttpConn {
                    stream,
                    buf: BytesMut::with_capacity(1024),
                });
            }
            let Some(c) = conn.as_mut() else {
                unreachable!("connection was just opened")
            };
            let result = tokio::time::timeout(REQUEST_TIMEOUT, c.round_trip(&request)).await;
            match result {
                Ok(Ok(r)) => break r,
                Ok(Err(e))
                    if !fresh
                        && e.kind() == std::io::ErrorKind::UnexpectedEof
                        && c.buf.is_empty() =>
                {
                    *conn = None;
                    fresh = true;
                }
                Ok(Err(e)) => {
                    *conn = None;
                    return Err(format!("api: {e}"));
                }
                Err(_) => {
                    *conn = None;
                    return Err("api: request timed out".into());
                }
            }
        };
        if !keep_alive {
            *conn = None;
        }
        if (200..300).contains(&status) {
            Ok(())
        } else {
            let text = String::from_utf8_lossy(&response[..response.len().min(200)]);
            Err(format!("api status {status}: {text}"))
        }
    }
}

impl HttpConn {
    /// Writes a request and reads one response: (status, keep-alive, body).
    async fn round_trip(&mut self, request: &[u8]) -> std::io::Result<(u16, bool, Vec<u8>)> {
        self.stream.write_all(request).await?;
        let head_end = loop {
            if let Some(end) = ws::find(&self.buf, b"\r\n\r\n") {
                break end;
            }
            self.fill().await?;
        };
        let head = Head::parse(&self.buf[..head_end])?;
        self.buf.advance(head_end + 4);
        let body = if head.chunked {
            self.read_chunked().await?
        } else {
            let len = head.content_length.unwrap_or(0);
            if len > MAX_RESPONSE {
                return Err(std::io::Error::other("response too large"));
            }
            while self.buf.len() < len {
                self.fill().await?;
            }
            self.buf.split_to(len).to_vec()
        };
        Ok((head.status, head.keep_alive, body))
    }

    async fn fill(&mut self) -> std::io::Result<()> {
        if self.buf.len() > MAX_RESPONSE {
            return Err(std::io::Error::other("response too large"));
        }
        self.buf.reserve(4096);
        if self.stream.read_buf(&mut self.buf).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    async fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        // Bounded: each chunk consumes input and the total is capped.
        loop {
            let line_end = loop {
                if let Some(end) = ws::find(&self.buf, b"\r\n") {
                    break end;
                }
                self.fill().await?;
            };
            let size_text = std::str::from_utf8(&self.buf[..line_end]).unwrap_or("");
            let size_hex = size_text.split(';').next().unwrap_or("").trim();
            let size = usize::from_str_radix(size_hex, 16)
                .map_err(|_| std::io::Error::other("bad chunk size"))?;
            self.buf.advance(line_end + 2);
            if size == 0 {
                // Trailers are not expected; consume the final CRLF.
                while self.buf.len() < 2 {
                    self.fill().await?;
                }
                self.buf.advance(2);
                return Ok(body);
            }
            if body.len() + size > MAX_RESPONSE {
                return Err(std::io::Error::other("response too large"));
            }
            while self.buf.len() < size + 2 {
                self.fill().await?;
            }
            body.extend_from_slice(&self.buf[..size]);
            self.buf.advance(size + 2);
        }
    }
}

/// The parts of a response head the client needs.
#[derive(Debug, PartialEq)]
struct Head {
    status: u16,
    content_length: Option<usize>,
    chunked: bool,
    keep_alive: bool,
}

impl Head {
    fn parse(head: &[u8]) -> std::io::Result<Head> {
        let text = std::str::from_utf8(head).map_err(|_| std::io::Error::other("bad response"))?;
        let mut lines = text.split("\r\n");
        let status_line = lines.next().unwrap_or("");
        let mut parts = status_line.split(' ');
        let version = parts.next().unwrap_or("");
        let status = parts
            .next()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line: {status_line}")))?;
        let mut parsed = Head {
            status,
            content_length: None,
            chunked: false,
            keep_alive: version == "HTTP/1.1",
        };
        for line in lines {
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                parsed.content_length = value.parse().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                parsed.chunked = value.eq_ignore_ascii_case("chunked");
            } else if name.eq_ignore_ascii_case("connection") {
                parsed.keep_alive = !value.eq_ignore_ascii_case("close");
            }
        }
        Ok(parsed)
    }
}

/// What a paced publishing run did.
#[derive(Debug, Clone)]
pub struct PublishStats {
    pub attempted: u64,
    pub accepted: u64,
    pub failed: u64,
    /// Accepted events per channel index (expected deliveries follow from it).
    pub accepted_per_channel: Vec<u64>,
    /// Round trip of accepted requests, microseconds.
    pub request_latency: Histogram<u64>,
    /// How far behind schedule a request was sent at worst.
    pub max_lag: Duration,
    pub errors: Vec<String>,
}

impl PublishStats {
    pub fn new(channels: usize) -> Self {
        PublishStats {
            attempted: 0,
            accepted: 0,
            failed: 0,
            accepted_per_channel: vec![0; channels],
            request_latency: new_histogram(),
            max_lag: Duration::ZERO,
            errors: Vec::new(),
        }
    }
}

/// Chooses the channel of event number k.
pub enum ChannelChoice {
    /// Every event to channel 0.
    Single,
    /// A uniformly random channel out of `n`.
    Random { n: usize, state: u64 },
}

impl ChannelChoice {
    fn next(&mut self) -> usize {
        match self {
            ChannelChoice::Single => 0,
            ChannelChoice::Random { n, state } => {
                *state ^= *state << 13;
                *state ^= *state >> 7;
                *state ^= *state << 17;
                (*state % (*n).max(1) as u64) as usize
            }
        }
    }
}

/// Publishing state that outlives one paced run (ramp steps share it):
/// the next sequence number per channel and the idle lanes.
pub struct Pacer {
    publisher: Rc<Publisher>,
    channel_names: Rc<Vec<String>>,
    next_seq: Vec<u64>,
    idle: Rc<RefCell<Vec<Lane>>>,
    lanes: usize,
    max_lanes: usize,
    returned: Rc<Notify>,
    pad: String,
}

impl Pacer {
    pub fn new(
        publisher: Publisher,
        channel_names: Vec<String>,
        max_lanes: usize,
        payload_bytes: usize,
    ) -> Self {
        // `{"seq":..,"t":..}` is about 45 bytes; pad up to the requested size.
        let pad = "x".repeat(payload_bytes.saturating_sub(45));
        Pacer {
            publisher: Rc::new(publisher),
            next_seq: vec![0; channel_names.len()],
            channel_names: Rc::new(channel_names),
            idle: Rc::new(RefCell::new(Vec::new())),
            lanes: 0,
            max_lanes: max_lanes.max(1),
            returned: Rc::new(Notify::new()),
            pad,
        }
    }

    /// Publishes `rate` events per second for `duration` and waits for the
    /// answers. Must run inside a `LocalSet`. `stats` is shared so a progress
    /// display can read it meanwhile.
    pub async fn run(
        &mut self,
        rate: f64,
        duration: Duration,
        choice: &mut ChannelChoice,
        stats: &Rc<RefCell<PublishStats>>,
    ) {
        let rate = rate.max(0.001);
        let total = (rate * duration.as_secs_f64()).ceil() as u64;
        let interval = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        let start_ns = pusher::unix_nanos();
        let hard_end = start + duration + Duration::from_secs(60);
        for k in 0..total {
            let due = start + interval.mul_f64(k as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            // The send time is when the pacer releases the event: the timer
            // wakes up to a millisecond late, which is the generator's, not
            // the server's. Waiting for a free API connection (a slow server)
            // still counts, since it comes after this stamp.
            let released = Instant::now().max(due);
            let Some(mut lane) = self.take_lane(hard_end).await else {
                break;
            };
            let now = Instant::now();
            {
                let mut s = stats.borrow_mut();
                s.max_lag = s.max_lag.max(now.saturating_duration_since(due));
                s.attempted += 1;
            }
            let channel = choice.next();
            let seq = self.next_seq[channel];
            self.next_seq[channel] += 1;
            let t = start_ns + released.duration_since(start).as_nanos() as u64;
            let data = pusher::event_data(seq, t, &self.pad);
            let names = self.channel_names.clone();
            let publisher = self.publisher.clone();
            let idle = self.idle.clone();
            let returned = self.returned.clone();
            let stats = stats.clone();
            tokio::task::spawn_local(async move {
                let sent = Instant::now();
                let result = publisher.send(&mut lane, &names[channel], data).await;
                {
                    let mut s = stats.borrow_mut();
                    match result {
                        Ok(()) => {
                            s.accepted += 1;
                            s.accepted_per_channel[channel] += 1;
                            let us = sent.elapsed().as_micros() as u64;
                            s.request_latency.saturating_record(us.max(1));
                        }
                        Err(e) => {
                            s.failed += 1;
                            if s.errors.len() < 8 && !s.errors.contains(&e) {
                                s.errors.push(e);
                            }
                        }
                    }
                }
                idle.borrow_mut().push(lane);
                returned.notify_one();
            });
        }
        // Wait for the answers of requests still in flight.
        while self.idle.borrow().len() < self.lanes && Instant::now() < hard_end {
            let wait = hard_end.saturating_duration_since(Instant::now());
            let _ = tokio::time::timeout(wait, self.returned.notified()).await;
        }
    }

    async fn take_lane(&mut self, deadline: Instant) -> Option<Lane> {
        loop {
            if let Some(lane) = self.idle.borrow_mut().pop() {
                return Some(lane);
            }
            if self.lanes < self.max_lanes {
                self.lanes += 1;
                return Some(self.publisher.new_lane());
            }
            let wait = deadline.checked_duration_since(Instant::now())?;
            let _ = tokio::time::timeout(wait, self.returned.notified()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_response_heads() {
        let h =
            Head::parse(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json")
                .unwrap();
        assert_eq!(
            h,
            Head {
                status: 200,
                content_length: Some(2),
                chunked: false,
                keep_alive: true
            }
        );
        let h = Head::parse(
            b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\nConnection: close",
        )
        .unwrap();
        assert!(h.chunked && !h.keep_alive && h.status == 401);
        assert!(Head::parse(b"garbage").is_err());
    }

    #[test]
    fn random_choice_stays_in_range_and_spreads() {
        let mut c = ChannelChoice::Random { n: 10, state: 42 };
        let mut seen = [0u32; 10];
        for _ in 0..10_000 {
            seen[c.next()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    /// A tiny HTTP server on loopback that checks the signature shape and
    /// answers with chunked and content-length bodies alternately.
    #[tokio::test]
    async fn http_api_round_trips_over_keep_alive() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut served = 0;
            let mut tmp = [0u8; 4096];
            while served < 3 {
                let n = s.read(&mut tmp).await.unwrap();
                assert!(n > 0);
                buf.extend_from_slice(&tmp[..n]);
                while let Some(end) = ws::find(&buf, b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .unwrap()
                        .parse()
                        .unwrap();
                    if buf.len() < end + 4 + len {
                        break;
                    }
                    assert!(head.starts_with("POST /apps/app/events?auth_key=key&auth_timestamp="));
                    assert!(head.contains("&auth_signature="));
                    buf.drain(..end + 4 + len);
                    let answer: &[u8] = if served % 2 == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
                    } else {
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                    };
                    s.write_all(answer).await.unwrap();
                    served += 1;
                }
            }
        });
        let api = HttpApi::new(
            Endpoint::parse(&format!("http://127.0.0.1:{port}")).unwrap(),
            App {
                id: "app".into(),
                key: "key".into(),
                secret: "secret".into(),
            },
        );
        let mut conn = None;
        for seq in 0..3 {
            let body = pusher::event_body("c", &pusher::event_data(seq, 1, ""));
            api.trigger(&mut conn, body.as_bytes()).await.unwrap();
            assert!(conn.is_some(), "kept alive");
        }
        server.await.unwrap();
    }
}
