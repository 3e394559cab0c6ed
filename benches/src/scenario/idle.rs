//! `idle`: N subscribed connections that receive nothing; the result is the
//! server's resident memory per connection (RSS after minus RSS before,
//! divided by the connections) and how fast they connected.

use std::time::Duration;

use crate::fleet::Role;
use crate::procfs;
use crate::pusher::Auth;
use crate::report::{IdleReport, Report};

use super::{Common, Harness};

#[derive(Debug, Clone, serde::Serialize)]
pub struct IdlePlan {
    pub clients: usize,
    /// Seconds to wait after the last subscription before sampling RSS.
    pub settle_secs: f64,
    /// All clients on one channel instead of one channel each.
    pub shared_channel: bool,
}

pub async fn run(common: &Common, plan: IdlePlan) -> anyhow::Result<Report> {
    let params = serde_json::to_value(&plan)?;
    let server = common.server_pid.first().copied();
    if server.is_none() {
        eprintln!("idle: without --server-pid only the connect rate is measured");
    }
    let rss = || {
        server
            .and_then(|p| procfs::sample(&p.to_string()))
            .map(|s| s.rss_bytes)
    };
    let before = rss();
    let mut h = Harness::start(common, "idle", params)?;
    let prefix = if common.private { "private-" } else { "" };
    let auth = if common.private {
        Auth::Private
    } else {
        Auth::Public
    };
    let roles = (0..plan.clients)
        .map(|i| Role::Subscriber {
            channel: if plan.shared_channel {
                format!("{prefix}idle")
            } else {
                format!("{prefix}idle-{i}")
            },
            auth: auth.clone(),
        })
        .collect();
    h.open_window();
    h.report.connect = h
        .connect(roles, |t| {
            t.subscribed + t.connect_failed + t.subscribe_failed
        })
        .await;
    h.set_phase("settling");
    tokio::time::sleep(Duration::from_secs_f64(plan.settle_secs)).await;
    let after = rss();
    h.close_window(None);
    if let (Some(b), Some(a)) = (before, after) {
        let n = h.report.connect.subscribed;
        h.report.idle = Some(IdleReport {
            connections: n,
            server_rss_before_kib: b / 1024,
            server_rss_after_kib: a / 1024,
            rss_bytes_per_connection: a.saturating_sub(b) as f64 / n.max(1) as f64,
        });
    }
    let still_open = h.totals();
    if still_open.disconnected > 0 {
        let n = still_open.disconnected;
        h.report
            .problems
            .push(format!("{n} idle connections were closed"));
    }
    Ok(h.finish())
}
