//! The Redis key layout, in one place. Every key of one Pusher channel
//! carries the channel name as its hash tag (`{...}`), so Lua scripts over a
//! channel's keys work on Redis Cluster, where a script may only touch keys
//! of one slot. Channel names cannot contain braces, so the tag is exact.
//!
//! `docs/cluster.md` documents the same layout for operators.

/// Names of every key and pub/sub channel under one prefix (default `belfry`).
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Default for Keys {
    fn default() -> Self {
        Self::new("belfry")
    }
}

impl Keys {
    pub fn new(prefix: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn channel_key(&self, app: &str, channel: &str, suffix: &str) -> String {
        format!("{}:{}:{{{}}}{}", self.prefix, app, channel, suffix)
    }

    /// Pub/sub channel carrying envelopes for one Pusher channel.
    pub fn events(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, "")
    }

    /// Pub/sub channel for cluster-wide control envelopes (terminate).
    pub fn control(&self) -> String {
        format!("{}:{{control}}", self.prefix)
    }

    /// String: the last event of a cache channel (an envelope), with PX = cache TTL.
    pub fn cache(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":cache")
    }

    /// Hash user_id -> `[user_id_json, user_info_json_or_null]` (JSON text).
    pub fn presence_users(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":users")
    }

    /// Hash socket_id -> user_id.
    pub fn presence_sockets(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":sockets")
    }

    /// Hash user_id -> number of that user's sockets on the channel.
    pub fn presence_counts(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":counts")
    }

    /// Sorted set socket_id -> expiry (ms since epoch), refreshed by the socket's node.
    pub fn presence_expiry(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":expiry")
    }

    /// Set of `"{app}\n{channel}"` with presence members, for the coordinator's sweep.
    pub fn presence_index(&self) -> String {
        format!("{}:{{index}}:presence", self.prefix)
    }

    /// Hash node_id -> local subscription count, per channel.
    pub fn occupancy(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":occupancy")
    }

    /// String: the channel's subscriptions summed over nodes, kept by the
    /// occupancy scripts so that they see the 0 -> 1 and 1 -> 0 edges.
    pub fn occupancy_total(&self, app: &str, channel: &str) -> String {
        self.channel_key(app, channel, ":subs")
    }

    /// Stream of webhook jobs, consumed by the coordinator's leader. On a
    /// single Redis the occupancy scripts XADD to it themselves; on a Redis
    /// Cluster it lives in its own slot and the caller adds the job after the
    /// script (see docs/webhooks.md).
    pub fn webhook_queue(&self) -> String {
        format!("{}:{{webhooks}}:queue", self.prefix)
    }

    /// Set of channel names that some node has subscribers on, per app.
    pub fn channel_index(&self, app: &str) -> String {
        format!("{}:{}:{{index}}:channels", self.prefix, app)
    }

    /// Hash app -> connection count, per node (cluster-wide quotas).
    pub fn node_connections(&self, node: &str) -> String {
        format!("{}:{{nodes}}:{}:connections", self.prefix, node)
    }

    /// Set of `"{app}\n{channel}"` this node has subscribers on (cleanup after a crash).
    pub fn node_channels(&self, node: &str) -> String {
        format!("{}:{{nodes}}:{}:channels", self.prefix, node)
    }

    /// Sorted set node_id -> expiry (ms); nodes heartbeat, the coordinator reaps.
    pub fn nodes(&self) -> String {
        format!("{}:{{nodes}}:alive", self.prefix)
    }

    /// The coordinator's leader lock (SET NX PX).
    pub fn leader(&self) -> String {
        format!("{}:{{coordinator}}:leader", self.prefix)
    }
}

/// `"{app}\n{channel}"`, the member form used in index sets.
pub fn index_member(app: &str, channel: &str) -> String {
    format!("{app}\n{channel}")
}

pub fn parse_index_member(member: &str) -> Option<(&str, &str)> {
    member.split_once('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot_tag(key: &str) -> &str {
        let start = key.find('{').unwrap();
        let end = key[start..].find('}').unwrap() + start;
        &key[start + 1..end]
    }

    #[test]
    fn a_channels_keys_share_one_hash_tag() {
        let k = Keys::default();
        let keys = [
            k.events("app", "presence-room"),
            k.cache("app", "presence-room"),
            k.presence_users("app", "presence-room"),
            k.presence_sockets("app", "presence-room"),
            k.presence_counts("app", "presence-room"),
            k.presence_expiry("app", "presence-room"),
            k.occupancy("app", "presence-room"),
            k.occupancy_total("app", "presence-room"),
        ];
        for key in &keys {
            assert_eq!(slot_tag(key), "presence-room", "{key}");
        }
        assert_eq!(k.events("app", "orders"), "belfry:app:{orders}");
    }

    #[test]
    fn index_members_round_trip() {
        assert_eq!(
            parse_index_member(&index_member("a", "presence-x")),
            Some(("a", "presence-x"))
        );
    }
}
