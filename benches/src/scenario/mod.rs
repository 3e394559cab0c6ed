//! Scenarios and the harness they share: options every scenario takes,
//! starting the client fleet, connecting and subscribing clients with a
//! progress line, sampling the server and the generator from `/proc`, and
//! the `--check` verdict.
//!
//! Each scenario file says what it measures; this module knows nothing of
//! channels or rates.

pub mod broadcast;
pub mod idle;
pub mod presence;
pub mod ramp;

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};

use crate::fleet::{Fleet, FleetConfig, Role};
use crate::procfs::{self, ProcSample, ProcUsage};
use crate::publish::{HttpApi, Publisher, RedisBus};
use crate::pusher::App;
use crate::report::{self, ConnectReport, GeneratorReport, ProgressInputs, Report, ServerReport};
use crate::stats::{Collector, Counters};
use crate::ws::Endpoint;

/// How events get into the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PublishVia {
    /// The signed HTTP API of the `--http` server.
    Http,
    /// Envelopes PUBLISHed straight into `--redis-url` (cluster mode nodes).
    Redis,
}

/// Options shared by every scenario.
#[derive(Debug, Clone, Args)]
pub struct Common {
    /// WebSocket base URL of the server; repeat to spread clients over several nodes.
    #[arg(long = "ws", default_value = "ws://127.0.0.1:8080")]
    pub ws: Vec<String>,
    /// HTTP API base URL used for publishing (default: the first --ws URL).
    #[arg(long)]
    pub http: Option<String>,
    #[arg(long, default_value = "belfry", env = "BELFRY_BENCH_APP_ID")]
    pub app_id: String,
    #[arg(long, default_value = "belfry-key", env = "BELFRY_BENCH_APP_KEY")]
    pub key: String,
    #[arg(long, default_value = "belfry-secret", env = "BELFRY_BENCH_APP_SECRET")]
    pub secret: String,
    /// Server process to sample RSS and CPU from (repeatable).
    #[arg(long)]
    pub server_pid: Vec<u32>,
    /// Bind client sockets to 127.0.0.1..=127.0.0.K round-robin (0 = don't bind).
    #[arg(long, default_value_t = 16)]
    pub source_addrs: u32,
    /// Client threads (default: CPUs this process may run on).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Connections between TCP connect and subscribed at any moment.
    #[arg(long, default_value_t = 256)]
    pub connect_concurrency: usize,
    /// Publishing path.
    #[arg(long, value_enum, default_value_t = PublishVia::Http)]
    pub publish: PublishVia,
    /// Redis of the cluster, for `--publish redis`.
    #[arg(long, env = "BELFRY_BENCH_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Key prefix the nodes use in Redis (their `redis_prefix`).
    #[arg(long, default_value = "belfry")]
    pub redis_prefix: String,
    /// Concurrent publishing requests at most.
    #[arg(long, default_value_t = 16)]
    pub publish_lanes: usize,
    /// Size of each event's data string, bytes (at least ~45).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
    /// Use private channels (auth signed locally) instead of public ones.
    #[arg(long)]
    pub private: bool,
    /// After publishing, wait at most this long for missing deliveries.
    #[arg(long, default_value_t = 5.0)]
    pub drain_secs: f64,
    /// Print the report as JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Exit with status 2 if events were lost or duplicated, nothing was
    /// delivered, or clients failed to connect.
    #[arg(long)]
    pub check: bool,
    /// No progress line on stderr.
    #[arg(long)]
    pub quiet: bool,
}

impl Common {
    pub fn app(&self) -> App {
        App {
            id: self.app_id.clone(),
            key: self.key.clone(),
            secret: self.secret.clone(),
        }
    }

    pub fn threads(&self) -> usize {
        self.threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1)
        })
    }

    pub async fn publisher(&self) -> anyhow::Result<Publisher> {
        match self.publish {
            PublishVia::Http => {
                let url = self.http.as_deref().unwrap_or(&self.ws[0]);
                Ok(Publisher::Http(HttpApi::new(
                    Endpoint::parse(url)?,
                    self.app(),
                )))
            }
            PublishVia::Redis => {
                let Some(url) = self.redis_url.as_deref() else {
                    anyhow::bail!("--publish redis needs --redis-url");
                };
                let bus = RedisBus::connect(url, &self.redis_prefix, &self.app_id).await?;
                Ok(Publisher::Redis(bus))
            }
        }
    }
}

/// A running scenario: the fleet, the collector and the progress line.
pub struct Harness {
    pub common: Common,
    pub fleet: Fleet,
    pub collector: Rc<RefCell<Collector>>,
    pub progress: Rc<ProgressInputs>,
    stop_progress: Rc<Cell<bool>>,
    pub report: Report,
    window: Option<Window>,
}

/// Samples taken when a measurement window opened.
struct Window {
    servers: Vec<(u32, Option<ProcSample>)>,
    own: Option<ProcSample>,
}

impl Harness {
    /// Raises the file limit, starts the client threads and the progress line.
    pub fn start(
        common: &Common,
        scenario: &str,
        params: serde_json::Value,
    ) -> anyhow::Result<Self> {
        let limit = procfs::raise_nofile_limit()?;
        let endpoints = common
            .ws
            .iter()
            .map(|u| Endpoint::parse(u))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let fleet = Fleet::start(FleetConfig {
            endpoints,
            app: common.app(),
            source_addrs: common.source_addrs,
            threads: common.threads(),
            connect_concurrency: common.connect_concurrency,
        })?;
        let collector = Rc::new(RefCell::new(Collector::new(fleet.shards())));
        let progress = Rc::new(ProgressInputs::default());
        let stop_progress = Rc::new(Cell::new(false));
        if !common.quiet {
            tokio::task::spawn_local(report::progress_loop(
                collector.clone(),
                progress.clone(),
                common.server_pid.first().copied(),
                stop_progress.clone(),
            ));
        }
        let report = Report {
            scenario: scenario.to_string(),
            params,
            ..Report::default()
        };
        if !common.quiet {
            eprintln!(
                "{scenario}: {} client thread(s), open-file limit {limit}, servers {:?}",
                common.threads(),
                common.ws
            );
        }
        Ok(Harness {
            common: common.clone(),
            fleet,
            collector,
            progress,
            stop_progress,
            report,
            window: None,
        })
    }

    pub fn set_phase(&self, phase: &str) {
        *self.progress.phase.borrow_mut() = phase.to_string();
    }

    pub fn totals(&self) -> Counters {
        self.collector.borrow_mut().collect()
    }

    /// Starts `roles` and waits until each has settled (`settled` counts the
    /// ones that are ready or failed). Fills in the connect section.
    pub async fn connect(
        &mut self,
        roles: Vec<Role>,
        settled: impl Fn(&Counters) -> u64,
    ) -> ConnectReport {
        let n = roles.len() as u64;
        let before = self.totals();
        let already = settled(&before);
        self.progress
            .target_clients
            .set(self.progress.target_clients.get() + n);
        self.set_phase("connecting");
        let start = Instant::now();
        for role in roles {
            self.fleet.spawn(role);
        }
        let limit = Duration::from_secs(60) + Duration::from_millis(5 * n);
        self.wait_for(limit, |t| settled(t) >= already + n).await;
        let secs = start.elapsed().as_secs_f64();
        let t = self.totals();
        let connected = t.connected - before.connected;
        ConnectReport {
            clients: n,
            connected,
            subscribed: t.subscribed - before.subscribed,
            failed: (t.connect_failed + t.subscribe_failed)
                - (before.connect_failed + before.subscribe_failed),
            secs,
            per_sec: connected as f64 / secs.max(1e-9),
        }
    }

    /// Polls the counters every 10 ms until `done` or `limit` passes.
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&Counters) -> bool) -> bool {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if done(&self.totals()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        done(&self.totals())
    }

    /// Opens a measurement window: resets window latencies and samples CPU.
    pub fn open_window(&mut self) {
        self.collector.borrow_mut().reset_window();
        self.window = Some(Window {
            servers: self
                .common
                .server_pid
                .iter()
                .map(|p| (*p, procfs::sample(&p.to_string())))
                .collect(),
            own: procfs::sample("self"),
        });
    }

    /// Closes the window: server and generator usage, per delivery if given.
    pub fn close_window(&mut self, deliveries: Option<u64>) {
        let Some(w) = self.window.take() else { return };
        let per = |cpu: f64| deliveries.filter(|d| *d > 0).map(|d| cpu * 1e6 / d as f64);
        self.report.servers = w
            .servers
            .iter()
            .filter_map(|(pid, a)| {
                let b = procfs::sample(&pid.to_string())?;
                let usage = ProcUsage::between(a.as_ref()?, &b);
                Some(ServerReport {
                    pid: *pid,
                    cpu_us_per_delivery: per(usage.cpu_secs),
                    usage,
                })
            })
            .collect();
        if let (Some(a), Some(b)) = (w.own, procfs::sample("self")) {
            let usage = ProcUsage::between(&a, &b);
            self.report.generator = GeneratorReport {
                threads: self.common.threads(),
                cpu_us_per_delivery: per(usage.cpu_secs),
                usage,
            };
        }
    }

    /// Stops the clients and the progress line; returns the report.
    pub fn finish(mut self) -> Report {
        self.stop_progress.set(true);
        let totals = self.totals();
        {
            let c = self.collector.borrow();
            self.report.disconnects = totals.disconnected;
            self.report.close_codes = c.close_codes.clone();
            self.report.errors = c.errors.clone();
        }
        if self.report.generator.threads == 0 {
            self.report.generator.threads = self.common.threads();
        }
        let connect = &self.report.connect;
        if self.common.check && connect.failed > 0 {
            let failed = connect.failed;
            self.report
                .problems
                .push(format!("{failed} clients failed to connect or subscribe"));
        }
        self.fleet.stop();
        self.report
    }
}

/// Renders the report (JSON or table) and maps `--check` to an exit code.
pub fn emit(report: &Report, common: &Common) -> anyhow::Result<i32> {
    if common.json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(if common.check && !report.problems.is_empty() {
        2
    } else {
        0
    })
}
