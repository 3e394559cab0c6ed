//! The Pusher channel name rules, in the crate every publisher links, so the
//! node's edge and `belfry-coordinator publish` refuse the same names.

pub const MAX_CHANNEL_NAME: usize = 164;
pub const SERVER_TO_USER_PREFIX: &str = "#server-to-user-";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelNameError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_NAME} characters")]
    TooLong,
    #[error("channel name has a character outside [A-Za-z0-9_-=@,.;]: {0:?}")]
    BadCharacter(char),
}

fn allowed(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '=' | '@' | ',' | '.' | ';')
}

/// Whether `name` is a channel a Pusher client could subscribe to.
pub fn check_channel_name(name: &str) -> Result<(), ChannelNameError> {
    if name.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if name.len() > MAX_CHANNEL_NAME {
        return Err(ChannelNameError::TooLong);
    }
    let rest = name.strip_prefix(SERVER_TO_USER_PREFIX).unwrap_or(name);
    if rest.is_empty() {
        return Err(ChannelNameError::Empty);
    }
    if let Some(bad) = rest.chars().find(|c| !allowed(*c)) {
        return Err(ChannelNameError::BadCharacter(bad));
    }
    Ok(())
}
