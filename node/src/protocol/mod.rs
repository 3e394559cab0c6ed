//! The Pusher protocol 7, free of sockets: channel names, frames in and out,
//! signatures, and the per-connection state machine that turns a client's
//! frames into actions for the connection to carry out.

pub mod auth;
pub mod channel;
pub mod frame;
pub mod session;
pub mod watchlist;

pub use channel::{ChannelKind, ChannelName};
pub use session::{Action, Session};

use std::fmt;

/// A connection's id, `"{a}.{b}"` with two decimal integers as pusher-js expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SocketId(pub u64, pub u64);

impl SocketId {
    pub fn random() -> Self {
        // Unpredictable enough that one client cannot guess another's id
        // (ids are used for exclusion, not for authority).
        use std::hash::{BuildHasher, Hasher};
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0),
        );
        let a = hasher.finish();
        hasher.write_u64(a);
        let b = hasher.finish();
        SocketId(a % 1_000_000_000, b % 1_000_000_000)
    }

    pub fn parse(s: &str) -> Option<Self> {
        let (a, b) = s.split_once('.')?;
        let digits =
            |p: &str| !p.is_empty() && p.len() <= 20 && p.bytes().all(|c| c.is_ascii_digit());
        if !digits(a) || !digits(b) {
            return None;
        }
        Some(SocketId(a.parse().ok()?, b.parse().ok()?))
    }
}

impl fmt::Display for SocketId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.0, self.1)
    }
}

/// Close codes and `pusher:error` codes the server uses (see the reference).
pub mod code {
    pub const APP_NOT_FOUND: u16 = 4001;
    pub const OVER_QUOTA: u16 = 4004;
    pub const INVALID_VERSION: u16 = 4006;
    pub const UNSUPPORTED_PROTOCOL: u16 = 4007;
    pub const UNAUTHORIZED: u16 = 4009;
    pub const OVER_CAPACITY: u16 = 4100;
    pub const RECONNECT: u16 = 4200;
    pub const PONG_TIMEOUT: u16 = 4201;
    pub const CLIENT_EVENT_RATE: u16 = 4301;
    pub const WATCHLIST_LIMIT: u16 = 4302;
    /// WebSocket "message too big".
    pub const TOO_BIG: u16 = 1009;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socket_ids_look_like_pushers() {
        let id = SocketId::random();
        assert_eq!(SocketId::parse(&id.to_string()), Some(id));
        assert_eq!(SocketId::parse("1.2"), Some(SocketId(1, 2)));
        for bad in ["", "1", "1.", ".2", "a.b", "1.2.3", "-1.2", "1 .2"] {
            assert_eq!(SocketId::parse(bad), None, "{bad}");
        }
    }
}
