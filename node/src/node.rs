//! The node: configuration, the local registry, the bus and the presence
//! store, wired together once at start and shared by every connection and
//! request. It also owns admission (who may connect) and the drain.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use belfry_coordinator::{Bus, CacheTtl, LocalBus, MemoryPresence, PresenceStore};
use parking_lot::Mutex;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::connection::ConnHandle;
use crate::protocol::{code, SocketId};
use crate::registry::{AppRegistry, Registry};
use crate::shutdown::Shutdown;

pub struct Node {
    pub config: Config,
    pub registry: Arc<Registry>,
    pub bus: Arc<dyn Bus>,
    pub presence: Arc<dyn PresenceStore>,
    pub shutdown: Shutdown,
    /// Connection tasks, so the drain can wait for them.
    pub tasks: TaskTracker,
    connections: Mutex<HashMap<SocketId, ConnHandle>>,
}

/// Why a WebSocket is refused before it starts: the close code, the message
/// and the metric label.
pub struct Refusal {
    pub code: u16,
    pub message: String,
    pub reason: &'static str,
}

impl Node {
    /// A single node with the in-process bus and in-memory presence.
    pub fn embedded(config: Config) -> Arc<Node> {
        let registry = Arc::new(Registry::new(&config.apps));
        let ttl = CacheTtl {
            by_app: config
                .apps
                .iter()
                .map(|a| (a.id.clone(), Duration::from_secs(a.cache_ttl_secs)))
                .collect(),
            default: Duration::from_secs(1800),
        };
        let bus = Arc::new(LocalBus::new(registry.clone(), ttl));
        Self::new(config, registry, bus, Arc::new(MemoryPresence::default()))
    }

    pub fn new(
        config: Config,
        registry: Arc<Registry>,
        bus: Arc<dyn Bus>,
        presence: Arc<dyn PresenceStore>,
    ) -> Arc<Node> {
        Arc::new(Node {
            config,
            registry,
            bus,
            presence,
            shutdown: Shutdown::default(),
            tasks: TaskTracker::new(),
            connections: Mutex::new(HashMap::new()),
        })
    }

    pub fn is_ready(&self) -> bool {
        !self.shutdown.is_draining() && self.bus.is_ready()
    }

    /// Decides whether a new WebSocket for `app` may start, and counts it if so.
    pub fn admit(&self, app: &AppRegistry) -> Result<(), Refusal> {
        let refuse = |code, message: &str, reason| {
            Err(Refusal {
                code,
                message: message.to_owned(),
                reason,
            })
        };
        if self.shutdown.is_draining() {
            return refuse(code::OVER_CAPACITY, "Server is shutting down", "draining");
        }
        let max = self.config.max_connections;
        if max > 0 && self.registry.total_connections() >= max {
            return refuse(code::OVER_CAPACITY, "Server is over capacity", "capacity");
        }
        if self.config.max_memory_mb > 0
            && resident_mb().is_some_and(|mb| mb >= self.config.max_memory_mb)
        {
            return refuse(
                code::OVER_CAPACITY,
                "Server is over its memory ceiling",
                "memory",
            );
        }
        if !app.try_open_connection() {
            return refuse(
                code::OVER_QUOTA,
                "Application is over connection quota",
                "app_quota",
            );
        }
        Ok(())
    }

    pub fn track(&self, handle: ConnHandle) {
        self.connections.lock().insert(handle.socket_id, handle);
    }

    pub fn untrack(&self, socket_id: SocketId) {
        self.connections.lock().remove(&socket_id);
    }

    /// Closes every connection with 4200 so clients reconnect elsewhere.
    pub fn close_all_for_shutdown(&self) -> usize {
        let handles: Vec<ConnHandle> = self.connections.lock().values().cloned().collect();
        for handle in &handles {
            handle.close(
                code::RECONNECT,
                "Server is shutting down; reconnect",
                "shutdown",
            );
        }
        handles.len()
    }
}

/// This process's resident memory in MiB, from /proc.
pub fn resident_mb() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096 / (1024 * 1024))
}
