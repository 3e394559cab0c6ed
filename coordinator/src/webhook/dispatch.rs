//! Batching, signing, POSTing and retrying webhook jobs.
//!
//! Jobs are grouped per app and URL: a batch is sent when it holds
//! `max_batch` events or `batch_window` after its first event, whichever
//! comes first. A batch's events are fixed when it is formed; each attempt
//! has a fresh `time_ms` and signature (the Python SDK refuses a `time_ms`
//! older than 300 s) and the same `X-Belfry-Webhook-Id`. Anything but a 2xx
//! is retried with exponential backoff and jitter until `retry_for` has
//! passed, then dropped with a metric and a log line.
//!
//! A job's `Done` runs when every URL that wanted it got it or gave up on
//! it; the stream consumer acknowledges the stream entry there. A job still
//! in flight when the dispatcher stops is not acknowledged, so the next
//! leader delivers it again.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::config::{WebhookApp, WebhookApps, WebhookTarget};
use super::{format, Job, Sink};

/// How the dispatcher batches and retries.
#[derive(Debug, Clone)]
pub struct DispatchOptions {
    /// How long a batch waits for more events after its first.
    pub batch_window: Duration,
    /// Events per request at most.
    pub max_batch: usize,
    /// How long one POST may take.
    pub request_timeout: Duration,
    /// How long a batch is retried before it is dropped.
    pub retry_for: Duration,
    /// First retry delay; it doubles up to `max_backoff`.
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// Jobs waiting to be batched; over it the in-process queue drops.
    pub queue: usize,
}

impl Default for DispatchOptions {
    fn default() -> Self {
        Self {
            batch_window: Duration::from_millis(50),
            max_batch: 100,
            request_timeout: Duration::from_secs(5),
            retry_for: Duration::from_secs(600),
            first_backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            queue: 10_000,
        }
    }
}

/// Runs when the last batch holding a job finished with it, unless the
/// dispatcher was stopped first (then the job stays pending for the next leader).
pub struct Done {
    ack: Option<Box<dyn FnOnce() + Send + Sync>>,
    stop: CancellationToken,
}

impl Done {
    pub fn new(stop: CancellationToken, ack: impl FnOnce() + Send + Sync + 'static) -> Arc<Done> {
        Arc::new(Done {
            ack: Some(Box::new(ack)),
            stop,
        })
    }
}

impl Drop for Done {
    fn drop(&mut self) {
        if self.stop.is_cancelled() {
            return;
        }
        if let Some(ack) = self.ack.take() {
            ack();
        }
    }
}

struct Queued {
    job: Job,
    done: Option<Arc<Done>>,
}

/// The handle jobs are given to; the batching task runs until `stop`.
#[derive(Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<Queued>,
    /// Names jobs that come without a stream id (a single node's), so two
    /// batches of look-alike jobs (two users joining one channel) never share
    /// an `X-Belfry-Webhook-Id` that receivers deduplicate by.
    started_ms: u64,
    sequence: Arc<std::sync::atomic::AtomicU64>,
}

impl Dispatcher {
    pub fn start(
        apps: Arc<WebhookApps>,
        options: DispatchOptions,
        stop: CancellationToken,
        tracker: TaskTracker,
    ) -> Dispatcher {
        let (tx, rx) = mpsc::channel(options.queue.max(1));
        tracker.spawn(batch(apps, options, rx, stop, tracker.clone()));
        Dispatcher {
            tx,
            started_ms: crate::envelope::now_us() / 1000,
            sequence: Arc::new(std::sync::atomic::AtomicU64::new(0)),
        }
    }

    /// Hands a job over, waiting while the queue is full (the stream
    /// consumer reads no further meanwhile).
    pub async fn send_waiting(&self, job: Job, done: Arc<Done>) {
        let _ = self
            .tx
            .send(Queued {
                job,
                done: Some(done),
            })
            .await;
    }
}

impl Sink for Dispatcher {
    fn send(&self, mut job: Job) {
        if job.id.is_empty() {
            let n = self
                .sequence
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            job.id = format!("local-{}-{n}", self.started_ms);
        }
        metrics::counter!("belfry_webhook_queued_total").increment(1);
        if self.tx.try_send(Queued { job, done: None }).is_err() {
            metrics::counter!("belfry_webhook_dropped_total", "reason" => "queue_full")
                .increment(1);
        }
    }
}

struct Batch {
    deadline: tokio::time::Instant,
    jobs: Vec<Job>,
    done: Vec<Arc<Done>>,
}

async fn batch(
    apps: Arc<WebhookApps>,
    options: DispatchOptions,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut pending: HashMap<(String, usize), Batch> = HashMap::new();
    loop {
        let next = pending.values().map(|b| b.deadline).min();
        tokio::select! {
            _ = stop.cancelled() => return,
            queued = rx.recv() => {
                let Some(Queued { job, done }) = queued else { return };
                let Some(app) = apps.app(&job.app) else { continue };
                for (i, target) in app.webhooks.iter().enumerate() {
                    if !target.wants(&job.name, &job.channel) || job.channel.starts_with('#') {
                        continue;
                    }
                    let key = (job.app.clone(), i);
                    let b = pending.entry(key.clone()).or_insert_with(|| Batch {
                        deadline: tokio::time::Instant::now() + options.batch_window,
                        jobs: Vec::new(),
                        done: Vec::new(),
                    });
                    b.jobs.push(job.clone());
                    b.done.extend(done.clone());
                    if b.jobs.len() >= options.max_batch {
                        if let Some(b) = pending.remove(&key) {
                            tracker.spawn(deliver(app.clone(), i, b, options.clone(), stop.clone()));
                        }
                    }
                }
            }
            _ = sleep_until(next) => {
                let now = tokio::time::Instant::now();
                let due: Vec<_> = pending.iter().filter(|(_, b)| b.deadline <= now).map(|(k, _)| k.clone()).collect();
                for key in due {
                    if let (Some(b), Some(app)) = (pending.remove(&key), apps.app(&key.0)) {
                        tracker.spawn(deliver(app.clone(), key.1, b, options.clone(), stop.clone()));
                    }
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Sends one batch until it is taken or its retry time is up.
async fn deliver(
    app: WebhookApp,
    target: usize,
    batch: Batch,
    options: DispatchOptions,
    stop: CancellationToken,
) {
    let target: &WebhookTarget = &app.webhooks[target];
    let id = format::webhook_id(&target.url, &batch.jobs);
    let started = Instant::now();
    let mut backoff = options.first_backoff;
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        let time_ms = crate::envelope::now_us() / 1000;
        let body = format::body(time_ms, &batch.jobs);
        let signature = format::signature(&app.secret, &body);
        let outcome = tokio::time::timeout(
            options.request_timeout,
            post(&target.url, &app.key, &signature, &id, body),
        )
        .await
        .unwrap_or_else(|_| Err("timed out".into()));
        match outcome {
            Ok(status) if (200..300).contains(&status) => {
                metrics::counter!("belfry_webhook_sent_total").increment(batch.jobs.len() as u64);
                let now_ms = crate::envelope::now_us() / 1000;
                for job in &batch.jobs {
                    let secs = now_ms.saturating_sub(job.at_ms) as f64 / 1000.0;
                    metrics::histogram!("belfry_webhook_latency_seconds").record(secs);
                }
                tracing::debug!(url = %target.url, events = batch.jobs.len(), attempt, "webhook sent");
                return;
            }
            outcome => {
                let why = match outcome {
                    Ok(status) => format!("HTTP {status}"),
                    Err(e) => e,
                };
                let wait = jitter(backoff);
                if started.elapsed() + wait > options.retry_for {
                    metrics::counter!("belfry_webhook_dropped_total", "reason" => "retries_exhausted")
                        .increment(batch.jobs.len() as u64);
                    tracing::error!(app = %app.id, url = %target.url, events = batch.jobs.len(), attempt, error = %why,
                        "webhook dropped after retrying for {:?}", options.retry_for);
                    return;
                }
                metrics::counter!("belfry_webhook_retried_total").increment(1);
                tracing::warn!(app = %app.id, url = %target.url, attempt, error = %why, retry_in_ms = wait.as_millis() as u64, "webhook refused; retrying");
                tokio::select! {
                    // Not acknowledged: the next leader sends it again.
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                backoff = (backoff * 2).min(options.max_backoff);
            }
        }
    }
}

/// Between half and all of `d`, so that many refused batches do not retry in step.
fn jitter(d: Duration) -> Duration {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::envelope::now_us());
    let fraction = (h.finish() % 1000) as f64 / 1000.0;
    d.mul_f64(0.5 + fraction / 2.0)
}

/// One POST over a fresh HTTP/1.1 connection; the status code, or why none came.
async fn post(
    url: &str,
    key: &str,
    signature: &str,
    id: &str,
    body: String,
) -> Result<u16, String> {
    let uri: hyper::Uri = url.parse().map_err(|e| format!("bad url: {e}"))?;
    let host = uri.host().ok_or("url without host")?.to_owned();
    let port = uri.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host.as_str(), port))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let conn = tokio::spawn(connection);
    let authority = uri.authority().map(|a| a.to_string()).unwrap_or(host);
    let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let request = hyper::Request::post(path)
        .header(hyper::header::HOST, authority)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header("X-Pusher-Key", key)
        .header("X-Pusher-Signature", signature)
        .header("X-Belfry-Webhook-Id", id)
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request: {e}"))?;
    let status = response.status().as_u16();
    // Read the answer to the end so the receiver sees a clean exchange.
    let _ = response.into_body().collect().await;
    conn.abort();
    Ok(status)
}
