//! Presence membership: who is on a presence channel, counted per *user*
//! rather than per connection.
//!
//! `join` and `leave` report whether the user (not the connection) appeared
//! or disappeared, so that `member_added` and `member_removed` are announced
//! exactly once however many tabs a user has open. `MemoryPresence` serves a
//! single node; the Redis store does the same with Lua scripts cluster-wide.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::future::BoxFuture;
use parking_lot::Mutex;

use crate::webhook::{Job, Sink};

/// One member as the protocol shows it. `user_id_json` keeps the id's JSON
/// type (Laravel sends integers and Echo keys members by them); `user_id` is
/// its string form, the identity that tabs of one user share.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresenceMember {
    pub user_id: String,
    pub user_id_json: String,
    /// JSON text of user_info, if any.
    pub user_info: Option<String>,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum PresenceError {
    #[error("presence store unavailable: {0}")]
    Unavailable(String),
    #[error("presence channel is full ({0} members)")]
    Full(usize),
}

/// Result of a join: whether this was the user's first connection, and the
/// member list to send in `subscription_succeeded` (including the joiner).
#[derive(Debug, Clone)]
pub struct Joined {
    pub user_added: bool,
    pub members: Vec<PresenceMember>,
}

pub trait PresenceStore: Send + Sync + 'static {
    /// Add `socket_id`'s membership. Refuses a new user when `max_members`
    /// distinct users are already present.
    fn join(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
        max_members: usize,
    ) -> BoxFuture<'static, Result<Joined, PresenceError>>;

    /// Remove `socket_id`'s membership. Returns the member if that was the
    /// user's last connection on the channel.
    fn leave(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
    ) -> BoxFuture<'static, Result<Option<PresenceMember>, PresenceError>>;

    /// Like `join` with no member limit, for bookkeeping that never sends a
    /// member list (who is online, for watchlists): only whether the user
    /// was added. Stores where the list is costly override it.
    fn track(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
    ) -> BoxFuture<'static, Result<bool, PresenceError>> {
        let joined = self.join(app, channel, socket_id, member, usize::MAX);
        Box::pin(async move { joined.await.map(|j| j.user_added) })
    }

    /// Which of `user_ids` are on the channel now.
    fn present(
        &self,
        app: &str,
        channel: &str,
        user_ids: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<String>, PresenceError>>;

    /// The distinct users on a channel.
    fn members(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Vec<PresenceMember>, PresenceError>>;

    /// Stops refreshing this node's memberships (shutdown). Nothing to do in memory.
    fn close(&self) -> BoxFuture<'static, ()> {
        Box::pin(async {})
    }
}

#[derive(Default)]
struct ChannelMembers {
    /// user_id -> (member, number of this user's connections)
    users: HashMap<String, (PresenceMember, usize)>,
    /// socket_id -> user_id
    sockets: HashMap<String, String>,
}

/// Presence for one node, in memory.
#[derive(Default)]
pub struct MemoryPresence {
    channels: Mutex<HashMap<(String, String), ChannelMembers>>,
    /// Where `member_added` / `member_removed` webhook jobs go, if anywhere.
    webhooks: Option<Arc<dyn Sink>>,
}

impl MemoryPresence {
    /// A store whose membership edges (a user's first connection to a
    /// channel, and their last) are handed to `sink` as webhook jobs.
    pub fn with_webhooks(sink: Arc<dyn Sink>) -> Self {
        Self {
            channels: Mutex::default(),
            webhooks: Some(sink),
        }
    }

    fn member_job(&self, app: &str, channel: &str, name: &str, user_id: &str) {
        if let Some(sink) = &self.webhooks {
            let mut job = Job::new(app, channel, name);
            job.user_id = Some(user_id.to_owned());
            sink.send(job);
        }
    }

    fn join_now(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
        max_members: usize,
    ) -> Result<Joined, PresenceError> {
        let mut channels = self.channels.lock();
        let entry = channels
            .entry((app.to_owned(), channel.to_owned()))
            .or_default();
        if let Some(previous) = entry.sockets.get(socket_id).cloned() {
            // Re-joining from the same socket is a no-op for membership.
            if previous == member.user_id {
                return Ok(Joined {
                    user_added: false,
                    members: entry.users.values().map(|(m, _)| m.clone()).collect(),
                });
            }
        }
        let known = entry.users.contains_key(&member.user_id);
        if !known && entry.users.len() >= max_members {
            return Err(PresenceError::Full(max_members));
        }
        entry
            .sockets
            .insert(socket_id.to_owned(), member.user_id.clone());
        let slot = entry
            .users
            .entry(member.user_id.clone())
            .or_insert_with(|| (member.clone(), 0));
        slot.1 += 1;
        // The latest user_info wins, as the newest auth is the freshest.
        slot.0 = member;
        Ok(Joined {
            user_added: !known,
            members: entry.users.values().map(|(m, _)| m.clone()).collect(),
        })
    }

    fn leave_now(&self, app: &str, channel: &str, socket_id: &str) -> Option<PresenceMember> {
        let mut channels = self.channels.lock();
        let key = (app.to_owned(), channel.to_owned());
        let entry = channels.get_mut(&key)?;
        let user_id = entry.sockets.remove(socket_id)?;
        let mut removed = None;
        if let Some(slot) = entry.users.get_mut(&user_id) {
            slot.1 -= 1;
            if slot.1 == 0 {
                removed = entry.users.remove(&user_id).map(|(m, _)| m);
            }
        }
        if entry.sockets.is_empty() {
            channels.remove(&key);
        }
        removed
    }
}

impl PresenceStore for MemoryPresence {
    fn present(
        &self,
        app: &str,
        channel: &str,
        user_ids: Vec<String>,
    ) -> BoxFuture<'static, Result<Vec<String>, PresenceError>> {
        let channels = self.channels.lock();
        let here: Vec<String> = match channels.get(&(app.to_owned(), channel.to_owned())) {
            Some(c) => user_ids
                .into_iter()
                .filter(|u| c.users.contains_key(u))
                .collect(),
            None => Vec::new(),
        };
        Box::pin(async move { Ok(here) })
    }

    fn join(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
        member: PresenceMember,
        max_members: usize,
    ) -> BoxFuture<'static, Result<Joined, PresenceError>> {
        let user_id = member.user_id.clone();
        let result = self.join_now(app, channel, socket_id, member, max_members);
        if matches!(&result, Ok(j) if j.user_added) {
            self.member_job(app, channel, "member_added", &user_id);
        }
        Box::pin(async move { result })
    }

    fn leave(
        &self,
        app: &str,
        channel: &str,
        socket_id: &str,
    ) -> BoxFuture<'static, Result<Option<PresenceMember>, PresenceError>> {
        let result = self.leave_now(app, channel, socket_id);
        if let Some(member) = &result {
            self.member_job(app, channel, "member_removed", &member.user_id);
        }
        Box::pin(async move { Ok(result) })
    }

    fn members(
        &self,
        app: &str,
        channel: &str,
    ) -> BoxFuture<'static, Result<Vec<PresenceMember>, PresenceError>> {
        let members = self
            .channels
            .lock()
            .get(&(app.to_owned(), channel.to_owned()))
            .map(|c| c.users.values().map(|(m, _)| m.clone()).collect())
            .unwrap_or_default();
        Box::pin(async move { Ok(members) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(id: &str) -> PresenceMember {
        PresenceMember {
            user_id: id.into(),
            user_id_json: id.into(),
            user_info: None,
        }
    }

    #[test]
    fn a_user_with_two_tabs_is_one_member() {
        let p = MemoryPresence::default();
        assert!(
            p.join_now("a", "presence-x", "1.1", member("7"), 100)
                .unwrap()
                .user_added
        );
        let second = p
            .join_now("a", "presence-x", "1.2", member("7"), 100)
            .unwrap();
        assert!(!second.user_added);
        assert_eq!(second.members.len(), 1);
        assert_eq!(p.leave_now("a", "presence-x", "1.1"), None);
        assert_eq!(p.leave_now("a", "presence-x", "1.2"), Some(member("7")));
        assert_eq!(p.leave_now("a", "presence-x", "1.2"), None);
    }

    #[test]
    fn a_full_channel_refuses_new_users_but_not_new_tabs() {
        let p = MemoryPresence::default();
        p.join_now("a", "presence-x", "1.1", member("1"), 1)
            .unwrap();
        assert!(matches!(
            p.join_now("a", "presence-x", "1.2", member("2"), 1),
            Err(PresenceError::Full(1))
        ));
        assert!(p.join_now("a", "presence-x", "1.3", member("1"), 1).is_ok());
    }

    #[test]
    fn rejoining_from_one_socket_does_not_double_count() {
        let p = MemoryPresence::default();
        p.join_now("a", "presence-x", "1.1", member("1"), 10)
            .unwrap();
        p.join_now("a", "presence-x", "1.1", member("1"), 10)
            .unwrap();
        assert_eq!(p.leave_now("a", "presence-x", "1.1"), Some(member("1")));
    }
}
