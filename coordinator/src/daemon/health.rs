//! What a coordinator replica answers on its metrics port's probes (the port
//! itself is `crate::metrics_server`, shared with the nodes). Readiness is
//! Redis being reachable, not leadership: a follower is as ready as the
//! leader, it is waiting.

use hyper::StatusCode;
use tokio::sync::watch;

use crate::metrics_server::{Probe, Probes};
use crate::redis::Redis;

pub struct Health {
    pub(super) redis: Redis,
    pub(super) leader: watch::Receiver<bool>,
}

impl Health {
    fn role(&self) -> &'static str {
        if *self.leader.borrow() {
            "leader"
        } else {
            "follower"
        }
    }
}

impl Probes for Health {
    fn healthz(&self) -> Probe {
        let role = self.role();
        Probe::json(
            StatusCode::OK,
            format!(r#"{{"status":"ok","role":"{role}"}}"#),
        )
    }

    fn readyz(&self) -> Probe {
        if self.redis.is_healthy() {
            let role = self.role();
            Probe::json(
                StatusCode::OK,
                format!(r#"{{"status":"ready","role":"{role}"}}"#),
            )
        } else {
            Probe::json(
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"status":"unavailable","reason":"redis unreachable"}"#,
            )
        }
    }

    fn not_found(&self, _path: &str) -> Probe {
        Probe::json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#)
    }
}
