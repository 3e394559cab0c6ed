//! Occupancy: how many subscriptions each channel has and how many
//! connections each app has, and the `channel_occupied` / `channel_vacated`
//! edges of a channel's subscription count.
//!
//! `LocalOccupancy` counts in memory for a single node; `RedisOccupancy`
//! (in `redis::occupancy`) counts cluster-wide with Lua scripts that decide
//! each edge atomically. Both hand every edge to a `webhook::Sink`, so the
//! node does not know which one it has, nor whether anyone listens.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use crate::webhook::{Job, Sink};

#[derive(Debug, Clone, thiserror::Error)]
pub enum OccupancyError {
    #[error("occupancy store unavailable: {0}")]
    Unavailable(String),
}

pub trait Occupancy: Send + Sync + 'static {
    /// One more local subscription on `channel`; counted before
    /// `subscription_succeeded` goes out.
    fn joined(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>>;

    /// One local subscription on `channel` ended.
    fn left(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>>;

    /// Subscriptions on `channel`, cluster-wide where there is a cluster.
    fn subscription_count(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<usize, OccupancyError>>;

    /// Every occupied channel of `app` with its subscription count.
    fn channels(
        &self,
        app: &str,
    ) -> BoxFuture<'static, Result<Vec<(String, usize)>, OccupancyError>>;

    fn connection_opened(&self, app: &str);
    fn connection_closed(&self, app: &str);

    /// Connections of `app` elsewhere in the cluster (0 on a single node),
    /// for per-app quotas.
    fn others_connections(&self, app: &str) -> usize;

    /// Takes this node off the books (graceful shutdown) and stops any tasks.
    fn close(&self) -> BoxFuture<'static, ()>;
}

/// Occupancy of one node, in memory.
pub struct LocalOccupancy {
    channels: Mutex<HashMap<(String, String), usize>>,
    sink: Arc<dyn Sink>,
}

impl LocalOccupancy {
    pub fn new(sink: Arc<dyn Sink>) -> Self {
        Self {
            channels: Mutex::new(HashMap::new()),
            sink,
        }
    }

    fn join_now(&self, app: &str, channel: &str) -> bool {
        let mut channels = self.channels.lock();
        let n = channels
            .entry((app.to_owned(), channel.to_owned()))
            .or_default();
        *n += 1;
        *n == 1
    }

    fn leave_now(&self, app: &str, channel: &str) -> bool {
        let mut channels = self.channels.lock();
        let key = (app.to_owned(), channel.to_owned());
        match channels.get_mut(&key) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                channels.remove(&key);
                true
            }
            None => false,
        }
    }
}

fn ready<T: Send + 'static>(value: T) -> BoxFuture<'static, T> {
    Box::pin(async move { value })
}

impl Occupancy for LocalOccupancy {
    fn joined(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>> {
        if self.join_now(app, channel) {
            self.sink.send(Job::new(app, channel, "channel_occupied"));
        }
        ready(Ok(()))
    }

    fn left(&self, app: &str, channel: &str) -> BoxFuture<'static, Result<(), OccupancyError>> {
        if self.leave_now(app, channel) {
            self.sink.send(Job::new(app, channel, "channel_vacated"));
        }
        ready(Ok(()))
    }

    fn subscription_count(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<usize, OccupancyError>> {
        let n = self
            .channels
            .lock()
            .get(&(app.to_owned(), channel.to_owned()))
            .copied()
            .unwrap_or(0);
        ready(Ok(n))
    }

    fn channels(
        &self,
        app: &str,
    ) -> BoxFuture<'static, Result<Vec<(String, usize)>, OccupancyError>> {
        let out = self
            .channels
            .lock()
            .iter()
            .filter(|((a, _), _)| a == app)
            .map(|((_, c), n)| (c.clone(), *n))
            .collect();
        ready(Ok(out))
    }

    // Connections are counted by the node's registry on a single node.
    fn connection_opened(&self, _app: &str) {}
    fn connection_closed(&self, _app: &str) {}
    fn others_connections(&self, _app: &str) -> usize {
        0
    }

    fn close(&self) -> BoxFuture<'static, ()> {
        ready(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::webhook::Sink;

    #[derive(Default)]
    struct Recorded(Mutex<Vec<String>>);
    impl Sink for Recorded {
        fn send(&self, job: Job) {
            self.0.lock().push(format!("{} {}", job.name, job.channel));
        }
    }

    #[tokio::test]
    async fn occupied_and_vacated_once_per_edge() {
        let jobs = Arc::new(Recorded::default());
        let o = LocalOccupancy::new(jobs.clone());
        o.joined("a", "c").await.unwrap();
        o.joined("a", "c").await.unwrap();
        o.left("a", "c").await.unwrap();
        o.left("a", "c").await.unwrap();
        // A leave that was never joined is not a second vacated.
        o.left("a", "c").await.unwrap();
        o.joined("a", "c").await.unwrap();
        assert_eq!(
            *jobs.0.lock(),
            [
                "channel_occupied c",
                "channel_vacated c",
                "channel_occupied c"
            ]
        );
        assert_eq!(o.subscription_count("a", "c").await.unwrap(), 1);
        assert_eq!(o.channels("a").await.unwrap(), vec![("c".to_owned(), 1)]);
    }
}
