//! Channel names, parsed once at the edge: a `ChannelName` is always valid and
//! knows its kind, so nothing inside the server re-checks a prefix.

use std::fmt;

pub use belfry_coordinator::channel::{ChannelNameError, MAX_CHANNEL_NAME, SERVER_TO_USER_PREFIX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelKind {
    Public,
    Private,
    PrivateEncrypted,
    Presence,
    /// `#server-to-user-{id}`: only the signed-in user `{id}` may join.
    ServerToUser,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ChannelName(Box<str>);

impl ChannelName {
    pub fn parse(name: &str) -> Result<Self, ChannelNameError> {
        belfry_coordinator::channel::check_channel_name(name)?;
        Ok(ChannelName(name.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn kind(&self) -> ChannelKind {
        let n = self.as_str();
        if n.starts_with(SERVER_TO_USER_PREFIX) {
            ChannelKind::ServerToUser
        } else if n.starts_with("private-encrypted-") {
            ChannelKind::PrivateEncrypted
        } else if n.starts_with("private-") {
            ChannelKind::Private
        } else if n.starts_with("presence-") {
            ChannelKind::Presence
        } else {
            ChannelKind::Public
        }
    }

    /// Cache channels replay their last event to new subscribers.
    pub fn is_cache(&self) -> bool {
        belfry_coordinator::is_cache_channel(self.as_str())
    }

    /// Whether subscribing needs an `auth` signature.
    pub fn needs_auth(&self) -> bool {
        matches!(
            self.kind(),
            ChannelKind::Private | ChannelKind::PrivateEncrypted | ChannelKind::Presence
        )
    }

    /// The user a `#server-to-user-` channel belongs to.
    pub fn server_to_user_id(&self) -> Option<&str> {
        self.as_str().strip_prefix(SERVER_TO_USER_PREFIX)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(n: &str) -> ChannelKind {
        ChannelName::parse(n).unwrap().kind()
    }

    #[test]
    fn kinds_come_from_prefixes() {
        assert_eq!(kind("orders"), ChannelKind::Public);
        assert_eq!(kind("cache-orders"), ChannelKind::Public);
        assert_eq!(kind("private-user.1"), ChannelKind::Private);
        assert_eq!(kind("private-cache-user.1"), ChannelKind::Private);
        assert_eq!(kind("private-encrypted-x"), ChannelKind::PrivateEncrypted);
        assert_eq!(
            kind("private-encrypted-cache-x"),
            ChannelKind::PrivateEncrypted
        );
        assert_eq!(kind("presence-room"), ChannelKind::Presence);
        assert_eq!(kind("presence-cache-room"), ChannelKind::Presence);
        assert_eq!(kind("#server-to-user-42"), ChannelKind::ServerToUser);
        // "privately" is not "private-"
        assert_eq!(kind("privately"), ChannelKind::Public);
    }

    #[test]
    fn cache_channels_are_recognised() {
        for n in [
            "cache-a",
            "private-cache-a",
            "presence-cache-a",
            "private-encrypted-cache-a",
        ] {
            assert!(ChannelName::parse(n).unwrap().is_cache(), "{n}");
        }
        for n in ["a", "private-a", "cachex"] {
            assert!(!ChannelName::parse(n).unwrap().is_cache(), "{n}");
        }
    }

    #[test]
    fn bad_names_are_refused() {
        assert_eq!(ChannelName::parse(""), Err(ChannelNameError::Empty));
        assert_eq!(
            ChannelName::parse(&"a".repeat(165)),
            Err(ChannelNameError::TooLong)
        );
        assert!(ChannelName::parse(&"a".repeat(164)).is_ok());
        assert_eq!(
            ChannelName::parse("a b"),
            Err(ChannelNameError::BadCharacter(' '))
        );
        assert_eq!(
            ChannelName::parse("a#b"),
            Err(ChannelNameError::BadCharacter('#'))
        );
        assert_eq!(
            ChannelName::parse("#server-to-user-"),
            Err(ChannelNameError::Empty)
        );
        assert_eq!(
            ChannelName::parse("#server-to-user-7")
                .unwrap()
                .server_to_user_id(),
            Some("7")
        );
    }
}
