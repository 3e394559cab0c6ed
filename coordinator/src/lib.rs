//! Belfry's cluster state: the bus envelope every node and publisher agrees on,
//! the `Bus` and `PresenceStore` seams the edge node is written against, and
//! their in-process implementations for the single-node default.
//!
//! The Redis implementations and the `belfry-coordinator` daemon live here too,
//! so that every byte layout in Redis has exactly one owner; and so does the
//! metrics port (`metrics_server`), which both binaries serve.

pub mod bus;
pub mod channel;
pub mod dotenv;
pub mod envelope;
pub mod fuzzing;
pub mod keys;
pub mod logging;
pub mod metrics_server;
pub mod presence;

pub use bus::{is_cache_channel, Bus, BusError, CacheTtl, Delivery, LocalBus};
pub use envelope::{Envelope, EnvelopeKind, ENVELOPE_VERSION};
pub use presence::{MemoryPresence, PresenceError, PresenceMember, PresenceStore};
pub mod redis;

pub mod daemon;
pub mod publisher;

pub use publisher::Publisher;
pub use redis::presence::RedisPresence;

pub mod occupancy;
pub mod webhook;

pub use occupancy::{LocalOccupancy, Occupancy, OccupancyError};
