//! `fanout`, `spread` and `cluster`: subscribers on one or many channels and
//! a publisher at a fixed rate; the result is deliveries/s, loss, duplicates
//! and end-to-end latency.
//!
//! fanout = every client on one channel; spread = every client on its own
//! channel and events to random channels; cluster = either shape with the
//! clients spread over several `--ws` nodes while events go in through
//! another node's `--http` API.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use crate::fleet::Role;
use crate::publish::{ChannelChoice, Pacer, PublishStats};
use crate::pusher::Auth;
use crate::report::{DeliveryReport, PublishReport, Report};
use crate::stats::{Latency, Percentiles};

use super::{Common, Harness};

/// One broadcast run's shape.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BroadcastPlan {
    pub clients: usize,
    /// 1 = fan-out to everyone; otherwise clients are spread over this many channels.
    pub channels: usize,
    /// Events per second (HTTP requests per second).
    pub rate: f64,
    pub duration_secs: f64,
}

/// Subscribed clients and a pacer publishing to their channels: how `fanout`,
/// `spread`, `cluster` and `ramp` all begin.
pub struct Publishing {
    pub layout: Layout,
    pub stats: Rc<RefCell<PublishStats>>,
    pub pacer: Pacer,
    pub choice: ChannelChoice,
}

impl Publishing {
    /// Connects and subscribes `clients` over `channels`; `None` (with the
    /// problem recorded in the report) when no client subscribed.
    pub async fn subscribe(
        h: &mut Harness,
        common: &Common,
        clients: usize,
        channels: usize,
    ) -> anyhow::Result<Option<Publishing>> {
        let mut layout = Layout::new(clients, channels, common.private);
        let roles = std::mem::take(&mut layout.roles);
        h.report.connect = h
            .connect(roles, |t| {
                t.subscribed + t.connect_failed + t.subscribe_failed
            })
            .await;
        if h.report.connect.subscribed == 0 {
            h.report.problems.push("no client subscribed".into());
            return Ok(None);
        }
        let stats = Rc::new(RefCell::new(PublishStats::new(layout.names.len())));
        *h.progress.publish.borrow_mut() = Some(stats.clone());
        let pacer = Pacer::new(
            common.publisher().await?,
            layout.names.clone(),
            common.publish_lanes,
            common.payload_bytes,
        );
        let choice = layout.choice();
        Ok(Some(Publishing {
            layout,
            stats,
            pacer,
            choice,
        }))
    }
}

/// Channel names and each client's channel, shared with `ramp`.
pub struct Layout {
    pub names: Vec<String>,
    pub subscribers: Vec<u64>,
    pub roles: Vec<Role>,
}

impl Layout {
    pub fn new(clients: usize, channels: usize, private: bool) -> Self {
        let channels = channels.clamp(1, clients.max(1));
        let prefix = if private { "private-" } else { "" };
        let names: Vec<String> = if channels == 1 {
            vec![format!("{prefix}bench-fanout")]
        } else {
            (0..channels)
                .map(|i| format!("{prefix}bench-{i}"))
                .collect()
        };
        let auth = if private { Auth::Private } else { Auth::Public };
        let mut subscribers = vec![0u64; channels];
        let roles = (0..clients)
            .map(|i| {
                subscribers[i % channels] += 1;
                Role::Subscriber {
                    channel: names[i % channels].clone(),
                    auth: auth.clone(),
                }
            })
            .collect();
        Layout {
            names,
            subscribers,
            roles,
        }
    }

    pub fn choice(&self) -> ChannelChoice {
        if self.names.len() == 1 {
            ChannelChoice::Single
        } else {
            ChannelChoice::Random {
                n: self.names.len(),
                state: 0x2545_F491_4F6C_DD1D,
            }
        }
    }

    /// Deliveries that the accepted events should cause.
    pub fn expected(&self, accepted_per_channel: &[u64]) -> u64 {
        accepted_per_channel
            .iter()
            .zip(&self.subscribers)
            .map(|(a, s)| a * s)
            .sum()
    }
}

pub async fn run(common: &Common, scenario: &str, plan: BroadcastPlan) -> anyhow::Result<Report> {
    let params = serde_json::to_value(&plan)?;
    let mut h = Harness::start(common, scenario, params)?;
    let Some(Publishing {
        layout,
        stats,
        mut pacer,
        mut choice,
    }) = Publishing::subscribe(&mut h, common, plan.clients, plan.channels).await?
    else {
        return Ok(h.finish());
    };
    h.set_phase(scenario);
    h.open_window();
    let base = h.totals();
    let start = Instant::now();
    pacer
        .run(
            plan.rate,
            Duration::from_secs_f64(plan.duration_secs),
            &mut choice,
            &stats,
        )
        .await;
    // The schedule spans the whole duration even though its last event is
    // sent one interval before the end.
    let publish_secs = start.elapsed().as_secs_f64().max(plan.duration_secs);

    h.set_phase("draining");
    let expected = layout.expected(&stats.borrow().accepted_per_channel);
    h.wait_for(Duration::from_secs_f64(common.drain_secs), |t| {
        t.deliveries - base.deliveries >= expected
    })
    .await;
    let delivery_secs = start.elapsed().as_secs_f64().max(plan.duration_secs);
    let end = h.totals();
    let received = end.deliveries - base.deliveries;
    h.close_window(Some(received));

    h.report.publish = Some(PublishReport::from_stats(
        plan.rate,
        publish_secs,
        &stats.borrow(),
    ));
    h.report.delivery = Some(DeliveryReport {
        expected,
        received,
        lost: expected.saturating_sub(received),
        duplicates: end.duplicates - base.duplicates,
        per_sec: received as f64 / delivery_secs.max(1e-9),
    });
    h.report.latency = Some(Percentiles::of(
        &h.collector.borrow().latency(Latency::Delivery).window,
    ));
    add_delivery_problems(&mut h.report);
    Ok(h.finish())
}

/// `--check` verdicts shared by delivery scenarios.
pub fn add_delivery_problems(report: &mut Report) {
    if let Some(d) = &report.delivery {
        if d.received == 0 {
            report.problems.push("nothing was delivered".into());
        }
        if d.lost > 0 {
            report.problems.push(format!("{} deliveries lost", d.lost));
        }
        if d.duplicates > 0 {
            report
                .problems
                .push(format!("{} duplicate deliveries", d.duplicates));
        }
    }
    if let Some(p) = &report.publish {
        if p.failed > 0 {
            report
                .problems
                .push(format!("{} publish requests failed", p.failed));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_spreads_clients_and_counts_expected_deliveries() {
        let l = Layout::new(10, 3, false);
        assert_eq!(l.names, vec!["bench-0", "bench-1", "bench-2"]);
        assert_eq!(l.subscribers, vec![4, 3, 3]);
        assert_eq!(l.expected(&[1, 2, 0]), 4 + 6);
        let f = Layout::new(5, 1, true);
        assert_eq!(f.names, vec!["private-bench-fanout"]);
        assert_eq!(f.expected(&[7]), 35);
    }
}
