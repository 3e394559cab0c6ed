//! What a run tells its user: the live progress line on stderr (once a
//! second), the final table on stdout, or the same report as JSON.
//!
//! The report is one serde struct with optional sections, so every scenario
//! fills in what it measured and the table and JSON stay in step.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::rc::Rc;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::procfs::{self, ProcUsage};
use crate::publish::PublishStats;
use crate::stats::{Collector, Latency, Percentiles};

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub scenario: String,
    pub params: serde_json::Value,
    pub connect: ConnectReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub publish: Option<PublishReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency: Option<Percentiles>,
    pub servers: Vec<ServerReport>,
    pub generator: GeneratorReport,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle: Option<IdleReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ramp: Option<RampReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceReport>,
    pub disconnects: u64,
    pub close_codes: BTreeMap<u16, u64>,
    pub errors: Vec<String>,
    /// Why `--check` fails this run (empty = pass).
    pub problems: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct ConnectReport {
    pub clients: u64,
    pub connected: u64,
    pub subscribed: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct PublishReport {
    pub target_rate: f64,
    pub attempted: u64,
    pub accepted: u64,
    pub failed: u64,
    pub secs: f64,
    pub per_sec: f64,
    pub max_lag_ms: f64,
    pub request_latency: Percentiles,
    pub errors: Vec<String>,
}

impl PublishReport {
    pub fn from_stats(target_rate: f64, secs: f64, s: &PublishStats) -> Self {
        PublishReport {
            target_rate,
            attempted: s.attempted,
            accepted: s.accepted,
            failed: s.failed,
            secs,
            per_sec: s.accepted as f64 / secs.max(1e-9),
            max_lag_ms: s.max_lag.as_secs_f64() * 1000.0,
            request_latency: Percentiles::of(&s.request_latency),
            errors: s.errors.clone(),
        }
    }
}

#[derive(Debug, Default, Serialize)]
pub struct DeliveryReport {
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub duplicates: u64,
    /// Received deliveries over the publishing time.
    pub per_sec: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct ServerReport {
    pub pid: u32,
    #[serde(flatten)]
    pub usage: ProcUsage,
    /// Server CPU per delivered event, microseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_delivery: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct GeneratorReport {
    pub threads: usize,
    #[serde(flatten)]
    pub usage: ProcUsage,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cpu_us_per_delivery: Option<f64>,
}

#[derive(Debug, Default, Serialize)]
pub struct IdleReport {
    pub connections: u64,
    pub server_rss_before_kib: u64,
    pub server_rss_after_kib: u64,
    pub rss_bytes_per_connection: f64,
}

#[derive(Debug, Default, Serialize)]
pub struct RampStep {
    pub rate: f64,
    pub publish_per_sec: f64,
    pub deliveries_per_sec: f64,
    pub expected: u64,
    pub received: u64,
    pub lost: u64,
    pub latency: Percentiles,
    pub server_cpu_pct: Option<f64>,
    /// Frames a client read carried on average during the step.
    pub frames_per_read: f64,
    pub passed: bool,
}

#[derive(Debug, Default, Serialize)]
pub struct RampReport {
    pub p99_bound_ms: f64,
    pub steps: Vec<RampStep>,
    /// Highest deliveries/s of a step with no loss and p99 within the bound.
    pub best_deliveries_per_sec: f64,
    pub best_rate: f64,
    pub stopped_because: String,
}

#[derive(Debug, Default, Serialize)]
pub struct PresenceReport {
    pub channels: u64,
    pub observers: u64,
    pub churners: u64,
    pub joins: u64,
    pub leaves: u64,
    pub joins_per_sec: f64,
    pub join_latency: Percentiles,
    pub member_added_expected: u64,
    pub member_added_received: u64,
    pub member_added_latency: Percentiles,
    pub member_removed_expected: u64,
    pub member_removed_received: u64,
}

fn pct_row(p: &Percentiles) -> String {
    format!(
        "p50 {:.2}  p99 {:.2}  p99.9 {:.2}  max {:.2} ms  (n={})",
        p.p50_ms, p.p99_ms, p.p999_ms, p.max_ms, p.count
    )
}

impl Report {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut rows: Vec<(String, String)> = Vec::new();
        let mut row = |k: &str, v: String| rows.push((k.to_string(), v));
        row("scenario", self.scenario.clone());
        row("parameters", self.params.to_string());
        let c = &self.connect;
        row(
            "connections",
            format!(
                "{} of {} subscribed, {} failed, {:.0}/s over {:.1} s",
                c.subscribed.max(c.connected),
                c.clients,
                c.failed,
                c.per_sec,
                c.secs
            ),
        );
        if let Some(p) = &self.publish {
            row(
                "published",
                format!(
                    "{} accepted of {} ({} failed), {:.1}/s (target {:.1}/s), max lag {:.1} ms",
                    p.accepted, p.attempted, p.failed, p.per_sec, p.target_rate, p.max_lag_ms
                ),
            );
            row("publish request", pct_row(&p.request_latency));
        }
        if let Some(d) = &self.delivery {
            row("deliveries/s", format!("{:.0}", d.per_sec));
            row(
                "deliveries",
                format!(
                    "{} received of {} expected: lost {}, duplicates {}",
                    d.received, d.expected, d.lost, d.duplicates
                ),
            );
        }
        if let Some(l) = &self.latency {
            row("latency", pct_row(l));
        }
        if let Some(i) = &self.idle {
            row(
                "idle memory",
                format!(
                    "{} connections: server RSS {} -> {} KiB, {:.0} bytes per connection",
                    i.connections,
                    i.server_rss_before_kib,
                    i.server_rss_after_kib,
                    i.rss_bytes_per_connection
                ),
            );
        }
        if let Some(p) = &self.presence {
            row(
                "presence",
                format!(
                    "{} channels, {} observers, {} churners; {} joins ({:.1}/s), {} leaves",
                    p.channels, p.observers, p.churners, p.joins, p.joins_per_sec, p.leaves
                ),
            );
            row("join latency", pct_row(&p.join_latency));
            row(
                "member_added",
                format!(
                    "{} of {} expected; {}",
                    p.member_added_received,
                    p.member_added_expected,
                    pct_row(&p.member_added_latency)
                ),
            );
            row(
                "member_removed",
                format!(
                    "{} of {} expected",
                    p.member_removed_received, p.member_removed_expected
                ),
            );
        }
        if let Some(r) = &self.ramp {
            for s in &r.steps {
                row(
                    &format!("ramp {:.0} ev/s", s.rate),
                    format!(
                        "{} {:.0} deliveries/s, p99 {:.2} ms, max {:.2} ms, lost {}, {:.1} frames/read{}",
                        if s.passed { "ok  " } else { "FAIL" },
                        s.deliveries_per_sec,
                        s.latency.p99_ms,
                        s.latency.max_ms,
                        s.lost,
                        s.frames_per_read,
                        s.server_cpu_pct
                            .map(|c| format!(", server cpu {c:.0}%"))
                            .unwrap_or_default()
                    ),
                );
            }
            row(
                "ramp best",
                format!(
                    "{:.0} deliveries/s at {:.0} events/s (p99 bound {} ms); stopped: {}",
                    r.best_deliveries_per_sec, r.best_rate, r.p99_bound_ms, r.stopped_because
                ),
            );
        }
        for s in &self.servers {
            row(
                &format!("server {}", s.pid),
                format!(
                    "RSS {} -> {} KiB, CPU {:.2} s ({:.0}%){}",
                    s.usage.rss_start_kib,
                    s.usage.rss_end_kib,
                    s.usage.cpu_secs,
                    s.usage.cpu_pct,
                    s.cpu_us_per_delivery
                        .map(|u| format!(", {u:.2} us/delivery"))
                        .unwrap_or_default()
                ),
            );
        }
        let g = &self.generator;
        row(
            "generator",
            format!(
                "{} threads, CPU {:.2} s ({:.0}%){}, RSS {} KiB",
                g.threads,
                g.usage.cpu_secs,
                g.usage.cpu_pct,
                g.cpu_us_per_delivery
                    .map(|u| format!(", {u:.2} us/delivery"))
                    .unwrap_or_default(),
                g.usage.rss_end_kib
            ),
        );
        if self.disconnects > 0 || !self.close_codes.is_empty() {
            row(
                "disconnects",
                format!("{} (close codes {:?})", self.disconnects, self.close_codes),
            );
        }
        for e in &self.errors {
            row("error", e.clone());
        }
        for p in &self.problems {
            row("PROBLEM", p.clone());
        }
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        let mut out = String::new();
        for (k, v) in rows {
            let _ = writeln!(out, "{k:<width$}  {v}");
        }
        out
    }
}

/// What the progress line shows besides the collector's counters.
#[derive(Default)]
pub struct ProgressInputs {
    pub phase: RefCell<String>,
    pub target_clients: Cell<u64>,
    pub publish: RefCell<Option<Rc<RefCell<PublishStats>>>>,
}

/// Prints one status line per second to stderr until `stop` is set.
pub async fn progress_loop(
    collector: Rc<RefCell<Collector>>,
    inputs: Rc<ProgressInputs>,
    server_pid: Option<u32>,
    stop: Rc<Cell<bool>>,
) {
    let start = Instant::now();
    let mut last_deliveries = 0;
    let mut last_published = 0;
    let mut last_server = server_pid.and_then(|p| procfs::sample(&p.to_string()));
    let mut last_self = procfs::sample("self");
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    // Bounded: a day of seconds at most.
    for _ in 0..86_400 {
        tick.tick().await;
        if stop.get() {
            return;
        }
        let (totals, p99) = {
            let mut c = collector.borrow_mut();
            let totals = c.collect();
            (totals, c.take_tick(Latency::Delivery))
        };
        let published = inputs
            .publish
            .borrow()
            .as_ref()
            .map(|p| p.borrow().accepted)
            .unwrap_or(0);
        let mut line = format!(
            "[{:>4}s] {:<10} conns {}/{} fail {}",
            start.elapsed().as_secs(),
            inputs.phase.borrow(),
            totals.connected - totals.disconnected.min(totals.connected),
            inputs.target_clients.get(),
            totals.connect_failed
        );
        if published > 0 || totals.deliveries > 0 {
            let _ = write!(
                line,
                " | pub {}/s | deliv {}/s dup {} | p99 {:.1} ms",
                published.saturating_sub(last_published),
                totals.deliveries.saturating_sub(last_deliveries),
                totals.duplicates,
                p99.p99_ms
            );
        }
        if totals.member_added > 0 || totals.joins > 0 {
            let _ = write!(
                line,
                " | joins {} added {}",
                totals.joins, totals.member_added
            );
        }
        if let Some(pid) = server_pid {
            let now = procfs::sample(&pid.to_string());
            if let (Some(a), Some(b)) = (&last_server, &now) {
                let u = ProcUsage::between(a, b);
                let _ = write!(
                    line,
                    " | srv cpu {:.0}% rss {} MiB",
                    u.cpu_pct,
                    u.rss_end_kib / 1024
                );
            }
            last_server = now;
        }
        let now = procfs::sample("self");
        if let (Some(a), Some(b)) = (&last_self, &now) {
            let _ = write!(line, " | gen cpu {:.0}%", ProcUsage::between(a, b).cpu_pct);
        }
        last_self = now;
        eprintln!("{line}");
        last_deliveries = totals.deliveries;
        last_published = published;
    }
}
