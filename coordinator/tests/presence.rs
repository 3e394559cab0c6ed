//! `RedisPresence` against a real redis-server: members counted per user
//! across nodes, limits, JSON id types, and restoring a node's members after
//! Redis restarts empty.

mod support;

use std::time::Duration;

use belfry_coordinator::keys::{index_member, Keys};
use belfry_coordinator::{PresenceError, PresenceMember, PresenceStore, RedisPresence};
use fred::prelude::*;
use support::{eventually, RedisServer};

const TTL: Duration = Duration::from_secs(30);

fn member(id_json: &str, info: Option<&str>) -> PresenceMember {
    let user_id = serde_json::from_str::<serde_json::Value>(id_json)
        .map(|v| match v {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        })
        .unwrap();
    PresenceMember {
        user_id,
        user_id_json: id_json.into(),
        user_info: info.map(str::to_owned),
    }
}

fn sorted(mut members: Vec<PresenceMember>) -> Vec<PresenceMember> {
    members.sort_by(|a, b| a.user_id.cmp(&b.user_id));
    members
}

#[tokio::test]
async fn a_user_is_one_member_however_many_connections_and_nodes() {
    let server = RedisServer::start();
    let node_a = RedisPresence::new(server.connect().await, Keys::default(), "a", TTL);
    let node_b = RedisPresence::new(server.connect().await, Keys::default(), "b", TTL);
    let ada = member("1", Some(r#"{"name":"Ada"}"#));
    let bob = member("2", None);

    let first = node_a
        .join("app", "presence-room", "a.1", ada.clone(), 100)
        .await
        .unwrap();
    assert!(first.user_added);
    assert_eq!(first.members, vec![ada.clone()]);

    // Same user, second tab, on another node: no second member_added.
    let second = node_b
        .join("app", "presence-room", "b.1", ada.clone(), 100)
        .await
        .unwrap();
    assert!(!second.user_added);
    assert_eq!(second.members, vec![ada.clone()]);

    let third = node_b
        .join("app", "presence-room", "b.2", bob.clone(), 100)
        .await
        .unwrap();
    assert!(third.user_added);
    assert_eq!(sorted(third.members), vec![ada.clone(), bob.clone()]);
    assert_eq!(
        sorted(node_a.members("app", "presence-room").await.unwrap()),
        vec![ada.clone(), bob.clone()]
    );

    // Ada leaves only with her last connection, wherever it is.
    assert_eq!(
        node_a.leave("app", "presence-room", "a.1").await.unwrap(),
        None
    );
    assert_eq!(
        node_b.leave("app", "presence-room", "b.1").await.unwrap(),
        Some(ada.clone())
    );
    assert_eq!(
        node_b.leave("app", "presence-room", "b.1").await.unwrap(),
        None,
        "leaving twice is a no-op"
    );
    assert_eq!(
        node_a.members("app", "presence-room").await.unwrap(),
        vec![bob.clone()]
    );

    // The channel is indexed for the sweep while it has members, and not after.
    let redis = server.connect().await;
    let keys = Keys::default();
    let indexed: bool = redis
        .client
        .sismember(keys.presence_index(), index_member("app", "presence-room"))
        .await
        .unwrap();
    assert!(indexed);
    assert_eq!(
        node_b.leave("app", "presence-room", "b.2").await.unwrap(),
        Some(bob)
    );
    let indexed: bool = redis
        .client
        .sismember(keys.presence_index(), index_member("app", "presence-room"))
        .await
        .unwrap();
    assert!(!indexed);
    let left: i64 = redis
        .client
        .exists(vec![
            keys.presence_users("app", "presence-room"),
            keys.presence_sockets("app", "presence-room"),
            keys.presence_counts("app", "presence-room"),
            keys.presence_expiry("app", "presence-room"),
        ])
        .await
        .unwrap();
    assert_eq!(left, 0, "an empty channel leaves no keys behind");
}

#[tokio::test]
async fn a_full_channel_refuses_new_users_but_not_new_tabs_or_rejoins() {
    let server = RedisServer::start();
    let presence = RedisPresence::new(server.connect().await, Keys::default(), "a", TTL);
    presence
        .join("app", "presence-x", "1.1", member("1", None), 2)
        .await
        .unwrap();
    presence
        .join("app", "presence-x", "1.2", member("2", None), 2)
        .await
        .unwrap();
    let refused = presence
        .join("app", "presence-x", "1.3", member("3", None), 2)
        .await;
    assert!(
        matches!(refused, Err(PresenceError::Full(2))),
        "{refused:?}"
    );
    // A known user's second tab is not a new member.
    let tab = presence
        .join("app", "presence-x", "1.4", member("1", None), 2)
        .await
        .unwrap();
    assert!(!tab.user_added);
    // Re-subscribing from the same socket changes nothing.
    let again = presence
        .join("app", "presence-x", "1.2", member("2", None), 2)
        .await
        .unwrap();
    assert!(!again.user_added);
    assert_eq!(again.members.len(), 2);
    assert_eq!(
        presence.leave("app", "presence-x", "1.2").await.unwrap(),
        Some(member("2", None))
    );
    // Room again for a new user.
    assert!(
        presence
            .join("app", "presence-x", "1.3", member("3", None), 2)
            .await
            .unwrap()
            .user_added
    );
}

#[tokio::test]
async fn user_ids_keep_their_json_type_and_info() {
    let server = RedisServer::start();
    let presence = RedisPresence::new(server.connect().await, Keys::default(), "a", TTL);
    let numeric = member("42", Some(r#"{"name":"Ada","roles":["admin"],"a":null}"#));
    let text = member(r#""user-7""#, Some(r#""just a string""#));
    let bare = member(r#""9""#, None);
    for (socket, m) in [("1.1", &numeric), ("1.2", &text), ("1.3", &bare)] {
        presence
            .join("app", "presence-ids", socket, m.clone(), 100)
            .await
            .unwrap();
    }
    let members = sorted(presence.members("app", "presence-ids").await.unwrap());
    assert_eq!(
        members,
        sorted(vec![numeric.clone(), text.clone(), bare.clone()])
    );
    assert_eq!(
        members
            .iter()
            .find(|m| m.user_id == "42")
            .unwrap()
            .user_id_json,
        "42"
    );
    assert_eq!(
        members
            .iter()
            .find(|m| m.user_id == "9")
            .unwrap()
            .user_id_json,
        r#""9""#
    );
    assert_eq!(
        presence.leave("app", "presence-ids", "1.1").await.unwrap(),
        Some(numeric)
    );
}

#[tokio::test]
async fn a_node_restores_its_members_after_redis_restarts_empty() {
    let mut server = RedisServer::start();
    let port = server.port;
    let keys = Keys::default();
    let presence = RedisPresence::new(server.connect().await, keys.clone(), "a", TTL);
    presence
        .join(
            "app",
            "presence-room",
            "1.1",
            member("1", Some(r#"{"n":1}"#)),
            100,
        )
        .await
        .unwrap();
    presence
        .join(
            "app",
            "presence-room",
            "1.2",
            member("1", Some(r#"{"n":1}"#)),
            100,
        )
        .await
        .unwrap();
    presence
        .join("app", "presence-other", "1.3", member(r#""x""#, None), 100)
        .await
        .unwrap();
    assert_eq!(presence.local_connections(), 3);

    server.kill();
    // While Redis is away the store says so instead of hanging or panicking.
    let down = tokio::time::timeout(
        Duration::from_secs(10),
        presence.join("app", "presence-room", "1.9", member("9", None), 100),
    )
    .await
    .expect("a join fails within the command timeout");
    assert!(
        matches!(down, Err(PresenceError::Unavailable(_))),
        "{down:?}"
    );

    let _server = RedisServer::start_on(port);
    let observer = _server.connect().await;
    let restored = eventually(Duration::from_secs(10), || async {
        let sockets: i64 = observer
            .client
            .hlen(keys.presence_sockets("app", "presence-room"))
            .await
            .unwrap_or(0);
        let other: i64 = observer
            .client
            .hlen(keys.presence_sockets("app", "presence-other"))
            .await
            .unwrap_or(0);
        sockets == 2 && other == 1
    })
    .await;
    assert!(
        restored,
        "the node wrote its connections back after the restart"
    );
    let members = presence.members("app", "presence-room").await.unwrap();
    assert_eq!(members, vec![member("1", Some(r#"{"n":1}"#))]);
    let counts: Option<i64> = observer
        .client
        .hget(keys.presence_counts("app", "presence-room"), "1")
        .await
        .unwrap();
    assert_eq!(
        counts,
        Some(2),
        "both of the user's connections are counted again"
    );
    let indexed: bool = observer
        .client
        .sismember(keys.presence_index(), index_member("app", "presence-other"))
        .await
        .unwrap();
    assert!(indexed, "restored channels are back in the sweep's index");
    // The failed join was never mirrored, so it was not restored.
    let ghost: Option<String> = observer
        .client
        .hget(keys.presence_sockets("app", "presence-room"), "1.9")
        .await
        .unwrap();
    assert_eq!(ghost, None);

    // And the last leave still reports the user gone.
    assert_eq!(
        presence.leave("app", "presence-room", "1.1").await.unwrap(),
        None
    );
    assert_eq!(
        presence.leave("app", "presence-room", "1.2").await.unwrap(),
        Some(member("1", Some(r#"{"n":1}"#)))
    );
}

#[tokio::test]
async fn refreshes_push_expiries_forward_and_repair_a_flushed_redis() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let ttl = Duration::from_millis(600);
    let presence = RedisPresence::new(server.connect().await, keys.clone(), "a", ttl);
    presence
        .join("app", "presence-room", "1.1", member("1", None), 100)
        .await
        .unwrap();
    let observer = server.connect().await;
    let expiry_key = keys.presence_expiry("app", "presence-room");
    let first: f64 = observer.client.zscore(&expiry_key, "1.1").await.unwrap();
    tokio::time::sleep(ttl).await;
    let later: f64 = observer.client.zscore(&expiry_key, "1.1").await.unwrap();
    assert!(
        later > first,
        "the background task refreshed the expiry ({first} -> {later})"
    );

    // A flush the client cannot notice (no reconnect): the next refresh sees
    // its connections missing and writes them back.
    let _: () = observer.client.flushall(false).await.unwrap();
    let repaired = eventually(Duration::from_secs(3), || async {
        let n: i64 = observer
            .client
            .hlen(keys.presence_sockets("app", "presence-room"))
            .await
            .unwrap_or(0);
        n == 1
    })
    .await;
    assert!(repaired);
}

#[tokio::test]
async fn leave_all_removes_a_draining_nodes_presence_at_once() {
    let server = RedisServer::start();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let draining = RedisPresence::with_shutdown(
        server.connect().await,
        Keys::default(),
        "a",
        TTL,
        shutdown.clone(),
    );
    let staying = RedisPresence::new(server.connect().await, Keys::default(), "b", TTL);
    draining
        .join("app", "presence-room", "a.1", member("1", None), 100)
        .await
        .unwrap();
    draining
        .join("app", "presence-room", "a.2", member("1", None), 100)
        .await
        .unwrap();
    draining
        .join("app", "presence-room", "a.3", member("2", None), 100)
        .await
        .unwrap();
    draining
        .join("app", "presence-lobby", "a.4", member("3", None), 100)
        .await
        .unwrap();
    staying
        .join("app", "presence-room", "b.1", member("2", None), 100)
        .await
        .unwrap();

    shutdown.cancel();
    let mut left = draining.leave_all().await;
    left.sort_by(|a, b| a.2.user_id.cmp(&b.2.user_id));
    assert_eq!(
        left,
        vec![
            (
                "app".to_owned(),
                "presence-room".to_owned(),
                member("1", None)
            ),
            (
                "app".to_owned(),
                "presence-lobby".to_owned(),
                member("3", None)
            ),
        ],
        "user 2 is still present through node b"
    );
    assert_eq!(draining.local_connections(), 0);
    assert_eq!(
        staying.members("app", "presence-room").await.unwrap(),
        vec![member("2", None)]
    );
    assert_eq!(
        staying.members("app", "presence-lobby").await.unwrap(),
        vec![]
    );
}
