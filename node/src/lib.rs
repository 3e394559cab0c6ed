//! Belfry's edge node: Pusher protocol 7 WebSockets and the Pusher HTTP API,
//! over a `Bus` (in-process, or Redis in cluster mode).
//!
//! To follow one event from `POST /apps/{id}/events` to a client's socket:
//! `server.rs` routes the request, `api/` checks and publishes it, the bus
//! hands the envelope to `fanout.rs`, which encodes the frame once, hands
//! it to every shard with a subscriber, and writes each shard's sockets from
//! the subscriber lists in `registry.rs`.

pub mod api;
pub mod config;
pub mod connection;
pub mod edge;
pub mod fanout;
pub mod fuzzing;
pub mod hub;
pub mod leader_watch;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod subscription_count;
pub mod telemetry;
pub mod tls;
pub mod websocket;
