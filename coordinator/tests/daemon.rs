//! The coordinator against a real redis-server: the sweep announces
//! `member_removed` once for a user whose node died, leadership moves when
//! the leader dies or stops, dead nodes are reaped, and the binary hands over
//! its lock on SIGTERM.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::daemon::{Coordinator, CoordinatorOptions};
use belfry_coordinator::keys::{index_member, Keys};
use belfry_coordinator::{Envelope, PresenceMember, PresenceStore, RedisPresence};
use fred::prelude::*;
use support::{eventually, ChildGuard, RedisServer};
use tokio_util::sync::CancellationToken;

fn member(id: &str) -> PresenceMember {
    PresenceMember {
        user_id: id.into(),
        user_id_json: id.into(),
        user_info: None,
    }
}

fn options(id: &str, sweep_ms: u64, ttl_ms: u64) -> CoordinatorOptions {
    CoordinatorOptions {
        instance_id: id.into(),
        sweep_interval: Duration::from_millis(sweep_ms),
        leader_ttl: Duration::from_millis(ttl_ms),
        ..CoordinatorOptions::default()
    }
}

/// Every envelope published on one Pusher channel, with its arrival time.
async fn listen(
    server: &RedisServer,
    keys: &Keys,
    app: &str,
    channel: &str,
) -> tokio::sync::mpsc::UnboundedReceiver<(Instant, Envelope)> {
    let redis = server.connect().await;
    redis
        .subscriber
        .subscribe(keys.events(app, channel))
        .await
        .unwrap();
    let mut messages = redis.subscriber.message_rx();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let _redis = redis;
        while let Ok(message) = messages.recv().await {
            let bytes: Vec<u8> = message.value.convert().unwrap();
            let _ = tx.send((Instant::now(), Envelope::decode(&bytes).unwrap()));
        }
    });
    rx
}

#[tokio::test]
async fn a_dead_nodes_members_are_removed_and_announced_once() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let ttl = Duration::from_millis(900);
    let dying = RedisPresence::new(server.connect().await, keys.clone(), "dying", ttl);
    let healthy = RedisPresence::new(server.connect().await, keys.clone(), "healthy", ttl);
    // User 1 only on the dying node (two tabs); user 2 on both nodes.
    dying
        .join("app", "presence-room", "d.1", member("1"), 100)
        .await
        .unwrap();
    dying
        .join("app", "presence-room", "d.2", member("1"), 100)
        .await
        .unwrap();
    dying
        .join("app", "presence-room", "d.3", member("2"), 100)
        .await
        .unwrap();
    healthy
        .join("app", "presence-room", "h.1", member("2"), 100)
        .await
        .unwrap();
    let mut events = listen(&server, &keys, "app", "presence-room").await;

    let mut coordinators = Vec::new();
    for id in ["c1", "c2"] {
        coordinators.push(Arc::new(Coordinator::new(
            server.connect().await,
            Keys::default(),
            options(id, 100, 1000),
        )));
    }
    let shutdown = CancellationToken::new();
    for c in &coordinators {
        let (c, shutdown) = (c.clone(), shutdown.clone());
        tokio::spawn(async move { c.run(shutdown).await });
    }

    // The node dies: its refreshes stop. Its last write was the joins above
    // or a refresh at most ttl/3 ago.
    dying.stop();
    let died = Instant::now();
    drop(dying);

    let (at, removed) = tokio::time::timeout(ttl * 4, events.recv())
        .await
        .expect("member_removed")
        .unwrap();
    assert_eq!(removed.event, "pusher_internal:member_removed");
    assert_eq!(removed.data, r#"{"user_id":1}"#);
    assert_eq!(
        (removed.app.as_str(), removed.channel.as_str()),
        ("app", "presence-room")
    );
    let latency = at - died;
    assert!(
        latency <= ttl + Duration::from_millis(400),
        "announced {latency:?} after the node died"
    );

    // Exactly once, and nothing for user 2, who is still on the healthy node.
    tokio::time::sleep(ttl * 2).await;
    assert!(events.try_recv().is_err(), "no second announcement");
    let members = healthy.members("app", "presence-room").await.unwrap();
    assert_eq!(members, vec![member("2")]);
    assert_eq!(
        healthy.leave("app", "presence-room", "h.1").await.unwrap(),
        Some(member("2"))
    );
    assert_eq!(coordinators.iter().filter(|c| c.is_leader()).count(), 1);
    shutdown.cancel();
}

#[tokio::test]
async fn a_sweep_spares_connections_refreshed_in_time() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let ttl = Duration::from_millis(300);
    let presence = RedisPresence::new(server.connect().await, keys.clone(), "alive", ttl);
    presence
        .join("app", "presence-x", "1.1", member("7"), 100)
        .await
        .unwrap();
    let coordinator =
        Coordinator::new(server.connect().await, keys.clone(), options("c", 50, 1000));
    let deadline = Instant::now() + ttl * 4;
    while Instant::now() < deadline {
        let report = coordinator.sweep_once().await.unwrap();
        assert_eq!(
            report.presence_removals, 0,
            "a refreshed connection must survive"
        );
        assert_eq!(report.channels_due, 0, "nothing was due");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        presence.members("app", "presence-x").await.unwrap(),
        vec![member("7")]
    );

    // A channel left in the index with nobody on it (a node died between
    // its leave and the index cleanup) is dropped from the index.
    let redis = server.connect().await;
    let _: i64 = redis
        .client
        .sadd(keys.presence_index(), index_member("app", "presence-gone"))
        .await
        .unwrap();
    let report = coordinator.sweep_once().await.unwrap();
    assert_eq!(report.channels, 2);
    let indexed: Vec<String> = redis.client.smembers(keys.presence_index()).await.unwrap();
    assert_eq!(indexed, vec![index_member("app", "presence-x")]);
}

#[tokio::test]
async fn leadership_moves_when_the_leader_dies_and_at_once_when_it_stops() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let ttl = Duration::from_millis(600);
    let spawn = |id: &'static str| {
        let server = &server;
        async move {
            let coordinator = Arc::new(Coordinator::new(
                server.connect().await,
                Keys::default(),
                options(id, 100, 600),
            ));
            let shutdown = CancellationToken::new();
            let task = tokio::spawn({
                let (c, s) = (coordinator.clone(), shutdown.clone());
                async move { c.run(s).await }
            });
            (coordinator, shutdown, task)
        }
    };
    let (a, a_stop, a_task) = spawn("a").await;
    let (b, b_stop, b_task) = spawn("b").await;
    assert!(
        eventually(Duration::from_secs(2), || async {
            a.is_leader() || b.is_leader()
        })
        .await
    );
    tokio::time::sleep(ttl / 2).await;
    assert!(a.is_leader() != b.is_leader(), "exactly one leader");
    let (leader, leader_task, follower, follower_stop, follower_task) = if a.is_leader() {
        (a, a_task, b, b_stop, b_task)
    } else {
        (b, b_task, a, a_stop, a_task)
    };
    let observer = server.connect().await;
    let holder: Option<String> = observer.client.get(keys.leader()).await.unwrap();
    assert_eq!(holder.as_deref(), Some(leader.instance_id()));

    // A crash: the task vanishes without releasing the lock.
    leader_task.abort();
    let crashed = Instant::now();
    assert!(
        eventually(ttl + Duration::from_millis(300), || async {
            follower.is_leader()
        })
        .await,
        "the follower takes over within the lock's TTL"
    );
    let takeover = crashed.elapsed();
    assert!(
        takeover <= ttl + Duration::from_millis(300),
        "took {takeover:?}"
    );

    // A clean stop: the lock is released and a waiting replica takes over
    // at once, not after the TTL.
    let (c, c_stop, c_task) = spawn("c").await;
    tokio::time::sleep(ttl / 2).await;
    assert!(!c.is_leader());
    let stopping = Instant::now();
    follower_stop.cancel();
    follower_task.await.unwrap();
    let holder: Option<String> = observer.client.get(keys.leader()).await.unwrap();
    assert_ne!(
        holder.as_deref(),
        Some(follower.instance_id()),
        "released on stop"
    );
    assert!(!follower.is_leader());
    assert!(eventually(ttl, || async { c.is_leader() }).await);
    let handover = stopping.elapsed();
    println!("failover after a crash: {takeover:?}; handover after a stop: {handover:?}");
    assert!(handover < ttl / 2, "handover took {handover:?}");
    c_stop.cancel();
    c_task.await.unwrap();
    let holder: Option<String> = observer.client.get(keys.leader()).await.unwrap();
    assert_eq!(holder, None);
}

#[tokio::test]
async fn dead_nodes_are_reaped_and_live_ones_kept() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let redis = server.connect().await;
    let c = &redis.client;
    let now = (belfry_coordinator::envelope::now_us() / 1000) as f64;
    let _: i64 = c
        .zadd(
            keys.nodes(),
            None,
            None,
            false,
            false,
            vec![(now - 1000.0, "dead"), (now + 60_000.0, "alive")],
        )
        .await
        .unwrap();
    let _: i64 = c
        .sadd(
            keys.node_channels("dead"),
            vec![index_member("app", "shared"), index_member("app", "lonely")],
        )
        .await
        .unwrap();
    let _: i64 = c
        .sadd(keys.node_channels("alive"), index_member("app", "shared"))
        .await
        .unwrap();
    let _: i64 = c
        .hset(keys.node_connections("dead"), ("app", 3))
        .await
        .unwrap();
    let _: i64 = c
        .hset(
            keys.occupancy("app", "shared"),
            vec![("dead", 2), ("alive", 1)],
        )
        .await
        .unwrap();
    let _: i64 = c
        .hset(keys.occupancy("app", "lonely"), ("dead", 1))
        .await
        .unwrap();
    let _: i64 = c
        .sadd(keys.channel_index("app"), vec!["shared", "lonely"])
        .await
        .unwrap();

    let coordinator = Coordinator::new(
        server.connect().await,
        keys.clone(),
        options("c", 1000, 1000),
    );
    let report = coordinator.sweep_once().await.unwrap();
    assert_eq!(report.nodes_reaped, 1);

    let shared: std::collections::HashMap<String, i64> =
        c.hgetall(keys.occupancy("app", "shared")).await.unwrap();
    assert_eq!(shared, [("alive".to_owned(), 1)].into_iter().collect());
    let lonely: i64 = c.exists(keys.occupancy("app", "lonely")).await.unwrap();
    assert_eq!(lonely, 0);
    let mut channels: Vec<String> = c.smembers(keys.channel_index("app")).await.unwrap();
    channels.sort();
    assert_eq!(channels, vec!["shared".to_owned()]);
    let leftovers: i64 = c
        .exists(vec![
            keys.node_channels("dead"),
            keys.node_connections("dead"),
        ])
        .await
        .unwrap();
    assert_eq!(leftovers, 0);
    let nodes: Vec<String> = c
        .zrange(keys.nodes(), 0, -1, None, false, None, false)
        .await
        .unwrap();
    assert_eq!(nodes, vec!["alive".to_owned()]);
    assert_eq!(
        coordinator.sweep_once().await.unwrap().nodes_reaped,
        0,
        "reaped once"
    );
}

#[tokio::test]
async fn the_binary_releases_leadership_on_sigterm() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_belfry-coordinator"))
        .args([
            "--redis-url",
            &server.url(),
            "--metrics-port",
            &metrics_port.to_string(),
            // Long enough that only a release can free the lock in time.
            "--leader-ttl-ms",
            "20000",
            "--instance-id",
            "proc-1",
        ])
        .env("RUST_LOG", "warn")
        .spawn()
        .unwrap();
    let mut child = ChildGuard(child);
    let observer = server.connect().await;
    let leading = eventually(Duration::from_secs(5), || async {
        let holder: Option<String> = observer.client.get(keys.leader()).await.unwrap_or(None);
        holder.as_deref() == Some("proc-1")
    })
    .await;
    assert!(leading);
    let metrics = eventually(Duration::from_secs(3), || async {
        http_get(metrics_port, "/metrics")
            .await
            .contains("belfry_coordinator_leader 1")
    })
    .await;
    assert!(metrics, "{}", http_get(metrics_port, "/metrics").await);
    assert!(http_get(metrics_port, "/readyz")
        .await
        .starts_with("HTTP/1.1 200"));

    let status = std::process::Command::new("kill")
        .args(["-TERM", &child.0.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let stopped = Instant::now();
    let exit = loop {
        if let Some(exit) = child.0.try_wait().unwrap() {
            break exit;
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(5),
            "the coordinator did not exit on SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(exit.success(), "{exit:?}");
    let holder: Option<String> = observer.client.get(keys.leader()).await.unwrap();
    assert_eq!(holder, None, "the lock is released, not left to expire");
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return String::new();
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    if stream.write_all(request.as_bytes()).await.is_err() {
        return String::new();
    }
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response).await;
    response
}
