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

    /// Each channel's subscription count, and whether this node is the one
    /// to report it (a count's webhook goes out from one node, not from
    /// every node that holds subscribers). A single node always is.
    fn counts_to_report(
        &self,
        app: &str,
        channels: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<(usize, bool)>, OccupancyError>> {
        let counts: Vec<_> = channels
            .iter()
            .map(|c| self.subscription_count(app, c))
            .collect();
        Box::pin(async move {
            let mut out = Vec::with_capacity(counts.len());
            for count in counts {
                out.push((count.await?, true));
            }
            Ok(out)
        })
    }

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

/// One app's channels and their subscription counts.
type Counts = HashMap<Box<str>, usize>;

/// Occupancy of one node, in memory: app -> channel -> subscriptions. Nested
/// so each channel costs one name allocation (an idle node may hold one
/// channel per connection).
pub struct LocalOccupancy {
    channels: Mutex<HashMap<Box<str>, Counts>>,
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
        let mut apps = self.channels.lock();
        if !apps.contains_key(app) {
            apps.insert(app.into(), HashMap::new());
        }
        let Some(channels) = apps.get_mut(app) else {
            return false;
        };
        if let Some(n) = channels.get_mut(channel) {
            *n += 1;
            return false;
        }
        channels.insert(channel.into(), 1);
        true
    }

    fn leave_now(&self, app: &str, channel: &str) -> bool {
        let mut apps = self.channels.lock();
        let Some(channels) = apps.get_mut(app) else {
            return false;
        };
        match channels.get_mut(channel) {
            Some(n) if *n > 1 => {
                *n -= 1;
                false
            }
            Some(_) => {
                channels.remove(channel);
                if channels.is_empty() {
                    apps.remove(app);
                }
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
            .get(app)
            .and_then(|channels| channels.get(channel))
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
            .get(app)
            .map(|channels| channels.iter().map(|(c, n)| (c.to_string(), *n)).collect())
            .unwrap_or_default();
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
