//! Belfry's edge node: Pusher protocol 7 WebSockets and the Pusher HTTP API,
//! over a `Bus` (in-process, or Redis in cluster mode).
//!
//! To follow one event from `POST /apps/{id}/events` to a client's socket:
//! `server.rs` routes the request, `api/` checks and publishes it, the bus
//! hands the envelope to `registry.rs`, which encodes the frame once and
//! queues it to each subscriber, and `connection.rs` writes it.

pub mod api;
pub mod config;
pub mod connection;
pub mod edge;
pub mod hub;
pub mod node;
pub mod outbox;
pub mod protocol;
pub mod registry;
pub mod server;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod websocket;
