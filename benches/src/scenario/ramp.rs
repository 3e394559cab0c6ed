//! `ramp`: the same subscribers as fanout (or spread with `--channels`), with
//! the publish rate raised step by step until a step loses events or its p99
//! passes the bound. The result is the highest deliveries/s a step sustained
//! cleanly, with every step listed.

use std::time::{Duration, Instant};

use crate::report::{PublishReport, RampReport, RampStep, Report};
use crate::stats::{Latency, Percentiles};

use super::broadcast::Publishing;
use super::{Common, Harness};

#[derive(Debug, Clone, serde::Serialize)]
pub struct RampPlan {
    pub clients: usize,
    pub channels: usize,
    pub start_rate: f64,
    pub max_rate: f64,
    pub factor: f64,
    pub step_secs: f64,
    pub p99_ms: f64,
}

/// At most this many steps, whatever the factor.
const MAX_STEPS: usize = 40;

pub async fn run(common: &Common, plan: RampPlan) -> anyhow::Result<Report> {
    anyhow::ensure!(plan.factor > 1.0, "--factor must be above 1");
    let params = serde_json::to_value(&plan)?;
    let mut h = Harness::start(common, "ramp", params)?;
    let Some(Publishing {
        layout,
        stats,
        mut pacer,
        mut choice,
    }) = Publishing::subscribe(&mut h, common, plan.clients, plan.channels).await?
    else {
        return Ok(h.finish());
    };
    let mut ramp = RampReport {
        p99_bound_ms: plan.p99_ms,
        ..RampReport::default()
    };
    let mut rate = plan.start_rate;
    let mut stopped = format!("reached --max-rate {}", plan.max_rate);
    for _ in 0..MAX_STEPS {
        if rate > plan.max_rate {
            break;
        }
        h.set_phase(&format!("{rate:.0} ev/s"));
        h.open_window();
        let base = h.totals();
        let (accepted_before, failed_before) = {
            let s = stats.borrow();
            (s.accepted_per_channel.clone(), s.failed)
        };
        let start = Instant::now();
        pacer
            .run(
                rate,
                Duration::from_secs_f64(plan.step_secs),
                &mut choice,
                &stats,
            )
            .await;
        // The schedule spans the whole step even though its last event is
        // sent one interval before the end.
        let publish_secs = start.elapsed().as_secs_f64().max(plan.step_secs);
        let (accepted_step, failed_step): (Vec<u64>, u64) = {
            let s = stats.borrow();
            (
                s.accepted_per_channel
                    .iter()
                    .zip(&accepted_before)
                    .map(|(a, b)| a - b)
                    .collect(),
                s.failed - failed_before,
            )
        };
        let expected = layout.expected(&accepted_step);
        // Missing deliveries may only be late: allow the bound plus the drain time.
        let drain = Duration::from_secs_f64(common.drain_secs + plan.p99_ms / 1000.0);
        h.wait_for(drain, |t| t.deliveries - base.deliveries >= expected)
            .await;
        let end = h.totals();
        let received = end.deliveries - base.deliveries;
        h.close_window(Some(received));
        let latency = Percentiles::of(&h.collector.borrow().latency(Latency::Delivery).window);
        let lost = expected.saturating_sub(received);
        let publish_rate = accepted_step.iter().sum::<u64>() as f64 / publish_secs.max(1e-9);
        let step = RampStep {
            rate,
            publish_per_sec: publish_rate,
            deliveries_per_sec: expected as f64 / publish_secs.max(1e-9),
            expected,
            received,
            lost,
            latency,
            server_cpu_pct: h.report.servers.first().map(|s| s.usage.cpu_pct),
            frames_per_read: received as f64 / (end.reads - base.reads).max(1) as f64,
            passed: lost == 0 && failed_step == 0 && latency.p99_ms <= plan.p99_ms,
        };
        let passed = step.passed;
        let slow_publisher = publish_rate < 0.9 * rate;
        if passed {
            ramp.best_deliveries_per_sec = step.deliveries_per_sec;
            ramp.best_rate = rate;
        }
        ramp.steps.push(step);
        if !passed {
            stopped = if lost > 0 {
                format!("{lost} deliveries lost at {rate:.0} events/s")
            } else if failed_step > 0 {
                format!("{failed_step} publish requests failed at {rate:.0} events/s")
            } else {
                format!(
                    "p99 {:.1} ms above {} ms at {rate:.0} events/s",
                    latency.p99_ms, plan.p99_ms
                )
            };
            break;
        }
        if slow_publisher {
            stopped = format!(
                "publishing reached only {publish_rate:.0} of {rate:.0} events/s (the API answers too slowly for --publish-lanes {})",
                common.publish_lanes
            );
            break;
        }
        rate *= plan.factor;
    }
    ramp.stopped_because = stopped;
    let total_secs = ramp.steps.len() as f64 * plan.step_secs;
    h.report.publish = Some(PublishReport::from_stats(rate, total_secs, &stats.borrow()));
    h.report.latency = None;
    if ramp.best_deliveries_per_sec == 0.0 {
        h.report.problems.push("no ramp step passed".to_string());
    }
    h.report.ramp = Some(ramp);
    Ok(h.finish())
}
