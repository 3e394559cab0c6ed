//! What Pusher's watchlist means on the wire: a signed-in user is online
//! while any connection of theirs is, counted cluster-wide as the members
//! of the internal presence channel `#online`, and the member events of
//! that channel become `online` / `offline` watchlist events for the
//! user's watchers. The node only carries these out (`registry.rs` keeps
//! who watches whom, `connection.rs` joins and leaves `#online`).

/// The internal presence channel whose members are the signed-in users.
/// Clients cannot subscribe to it (`#` names are refused), and it never
/// produces webhooks.
pub const ONLINE_CHANNEL: &str = "#online";

/// A member event of `#online` as a watchlist change: the user, and
/// `"online"` or `"offline"` (the `name` of Pusher's `watchlist_events`).
/// Anything else on the channel means nothing.
pub fn change(event: &str, data: &str) -> Option<(String, &'static str)> {
    let name = match event {
        "pusher_internal:member_added" => "online",
        "pusher_internal:member_removed" => "offline",
        _ => return None,
    };
    match serde_json::from_str::<serde_json::Value>(data)
        .ok()?
        .get("user_id")?
    {
        serde_json::Value::String(user_id) => Some((user_id.clone(), name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_events_of_online_become_watchlist_changes() {
        assert_eq!(
            change("pusher_internal:member_added", r#"{"user_id":"7"}"#),
            Some(("7".to_owned(), "online"))
        );
        assert_eq!(
            change("pusher_internal:member_removed", r#"{"user_id":"7"}"#),
            Some(("7".to_owned(), "offline"))
        );
        assert_eq!(change("client-x", r#"{"user_id":"7"}"#), None);
        assert_eq!(change("pusher_internal:member_added", "not json"), None);
        // Signed-in ids are kept as strings; anything else was not written by a node.
        assert_eq!(
            change("pusher_internal:member_added", r#"{"user_id":7}"#),
            None
        );
    }
}
