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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::client::{post, Post, PostError};
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
    /// What the apps' URLs want, so a single node's unwanted edges are not
    /// queued (nodes in a cluster queue only wanted ones in the first place).
    apps: Arc<WebhookApps>,
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
        tracker.spawn(batch(apps.clone(), options, rx, stop, tracker.clone()));
        Dispatcher {
            tx,
            apps,
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
        if !self.apps.wants(&job.app, &job.name, &job.channel) {
            return;
        }
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

/// A `channel_vacated` or `member_removed` waiting out its app's grace period.
struct Held {
    /// Its place in `Batcher::timeline`.
    slot: (tokio::time::Instant, u64),
    queued: Queued,
}

/// What a held job is matched by: the app, the channel, and for member
/// events the user.
type HeldKey = (String, String, Option<String>);

/// The job this one undoes inside the grace period, if it is one of the pair.
fn held_key(job: &Job) -> Option<(HeldKey, bool)> {
    let leaves = match job.name.as_str() {
        "channel_vacated" | "member_removed" => true,
        "channel_occupied" | "member_added" => false,
        _ => return None,
    };
    let user = job
        .name
        .starts_with("member_")
        .then(|| job.user_id.clone().unwrap_or_default());
    Some(((job.app.clone(), job.channel.clone(), user), leaves))
}

/// The batching task's state: open batches per app and URL, and the held
/// leaves in the order they are due.
struct Batcher {
    apps: Arc<WebhookApps>,
    options: DispatchOptions,
    stop: CancellationToken,
    tracker: TaskTracker,
    pending: HashMap<(String, usize), Batch>,
    held: HashMap<HeldKey, Held>,
    /// Held leaves by (release, arrival): the next due is the first, and
    /// leaves due together go out in the order they were decided.
    timeline: BTreeMap<(tokio::time::Instant, u64), HeldKey>,
    arrivals: u64,
}

impl Batcher {
    /// Debounces the pair Pusher debounces, then batches what is left.
    fn take(&mut self, queued: Queued) {
        if queued.job.channel.starts_with('#') {
            return;
        }
        let Some(app) = self.apps.app(&queued.job.app) else {
            return;
        };
        let grace = Duration::from_millis(app.webhook_grace_ms);
        match held_key(&queued.job) {
            Some((key, true)) if !grace.is_zero() => {
                self.arrivals += 1;
                let slot = (tokio::time::Instant::now() + grace, self.arrivals);
                self.timeline.insert(slot, key.clone());
                // Two leaves in a row cannot come from one edge stream; keep both.
                if let Some(earlier) = self.held.insert(key, Held { slot, queued }) {
                    self.timeline.remove(&earlier.slot);
                    self.batch(earlier.queued);
                }
            }
            Some((key, false)) => match self.held.remove(&key) {
                // Back inside the window: neither edge happened for the app.
                // Dropping both `Done`s acknowledges both stream entries.
                Some(held) => {
                    self.timeline.remove(&held.slot);
                    metrics::counter!("belfry_webhook_debounced_total").increment(2);
                }
                None => self.batch(queued),
            },
            _ => self.batch(queued),
        }
    }

    fn batch(&mut self, Queued { job, done }: Queued) {
        let apps = self.apps.clone();
        let Some(app) = apps.app(&job.app) else {
            return;
        };
        for (i, target) in app.webhooks.iter().enumerate() {
            // `take` already left out the internal `#` channels.
            if !target.wants(&job.name, &job.channel) {
                continue;
            }
            let key = (job.app.clone(), i);
            let window = self.options.batch_window;
            let b = self.pending.entry(key.clone()).or_insert_with(|| Batch {
                deadline: tokio::time::Instant::now() + window,
                jobs: Vec::new(),
                done: Vec::new(),
            });
            b.jobs.push(job.clone());
            b.done.extend(done.clone());
            if b.jobs.len() >= self.options.max_batch {
                self.send(&key);
            }
        }
    }

    fn send(&mut self, key: &(String, usize)) {
        if let (Some(b), Some(app)) = (self.pending.remove(key), self.apps.app(&key.0)) {
            let work = deliver(
                app.clone(),
                key.1,
                b,
                self.options.clone(),
                self.stop.clone(),
            );
            self.tracker.spawn(work);
        }
    }

    fn next_deadline(&self) -> Option<tokio::time::Instant> {
        let batches = self.pending.values().map(|b| b.deadline).min();
        let held = self.timeline.keys().next().map(|(at, _)| *at);
        batches.into_iter().chain(held).min()
    }

    /// Releases the held leaves whose time has come, then sends the batches
    /// whose window closed.
    fn due(&mut self, now: tokio::time::Instant) {
        while let Some(entry) = self.timeline.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let key = entry.remove();
            if let Some(h) = self.held.remove(&key) {
                self.batch(h.queued);
            }
        }
        let due: Vec<_> = self
            .pending
            .iter()
            .filter(|(_, b)| b.deadline <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            self.send(&key);
        }
    }

    /// The dispatcher is stopping. Jobs from the Redis stream stay
    /// unacknowledged for the next leader, which holds and sends them
    /// itself. Jobs with nothing behind them (a single node's) are sent now,
    /// grace period or not: no one else will.
    fn stopping(&mut self) {
        let timeline = std::mem::take(&mut self.timeline);
        for key in timeline.into_values() {
            if let Some(h) = self.held.remove(&key) {
                if h.queued.done.is_none() {
                    self.batch(h.queued);
                }
            }
        }
        let keys: Vec<_> = self.pending.keys().cloned().collect();
        for key in keys {
            if self.pending.get(&key).is_some_and(|b| b.done.is_empty()) {
                self.send(&key);
            } else {
                self.pending.remove(&key);
            }
        }
    }
}

async fn batch(
    apps: Arc<WebhookApps>,
    options: DispatchOptions,
    mut rx: mpsc::Receiver<Queued>,
    stop: CancellationToken,
    tracker: TaskTracker,
) {
    let mut batcher = Batcher {
        apps,
        options,
        stop: stop.clone(),
        tracker,
        pending: HashMap::new(),
        held: HashMap::new(),
        timeline: BTreeMap::new(),
        arrivals: 0,
    };
    loop {
        let next = batcher.next_deadline();
        tokio::select! {
            // Stop first: the queue also closes as the stream consumer goes.
            biased;
            _ = stop.cancelled() => return batcher.stopping(),
            queued = rx.recv() => {
                let Some(queued) = queued else {
                    return batcher.stopping();
                };
                batcher.take(queued);
            }
            _ = sleep_until(next) => batcher.due(tokio::time::Instant::now()),
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
    // Jobs from the stream are the next leader's once this one stops; a
    // single node's get one last attempt.
    let durable = !batch.done.is_empty();
    loop {
        if durable && stop.is_cancelled() {
            return;
        }
        attempt += 1;
        let time_ms = crate::envelope::now_us() / 1000;
        let body = format::body(time_ms, &batch.jobs);
        let signature = format::signature(&app.secret, &body);
        let request = Post {
            key: &app.key,
            signature: &signature,
            id: &id,
            body,
        };
        let outcome = tokio::time::timeout(options.request_timeout, post(&target.url, request))
            .await
            .unwrap_or(Err(PostError::TimedOut));
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
                    Err(e) => e.to_string(),
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
