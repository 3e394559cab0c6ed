//! Test support: a throwaway `redis-server` per test, killed when dropped,
//! and small waits. Every test gets its own server and port, so tests run in
//! parallel without sharing state.

#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use belfry_coordinator::redis::Redis;
use fred::interfaces::ClientLike;

/// A `redis-server` child process on a loopback port.
pub struct RedisServer {
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let port = free_port();
        Self::start_on(port)
    }

    /// Starts a server on `port` (again, after `kill`: a restart, empty).
    pub fn start_on(port: u16) -> RedisServer {
        let child =
            Command::new(std::env::var("REDIS_SERVER").unwrap_or_else(|_| "redis-server".into()))
                .args([
                    "--port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--logfile",
                    "",
                    "--loglevel",
                    "warning",
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| {
                    panic!(
                    "cannot start redis-server ({e}); install it (apt-get install redis-server, \
                     brew install redis) or point REDIS_SERVER at the binary"
                )
                });
        let server = RedisServer {
            port,
            child: Some(child),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "redis-server did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connected client pair, as a node or the coordinator would have.
    pub async fn connect(&self) -> Redis {
        let redis = Redis::connect(&self.url()).expect("valid redis url");
        redis.start_subscriber();
        assert!(
            redis.wait_connected(Duration::from_secs(5)).await,
            "redis did not connect"
        );
        let _ =
            tokio::time::timeout(Duration::from_secs(5), redis.subscriber.wait_for_connect()).await;
        redis
    }

    /// Kills the server abruptly (SIGKILL): no shutdown, no data kept.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `check` every 20 ms until it is true or `timeout` passes.
pub async fn eventually<F, Fut>(timeout: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A child process killed (and reaped) when the test ends, pass or fail.
/// `Child::kill` after the child was reaped signals nothing, so a recycled
/// pid is never hit.
pub struct ChildGuard(pub Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
