//! `micro`: nanosecond-scale benchmarks of Belfry's hot paths, calling the
//! node's and the coordinator's own code in-process (no sockets to a server):
//! encoding an event frame and its WebSocket header, checking an HTTP API
//! signature, queueing one frame to N local subscribers through the
//! registry, writing those queued frames to a loopback socket, and the bus
//! envelope's MessagePack encode and decode.
//!
//! Every benchmark is warmed up, its iteration count calibrated to a target
//! run time, then run several times; the result is the median ns per
//! operation with the fastest and slowest run beside it. `--quick` shrinks
//! everything so CI can exercise the code in well under three seconds.

use std::hint::black_box;
use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::Envelope;
use belfry_node::config::AppConfig;
use belfry_node::outbox::{ConnHandle, Outbox};
use belfry_node::protocol::frame::Encode;
use belfry_node::protocol::SocketId;
use belfry_node::registry::{AppRegistry, Registry};
use bytes::BytesMut;
use serde::Serialize;

use crate::pusher::{self, App};

/// What to run and for how long.
#[derive(Debug, Clone)]
pub struct MicroPlan {
    pub quick: bool,
    /// Measured runs per benchmark (the median is reported).
    pub runs: usize,
    /// Target length of one run.
    pub run_time: Duration,
    /// Subscriber counts for the fan-out benchmarks.
    pub recipients: Vec<usize>,
    /// Fan-out rounds per run (each builds on freshly drained outboxes).
    pub fanout_rounds: usize,
}

impl MicroPlan {
    pub fn new(quick: bool, runs: Option<usize>, recipients: Option<Vec<usize>>) -> Self {
        MicroPlan {
            quick,
            runs: runs.unwrap_or(if quick { 3 } else { 7 }).max(1),
            run_time: Duration::from_millis(if quick { 15 } else { 200 }),
            recipients: recipients.unwrap_or_else(|| {
                if quick {
                    vec![1_000]
                } else {
                    vec![1_000, 10_000]
                }
            }),
            fanout_rounds: if quick { 3 } else { 20 },
        }
    }
}

/// One benchmark's result.
#[derive(Debug, Clone, Serialize)]
pub struct MicroResult {
    pub name: String,
    /// What one operation is.
    pub op: String,
    pub ns_per_op: f64,
    pub min_ns: f64,
    pub max_ns: f64,
    pub runs: usize,
    pub ops_per_run: u64,
    /// Anything that qualifies the number (e.g. writes that found the socket full).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct MicroReport {
    pub quick: bool,
    pub runs: usize,
    pub run_ms: f64,
    pub results: Vec<MicroResult>,
}

/// Median, min and max of per-run ns/op figures.
fn summarize(mut per_run: Vec<f64>) -> (f64, f64, f64) {
    per_run.sort_by(|a, b| a.total_cmp(b));
    let n = per_run.len();
    let median = if n % 2 == 1 {
        per_run[n / 2]
    } else {
        (per_run[n / 2 - 1] + per_run[n / 2]) / 2.0
    };
    (median, per_run[0], per_run[n - 1])
}

/// Times a closure that runs `iters` operations and returns how long they
/// took (so it can keep its own setup out of the clock): warm-up and
/// calibration first, then `plan.runs` runs of about `plan.run_time`.
fn bench(
    plan: &MicroPlan,
    name: &str,
    op: &str,
    mut f: impl FnMut(u64) -> Duration,
) -> MicroResult {
    // Warm-up doubles as calibration: grow the batch until it takes a
    // tenth of a run, then keep running for one run's time.
    let mut iters = 1u64;
    let warm_start = Instant::now();
    let per_op = loop {
        let took = f(iters);
        if took >= plan.run_time / 10 || iters >= 1 << 30 {
            break took.as_secs_f64() / iters as f64;
        }
        iters *= 2;
    };
    while warm_start.elapsed() < plan.run_time {
        f(iters);
    }
    let ops = ((plan.run_time.as_secs_f64() / per_op.max(1e-12)) as u64).max(1);
    let per_run: Vec<f64> = (0..plan.runs)
        .map(|_| f(ops).as_nanos() as f64 / ops as f64)
        .collect();
    let (median, min, max) = summarize(per_run);
    MicroResult {
        name: name.into(),
        op: op.into(),
        ns_per_op: median,
        min_ns: min,
        max_ns: max,
        runs: plan.runs,
        ops_per_run: ops,
        note: None,
    }
}

/// A data string of `len` bytes shaped like the generator's events.
fn sample_data(len: usize) -> String {
    let head = format!(
        r#"{{"seq":123456,"t":{},"pad":""#,
        1_764_270_000_000_000_000u64
    );
    let pad = "x".repeat(len.saturating_sub(head.len() + 2));
    format!("{head}{pad}\"}}")
}

pub async fn run(plan: MicroPlan) -> anyhow::Result<MicroReport> {
    let mut results = Vec::new();
    let data = sample_data(100);
    let channel = "bench-fanout";

    // (a) Frame encoding.
    results.push(bench(
        &plan,
        "frame_encode_event",
        "Encode::event for a 100-byte data string",
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(Encode::event(
                    black_box("bench-event"),
                    Some(black_box(channel)),
                    black_box(&data),
                ));
            }
            start.elapsed()
        },
    ));
    let frame = Encode::event("bench-event", Some(channel), &data);
    let mut buf = BytesMut::with_capacity(1024);
    results.push(bench(
        &plan,
        "websocket_encode",
        &format!(
            "websocket::encode of that {}-byte frame into a reused BytesMut",
            frame.len()
        ),
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                buf.clear();
                belfry_node::websocket::encode(
                    &mut buf,
                    belfry_node::websocket::OP_TEXT,
                    black_box(frame.as_bytes()),
                );
                black_box(&buf);
            }
            start.elapsed()
        },
    ));

    // (b) HTTP API signature, signed the way the server SDKs sign.
    results.extend(signature_benches(&plan));

    // (c) Local fan-out through the registry, and the writes that follow.
    for &n in &plan.recipients {
        results.extend(fanout_benches(&plan, n, &data).await?);
    }

    // (d) The bus envelope.
    let envelope = Envelope::event("belfry", channel, pusher::BENCH_EVENT, data.clone());
    let bytes = envelope.encode();
    results.push(bench(
        &plan,
        "envelope_encode",
        &format!(
            "Envelope::encode, 100-byte data ({} bytes of MessagePack)",
            bytes.len()
        ),
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                black_box(black_box(&envelope).encode());
            }
            start.elapsed()
        },
    ));
    results.push(bench(
        &plan,
        "envelope_decode",
        "Envelope::decode of the same bytes",
        |n| {
            let start = Instant::now();
            for _ in 0..n {
                let _ = black_box(Envelope::decode(black_box(&bytes)));
            }
            start.elapsed()
        },
    ));

    Ok(MicroReport {
        quick: plan.quick,
        runs: plan.runs,
        run_ms: plan.run_time.as_secs_f64() * 1e3,
        results,
    })
}

fn signature_benches(plan: &MicroPlan) -> Vec<MicroResult> {
    let app = App {
        id: "belfry".into(),
        key: "belfry-key".into(),
        secret: "belfry-secret".into(),
    };
    let config = AppConfig {
        id: app.id.clone(),
        key: app.key.clone(),
        secret: app.secret.clone(),
        ..AppConfig::default()
    };
    let body = pusher::event_body("bench-fanout", &sample_data(145));
    let path = format!("/apps/{}/events", app.id);
    let now = (pusher::unix_nanos() / 1_000_000_000) as i64;
    let query = app.signed_query("POST", &path, body.as_bytes(), now as u64);
    let params = belfry_node::api::signature::query_pairs(&query);
    let check =
        belfry_node::api::signature::verify(&config, "POST", &path, &params, body.as_bytes(), now);
    let note = match check {
        Ok(()) => None,
        Err(e) => Some(format!("the signature was REJECTED: {e}")),
    };
    let mut out = vec![
        bench(
            plan,
            "signature_verify",
            &format!(
                "api::signature::verify of a signed POST /events, {}-byte body (md5 + HMAC-SHA256)",
                body.len()
            ),
            |n| {
                let start = Instant::now();
                for _ in 0..n {
                    let _ = black_box(belfry_node::api::signature::verify(
                        &config,
                        "POST",
                        &path,
                        black_box(&params),
                        black_box(body.as_bytes()),
                        now,
                    ));
                }
                start.elapsed()
            },
        ),
        bench(
            plan,
            "signature_query_and_verify",
            "query_pairs of the query string + verify, as the API handler does",
            |n| {
                let start = Instant::now();
                for _ in 0..n {
                    let params = belfry_node::api::signature::query_pairs(black_box(&query));
                    let _ = black_box(belfry_node::api::signature::verify(
                        &config,
                        "POST",
                        &path,
                        &params,
                        black_box(body.as_bytes()),
                        now,
                    ));
                }
                start.elapsed()
            },
        ),
    ];
    for r in &mut out {
        r.note = note.clone();
    }
    out
}

/// One loopback connection standing in for every subscriber's socket: the
/// outboxes queue into their own buffers and write to this stream, and a
/// thread reads and discards what arrives at the other end.
struct Loopback {
    stream: Arc<belfry_node::tls::Socket>,
    reader: Option<std::thread::JoinHandle<u64>>,
}

impl Loopback {
    async fn open() -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let ours = std::net::TcpStream::connect(listener.local_addr()?)?;
        let (mut theirs, _) = listener.accept()?;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; 256 * 1024];
            let mut total = 0u64;
            while let Ok(n) = theirs.read(&mut buf) {
                if n == 0 {
                    break;
                }
                total += n as u64;
            }
            total
        });
        ours.set_nodelay(true)?;
        ours.set_nonblocking(true)?;
        let stream = Arc::new(belfry_node::tls::Socket::Plain(
            tokio::net::TcpStream::from_std(ours)?,
        ));
        // Learn that the socket is writable, as a served connection has.
        stream.writable().await?;
        Ok(Loopback {
            stream,
            reader: Some(reader),
        })
    }

    /// Waits until no outbox is blocked on the full socket, resuming them.
    async fn unblock(&self, handles: &[ConnHandle]) -> anyhow::Result<usize> {
        let mut resumed = 0;
        let end = Instant::now() + Duration::from_secs(30);
        loop {
            let blocked: Vec<&ConnHandle> =
                handles.iter().filter(|h| h.outbox.is_blocked()).collect();
            if blocked.is_empty() {
                return Ok(resumed);
            }
            anyhow::ensure!(Instant::now() < end, "loopback socket stayed full");
            let _ = tokio::time::timeout(Duration::from_millis(100), self.stream.writable()).await;
            for h in blocked {
                h.outbox.resume();
                resumed += 1;
            }
        }
    }
}

impl Drop for Loopback {
    fn drop(&mut self) {
        // The reader ends when our side closes, which needs every outbox's
        // weak reference gone too; just detach it.
        let _ = self.reader.take();
    }
}

/// Fan-out to `n` subscribers of one channel, in three parts:
/// queueing into drained outboxes (each recipient then also goes into the
/// flush list), queueing behind a flush already due (the coalescing path
/// under load), and the flush itself (one `try_write` per recipient).
async fn fanout_benches(
    plan: &MicroPlan,
    n: usize,
    data: &str,
) -> anyhow::Result<Vec<MicroResult>> {
    let apps = [AppConfig {
        id: "belfry".into(),
        key: "belfry-key".into(),
        secret: "belfry-secret".into(),
        ..AppConfig::default()
    }];
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = tokio_util::sync::CancellationToken::new();
    let registry = Registry::new(&apps, 1, &tasks, &stop);
    let Some(app) = registry.by_id("belfry").cloned() else {
        anyhow::bail!("registry lost its app");
    };
    let loopback = Loopback::open().await?;
    let channel = format!("bench-fanout-{n}");
    let handles: Vec<ConnHandle> = (0..n)
        .map(|i| ConnHandle {
            socket_id: SocketId(1_000_000 + i as u64, i as u64),
            outbox: Arc::new(Outbox::new(&loopback.stream, 1 << 20, None)),
            shard: 0,
        })
        .collect();
    for h in &handles {
        app.add_subscriber(&channel, h.clone(), &[]);
    }
    let text = Encode::event(pusher::BENCH_EVENT, Some(&channel), data);
    let mut framed = bytes::BytesMut::new();
    belfry_node::websocket::encode(
        &mut framed,
        belfry_node::websocket::OP_TEXT,
        text.as_str().as_bytes(),
    );
    let frame = &framed[..];
    // Frames queued behind the first in each measured round.
    let behind = 4;

    let mut first = Vec::new();
    let mut more = Vec::new();
    let mut flush = Vec::new();
    let mut resumed = 0;
    let mut to_flush = Vec::with_capacity(n);
    let round = |to_flush: &mut Vec<ConnHandle>, app: &AppRegistry| {
        let t0 = Instant::now();
        let (sent, _) = app.fan_out(0, &channel, frame, None, to_flush);
        let t1 = Instant::now();
        for _ in 0..behind {
            app.fan_out(0, &channel, frame, None, to_flush);
        }
        let t2 = Instant::now();
        for h in to_flush.drain(..) {
            h.outbox.flush();
        }
        let t3 = Instant::now();
        (sent, t1 - t0, t2 - t1, t3 - t2)
    };
    // Warm-up round(s), then the measured ones.
    let warm = if plan.quick { 1 } else { 3 };
    for _ in 0..warm {
        round(&mut to_flush, &app);
        loopback.unblock(&handles).await?;
    }
    for _ in 0..plan.runs {
        let (mut a, mut b, mut c) = (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        for _ in 0..plan.fanout_rounds {
            let (sent, da, db, dc) = round(&mut to_flush, &app);
            anyhow::ensure!(sent == n, "fan_out reached {sent} of {n} subscribers");
            a += da;
            b += db;
            c += dc;
            resumed += loopback.unblock(&handles).await?;
        }
        let ops = (n * plan.fanout_rounds) as f64;
        first.push(a.as_nanos() as f64 / ops);
        more.push(b.as_nanos() as f64 / (ops * behind as f64));
        flush.push(c.as_nanos() as f64 / ops);
    }
    let ops_per_run = (n * plan.fanout_rounds) as u64;
    let result = |name: &str, op: String, per_run: Vec<f64>, ops: u64| {
        let (median, min, max) = summarize(per_run);
        MicroResult {
            name: name.into(),
            op,
            ns_per_op: median,
            min_ns: min,
            max_ns: max,
            runs: plan.runs,
            ops_per_run: ops,
            note: None,
        }
    };
    let mut flush_result = result(
        &format!("fanout_flush_{n}"),
        format!(
            "Outbox::flush per recipient after that fan-out: one try_write of {} frame bytes \
             to a loopback socket ({n} outboxes share it; a thread drains the other end)",
            frame.len()
        ),
        flush,
        ops_per_run,
    );
    let writes = (plan.runs * plan.fanout_rounds * n) as f64;
    if resumed > 0 {
        flush_result.note = Some(format!(
            "{:.1}% of the writes found the socket full; those were finished untimed",
            resumed as f64 * 100.0 / writes
        ));
    }
    let out = vec![
        result(
            &format!("fanout_queue_{n}"),
            format!(
                "AppRegistry::fan_out per recipient, {n} subscribers, into drained outboxes \
                 (frame appended + handle pushed to the flush list)"
            ),
            first,
            ops_per_run,
        ),
        result(
            &format!("fanout_queue_behind_{n}"),
            format!(
                "AppRegistry::fan_out per recipient, {n} subscribers, each already holding \
                 a frame awaiting flush (append only; the coalescing path under load)"
            ),
            more,
            ops_per_run * behind as u64,
        ),
        flush_result,
    ];
    for h in &handles {
        app.remove_subscriber(&channel, h);
    }
    drop(handles);
    drop(loopback);
    drop(registry);
    stop.cancel();
    tasks.close();
    tasks.wait().await;
    Ok(out)
}

impl MicroReport {
    pub fn table(&self) -> String {
        let mut s = format!(
            "micro-benchmarks: median of {} runs of ~{:.0} ms each (after warm-up), ns per op\n\n",
            self.runs, self.run_ms
        );
        s.push_str(&format!(
            "{:<30} {:>10} {:>10} {:>10}  what\n",
            "name", "ns/op", "min", "max"
        ));
        for r in &self.results {
            s.push_str(&format!(
                "{:<30} {:>10.1} {:>10.1} {:>10.1}  {}\n",
                r.name, r.ns_per_op, r.min_ns, r.max_ns, r.op
            ));
            if let Some(note) = &r.note {
                s.push_str(&format!("{:<30} {:>32}  note: {note}\n", "", ""));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sample_data_has_the_asked_size_and_is_json() {
        let d = sample_data(100);
        assert_eq!(d.len(), 100);
        let v: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(v["seq"], 123456);
    }

    #[test]
    fn summary_takes_the_median() {
        assert_eq!(summarize(vec![3.0, 1.0, 2.0]), (2.0, 1.0, 3.0));
        assert_eq!(summarize(vec![4.0, 1.0, 2.0, 3.0]), (2.5, 1.0, 4.0));
    }
}
