//! Publishing straight into Redis, through the library and through
//! `belfry-coordinator publish`: subscribers get the envelope a node would
//! have published, cache channels keep their last event, failures say so.

mod support;

use std::process::Command;
use std::time::Duration;

use belfry_coordinator::keys::Keys;
use belfry_coordinator::{Envelope, Publisher};
use fred::prelude::*;
use support::RedisServer;

async fn next_envelope(
    messages: &mut tokio::sync::broadcast::Receiver<fred::types::Message>,
) -> Envelope {
    let message = tokio::time::timeout(Duration::from_secs(5), messages.recv())
        .await
        .expect("an envelope arrives")
        .unwrap();
    let bytes: Vec<u8> = message.value.convert().unwrap();
    Envelope::decode(&bytes).unwrap()
}

#[tokio::test]
async fn publish_batch_reaches_subscribers_in_order_and_fills_the_cache() {
    let server = RedisServer::start();
    let keys = Keys::new("test");
    let listener = server.connect().await;
    listener
        .subscriber
        .subscribe(vec![
            keys.events("app", "orders"),
            keys.events("app", "cache-prices"),
        ])
        .await
        .unwrap();
    let mut messages = listener.subscriber.message_rx();

    let publisher = Publisher::new(server.connect().await, keys.clone())
        .with_cache_ttl(Duration::from_secs(60));
    let envelopes = vec![
        Envelope::event("app", "orders", "created", r#"{"id":1}"#.into()),
        Envelope::event("app", "cache-prices", "update", r#"{"p":2}"#.into()),
        Envelope::event("app", "orders", "shipped", r#"{"id":1}"#.into()),
    ];
    let receivers = publisher.publish_batch(envelopes.clone()).await.unwrap();
    assert_eq!(receivers, vec![1, 1, 1]);
    for expected in &envelopes {
        assert_eq!(&next_envelope(&mut messages).await, expected);
    }

    let redis = server.connect().await;
    let cached: Option<Vec<u8>> = redis
        .client
        .get(keys.cache("app", "cache-prices"))
        .await
        .unwrap();
    assert_eq!(Envelope::decode(&cached.unwrap()).unwrap(), envelopes[1]);
    let ttl: i64 = redis
        .client
        .pttl(keys.cache("app", "cache-prices"))
        .await
        .unwrap();
    assert!(ttl > 50_000 && ttl <= 60_000, "{ttl}");
    let uncached: i64 = redis
        .client
        .exists(keys.cache("app", "orders"))
        .await
        .unwrap();
    assert_eq!(uncached, 0);

    publisher
        .publish(
            "app",
            "orders",
            "cancelled",
            "{}".into(),
            Some("1.2".into()),
        )
        .await
        .unwrap();
    let excluded = next_envelope(&mut messages).await;
    assert_eq!(excluded.socket_id.as_deref(), Some("1.2"));
}

#[tokio::test]
async fn the_publish_command_publishes_and_exits_zero() {
    let server = RedisServer::start();
    let keys = Keys::default();
    let listener = server.connect().await;
    listener
        .subscriber
        .subscribe(keys.events("app1", "cache-news"))
        .await
        .unwrap();
    let mut messages = listener.subscriber.message_rx();

    let url = server.url();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_belfry-coordinator"))
            .args([
                "publish",
                "--redis-url",
                &url,
                "--app",
                "app1",
                "--channel",
                "cache-news",
                "--event",
                "headline",
                "--data",
                r#"{"title":"Bells"}"#,
                "--socket-id",
                "12.34",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout.contains("published headline") && stdout.contains("cache-news"),
        "{stdout}"
    );
    assert!(stdout.contains("1 node(s)"), "{stdout}");

    let envelope = next_envelope(&mut messages).await;
    assert_eq!(envelope.app, "app1");
    assert_eq!(envelope.event, "headline");
    assert_eq!(envelope.data, r#"{"title":"Bells"}"#);
    assert_eq!(envelope.socket_id.as_deref(), Some("12.34"));
    let cached: i64 = listener
        .client
        .exists(keys.cache("app1", "cache-news"))
        .await
        .unwrap();
    assert_eq!(cached, 1);
}

#[tokio::test]
async fn the_publish_command_fails_clearly_without_redis() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let output = tokio::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_belfry-coordinator"))
            .args([
                "publish",
                "--redis-url",
                &format!("redis://127.0.0.1:{port}"),
            ])
            .args([
                "--app",
                "a",
                "--channel",
                "c",
                "--event",
                "e",
                "--data",
                "{}",
            ])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot use Redis") && stderr.contains("Connection refused"),
        "{stderr}"
    );
}

#[test]
fn help_documents_the_flags() {
    let output = Command::new(env!("CARGO_BIN_EXE_belfry-coordinator"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for flag in [
        "--redis-url",
        "--redis-prefix",
        "--host",
        "--metrics-port",
        "--sweep-interval-ms",
        "--leader-ttl-ms",
        "--log-format",
        "BELFRY_REDIS_URL",
        "publish",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}:\n{help}");
    }
}
