//! `presence`: observers sit on presence channels while churners join and
//! leave them on a schedule (presence auth signed locally with the app
//! secret). The result is join latency (subscribe to subscription_succeeded),
//! `member_added` latency as seen by observers, and whether every join and
//! leave produced exactly the member events it should.

use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::fleet::{ChurnPlan, Role};
use crate::pusher::Auth;
use crate::report::{PresenceReport, Report};
use crate::stats::{Latency, Percentiles};

use super::{Common, Harness};

#[derive(Debug, Clone, serde::Serialize)]
pub struct PresencePlan {
    pub channels: usize,
    pub observers: usize,
    pub churners: usize,
    /// Joins per second over all churners.
    pub rate: f64,
    pub duration_secs: f64,
}

pub async fn run(common: &Common, plan: PresencePlan) -> anyhow::Result<Report> {
    anyhow::ensure!(
        plan.channels > 0 && plan.churners > 0,
        "need channels and churners"
    );
    anyhow::ensure!(plan.rate > 0.0, "--rate must be positive");
    let params = serde_json::to_value(&plan)?;
    let mut h = Harness::start(common, "presence", params)?;
    let names: Vec<String> = (0..plan.channels)
        .map(|i| format!("presence-bench-{i}"))
        .collect();
    let mut observers_on = vec![0u64; plan.channels];
    let observers = (0..plan.observers)
        .map(|i| {
            observers_on[i % plan.channels] += 1;
            Role::Subscriber {
                channel: names[i % plan.channels].clone(),
                auth: Auth::Presence {
                    user_id: format!("obs-{i}"),
                },
            }
        })
        .collect();
    h.report.connect = h
        .connect(observers, |t| {
            t.subscribed + t.connect_failed + t.subscribe_failed
        })
        .await;

    let (plan_tx, plan_rx) = watch::channel(None);
    let churners = (0..plan.churners)
        .map(|i| Role::Churner {
            channel: names[i % plan.channels].clone(),
            user_id: format!("churn-{i}"),
            observers: observers_on[i % plan.channels],
            slot: i as f64 / plan.churners as f64,
            plan: plan_rx.clone(),
        })
        .collect();
    let churn_connect = h
        .connect(churners, |t| t.connected + t.connect_failed)
        .await;
    h.report.connect.clients += churn_connect.clients;
    h.report.connect.connected += churn_connect.connected;
    h.report.connect.failed += churn_connect.failed;

    // Let the observers' own member_added events settle before counting.
    h.set_phase("settling");
    tokio::time::sleep(Duration::from_secs(1)).await;
    h.open_window();
    let base = h.totals();
    // Each churner joins once per period, so the period sets the join rate.
    let period = Duration::from_secs_f64(plan.churners as f64 / plan.rate);
    let start = Instant::now() + Duration::from_millis(100);
    let duration = Duration::from_secs_f64(plan.duration_secs);
    let _ = plan_tx.send(Some(ChurnPlan {
        start,
        end: start + duration,
        period,
    }));
    h.set_phase("churning");
    // The last leave comes half a period after the last join.
    tokio::time::sleep_until((start + duration + period / 2 + Duration::from_millis(50)).into())
        .await;

    h.set_phase("draining");
    h.wait_for(Duration::from_secs_f64(common.drain_secs), |t| {
        t.member_added - base.member_added >= t.expected_member_added
            && t.member_removed - base.member_removed >= t.expected_member_removed
    })
    .await;
    let end = h.totals();
    h.close_window(None);
    let c = h.collector.borrow();
    let report = PresenceReport {
        channels: plan.channels as u64,
        observers: plan.observers as u64,
        churners: plan.churners as u64,
        joins: end.joins,
        leaves: end.leaves,
        joins_per_sec: end.joins as f64 / plan.duration_secs.max(1e-9),
        join_latency: Percentiles::of(&c.latency(Latency::Join).window),
        member_added_expected: end.expected_member_added,
        member_added_received: end.member_added - base.member_added,
        member_added_latency: Percentiles::of(&c.latency(Latency::MemberAdded).window),
        member_removed_expected: end.expected_member_removed,
        member_removed_received: end.member_removed - base.member_removed,
    };
    drop(c);
    if report.joins == 0 {
        h.report.problems.push("no presence join succeeded".into());
    }
    if report.member_added_received != report.member_added_expected {
        h.report.problems.push(format!(
            "member_added: {} received, {} expected",
            report.member_added_received, report.member_added_expected
        ));
    }
    if report.member_removed_received != report.member_removed_expected {
        h.report.problems.push(format!(
            "member_removed: {} received, {} expected",
            report.member_removed_received, report.member_removed_expected
        ));
    }
    h.report.presence = Some(report);
    Ok(h.finish())
}
