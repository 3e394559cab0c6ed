//! The main port: WebSockets, the HTTP API, Reverb's `/up` and the health
//! probes. (The metrics port is `belfry_coordinator::metrics_server`, with
//! the node's probes and descriptor budget handed in: `main.rs`.)
//!
//! A WebSocket request is first held to the edge's limits (descriptor
//! reserve at accept, then per-address limits, answered 429 before any
//! upgrade). Past those it is checked (app key, origin, protocol version,
//! admission) and always upgraded, so that a refused client is told why with
//! a `pusher:error` frame and the matching close code, as pusher-js expects.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, CONNECTION, RETRY_AFTER, SEC_WEBSOCKET_ACCEPT, SEC_WEBSOCKET_KEY,
    SEC_WEBSOCKET_VERSION, UPGRADE,
};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use crate::api::{self, json_response};
use crate::connection;
use crate::edge::fds::{self, FdSlot};
use crate::edge::Edge;
use crate::node::{Node, Refusal};
use crate::protocol::code;
use crate::registry::AppRegistry;
use crate::telemetry;
use crate::tls::{Socket, Tls};
use belfry_coordinator::metrics_server::Probes;
use tokio_rustls::server::TlsStream;

type HttpResponse = Response<Full<Bytes>>;

/// What the listener knows about the connection a request came on.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// This socket's share of the descriptor budget; a WebSocket carries it
    /// on after hyper lets go of the connection.
    fd: Arc<FdSlot>,
}

/// Serves HTTP connections from `listener` until the node stops accepting.
/// Connections over the descriptor reserve are answered 503 at once.
pub async fn serve(node: Arc<Node>, edge: Arc<Edge>, listener: TcpListener, tls: Option<Arc<Tls>>) {
    let connections = tokio_util::task::TaskTracker::new();
    let header_timeout = Duration::from_secs(node.config.header_timeout_secs);
    loop {
        let accepted = tokio::select! {
            _ = node.shutdown.stopped() => break,
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                if edge.fds.shed_one(&listener, &e).await {
                    telemetry::refused("fd_reserve");
                    continue;
                }
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let (fd, over) = edge.fds.take();
        if over {
            telemetry::refused("fd_reserve");
            tracing::debug!(%peer, "over the descriptor reserve: answered 503");
            fds::shed_now(stream);
            continue;
        }
        let _ = stream.set_nodelay(true);
        let node = node.clone();
        let edge = edge.clone();
        let info = ConnInfo {
            peer,
            fd: Arc::new(fd),
        };
        let tls = tls.clone();
        connections.spawn(async move {
            let service_node = node.clone();
            let service = service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(info.clone());
                let fut = main_handler(service_node.clone(), edge.clone(), req);
                async move { Ok::<_, Infallible>(fut.await) }
            });
            match tls {
                None => serve_http(&node, TokioIo::new(stream), service, header_timeout).await,
                Some(tls) => {
                    // The handshake shares the request head's deadline.
                    let handshake =
                        tokio::time::timeout(header_timeout, tls.acceptor().accept(stream));
                    match handshake.await {
                        Ok(Ok(stream)) => {
                            serve_http(&node, TokioIo::new(stream), service, header_timeout).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake too slow"),
                    }
                }
            }
        });
    }
    connections.close();
}

/// One HTTP/1.1 connection, plain or TLS, until it ends or the node stops.
async fn serve_http<IO, S>(node: &Node, io: IO, service: S, header_timeout: Duration)
where
    IO: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<Incoming, ResBody = Full<Bytes>>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        // A client that trickles its request head (slowloris) is
        // dropped rather than holding a task and a buffer. The
        // deadline also bounds an idle kept-alive connection.
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = node.shutdown.stopped() => {
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
    }
}

/// WebSockets, the HTTP API and health.
async fn main_handler(node: Arc<Node>, edge: Arc<Edge>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_owned();
    let prefix = node.config.path_prefix.as_str();
    let local = if prefix.is_empty() {
        Some(path.as_str())
    } else {
        path.strip_prefix(prefix).filter(|r| r.starts_with('/'))
    };
    match (path.as_str(), local) {
        ("/up", _) | (_, Some("/up")) => json_response(StatusCode::OK, &json!({ "health": "OK" })),
        ("/healthz", _) => node.healthz().into_response(),
        ("/readyz", _) => node.readyz().into_response(),
        (_, Some(rest)) if rest.starts_with("/app/") => {
            let key = rest["/app/".len()..].to_owned();
            websocket(node, &edge, req, &key)
        }
        (_, Some(rest)) if rest.starts_with("/apps/") => {
            let rest = rest.to_owned();
            api::handle(node, &edge, req, &rest).await
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({ "error": format!("No route {path}") }),
        ),
    }
}

/// 429 with `Retry-After`, in the API's error shape.
pub fn too_many_requests(message: &str, retry_after_secs: u64) -> HttpResponse {
    let mut response = json_response(StatusCode::TOO_MANY_REQUESTS, &json!({ "error": message }));
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    response
}

fn bad_request(message: &str) -> HttpResponse {
    json_response(StatusCode::BAD_REQUEST, &json!({ "error": message }))
}

/// Upgrades `/app/{key}` and hands the socket to a connection task, or to a
/// refusal that tells the client why.
fn websocket(node: Arc<Node>, edge: &Edge, mut req: Request<Incoming>, key: &str) -> HttpResponse {
    let header = |name| {
        req.headers()
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let is_upgrade = header(UPGRADE).is_some_and(|u| u.eq_ignore_ascii_case("websocket"))
        && header(CONNECTION).is_some_and(|c| c.to_ascii_lowercase().contains("upgrade"));
    if !is_upgrade {
        return bad_request("Expected a WebSocket upgrade");
    }
    // RFC 6455 4.2.1: a GET, version 13, and a key that is 16 bytes in base64.
    if req.method() != hyper::Method::GET {
        return bad_request("A WebSocket handshake must be a GET");
    }
    if header(SEC_WEBSOCKET_VERSION).map(str::trim) != Some("13") {
        let mut response = json_response(
            StatusCode::UPGRADE_REQUIRED,
            &json!({ "error": "Unsupported WebSocket version; use 13" }),
        );
        response
            .headers_mut()
            .insert(SEC_WEBSOCKET_VERSION, HeaderValue::from_static("13"));
        return response;
    }
    let Some(accept_key) = header(SEC_WEBSOCKET_KEY)
        .filter(|k| is_websocket_key(k))
        .map(|k| derive_accept_key(k.as_bytes()))
    else {
        return bad_request("Sec-WebSocket-Key must be 16 bytes in base64");
    };
    // Per address, before any upgrade, so a flood costs the node one
    // short HTTP answer per attempt.
    let info = req.extensions().get::<ConnInfo>().cloned();
    let peer = info
        .as_ref()
        .map_or(IpAddr::from([0, 0, 0, 0]), |i| i.peer.ip());
    let client_ip = edge.proxies.client_ip(peer, req.headers());
    let ip_slot = match edge.per_ip.admit(client_ip, Instant::now()) {
        Ok(slot) => slot,
        Err(refusal) => {
            telemetry::refused(refusal.reason());
            tracing::debug!(%client_ip, reason = refusal.reason(), "handshake refused with 429");
            return too_many_requests(refusal.message(), refusal.retry_after_secs());
        }
    };
    let origin = header(hyper::header::ORIGIN).map(str::to_owned);
    let query = req.uri().query().unwrap_or("").to_owned();

    let app = node.registry.by_key(key).cloned();
    let verdict = match &app {
        None => Err(Refusal {
            code: code::APP_NOT_FOUND,
            message: "Application does not exist".into(),
            reason: "unknown_app",
        }),
        Some(app) => check_client(app, origin.as_deref(), &query).and_then(|()| node.admit(app)),
    };
    if let Err(refusal) = &verdict {
        telemetry::refused(refusal.reason);
        tracing::info!(
            key,
            origin = origin.as_deref().unwrap_or(""),
            code = refusal.code,
            reason = refusal.reason,
            "connection refused: {}",
            refusal.message
        );
    }
    let upgrade = hyper::upgrade::on(&mut req);
    // What the socket's task needs, made small before it is captured: the
    // task's state is kept for the connection's whole life (boxed refusal,
    // one admitted app rather than a verdict beside an option).
    let admitted: Result<Arc<AppRegistry>, Box<Refusal>> = match (verdict, app) {
        (Ok(()), Some(app)) => Ok(app),
        (Err(refusal), _) => Err(Box::new(refusal)),
        (Ok(()), None) => return bad_request("Unknown app"),
    };
    // Held for the socket's life: its place in the address's count and in
    // the descriptor budget.
    let held = (ip_slot, info.map(|i| i.fd));
    let tasks = node.tasks.clone();
    tasks.spawn(async move {
        // Captured, not rebound: a binding would be a second copy in the
        // task's state. It is dropped when the task ends.
        let _ = &held;
        let Some((stream, early)) = take_stream(upgrade).await else {
            if let Ok(app) = &admitted {
                node.release(app, "error");
            }
            return;
        };
        match admitted {
            // Not boxed: the connection lives in this task's own allocation
            // (one per socket, not two; see docs/benchmarks.md on idle memory).
            Ok(app) => connection::run(node, app, stream, early).await,
            Err(refusal) => {
                Box::pin(connection::refuse(stream, refusal.code, &refusal.message)).await
            }
        }
    });

    let mut response = Response::new(Full::new(Bytes::new()));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
    if let Ok(v) = HeaderValue::from_str(&accept_key) {
        headers.insert(SEC_WEBSOCKET_ACCEPT, v);
    }
    response
}

/// 16 bytes in base64: 22 characters of the alphabet and `==`.
fn is_websocket_key(key: &str) -> bool {
    let b = key.trim().as_bytes();
    b.len() == 24
        && b.ends_with(b"==")
        && b[..22]
            .iter()
            .all(|c| c.is_ascii_alphanumeric() || *c == b'+' || *c == b'/')
}

/// Origin and protocol version, before any quota is spent.
fn check_client(app: &AppRegistry, origin: Option<&str>, query: &str) -> Result<(), Refusal> {
    if let Some(origin) = origin {
        if !origin_allowed(&app.config.allowed_origins, origin) {
            return Err(Refusal {
                code: code::UNAUTHORIZED,
                message: "Origin not allowed".into(),
                reason: "origin",
            });
        }
    }
    let protocol = api::signature::query_pairs(query)
        .into_iter()
        .find(|(k, _)| k == "protocol")
        .map(|(_, v)| v);
    match protocol.as_deref().map(str::parse::<u32>) {
        // Some old clients omit it; Reverb ignores it. Accept.
        None => Ok(()),
        Some(Ok(v)) if v >= 7 => Ok(()),
        Some(Ok(_)) => Err(Refusal {
            code: code::UNSUPPORTED_PROTOCOL,
            message: "Unsupported protocol version; use 7".into(),
            reason: "protocol",
        }),
        Some(Err(_)) => Err(Refusal {
            code: code::INVALID_VERSION,
            message: "Invalid protocol version".into(),
            reason: "protocol",
        }),
    }
}

/// Matches an Origin header's host against `*`, exact hosts and `*.domain`.
pub fn origin_allowed(allowed: &[String], origin: &str) -> bool {
    let host = origin.split("://").nth(1).unwrap_or(origin);
    let host = host
        .split(['/', ':'])
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    allowed.iter().any(|pattern| {
        let pattern = pattern.to_ascii_lowercase();
        let pattern = pattern.split("://").nth(1).unwrap_or(&pattern).to_owned();
        if pattern == "*" {
            true
        } else if let Some(domain) = pattern.strip_prefix("*.") {
            host.ends_with(&format!(".{domain}"))
        } else {
            host == pattern
        }
    })
}

/// Waits for hyper to finish the upgrade and takes the TCP (or TLS) stream
/// back, with anything the client already sent: Belfry frames the socket
/// itself (see websocket.rs).
async fn take_stream(upgrade: hyper::upgrade::OnUpgrade) -> Option<(Socket, Bytes)> {
    let upgraded = match upgrade.await {
        Ok(u) => u,
        Err(e) => {
            tracing::debug!(error = %e, "upgrade failed");
            return None;
        }
    };
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(parts) => Some((Socket::Plain(parts.io.into_inner()), parts.read_buf)),
        Err(upgraded) => match upgraded.downcast::<TokioIo<TlsStream<TcpStream>>>() {
            Ok(parts) => {
                let (tcp, session) = parts.io.into_inner().into_inner();
                Some((Socket::tls(tcp, session), parts.read_buf))
            }
            Err(_) => {
                tracing::error!("upgraded connection is neither TCP nor TLS over TCP");
                None
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_16_bytes_of_base64() {
        assert!(is_websocket_key("dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZQ"));
        assert!(!is_websocket_key("not a key"));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZ!=="));
        assert!(!is_websocket_key("dGhlIHNhbXBsZSBub25jZQ==dGhl"));
    }

    #[test]
    fn origins_match_hosts_and_wildcards() {
        let allowed = vec!["*.example.com".to_owned(), "app.test".to_owned()];
        assert!(origin_allowed(&allowed, "https://a.example.com"));
        assert!(origin_allowed(&allowed, "https://deep.a.example.com:8443"));
        assert!(origin_allowed(&allowed, "http://app.test"));
        assert!(!origin_allowed(&allowed, "https://example.com.evil.io"));
        assert!(!origin_allowed(&allowed, "https://evilexample.com"));
        assert!(!origin_allowed(&allowed, "http://other.test"));
        assert!(origin_allowed(&["*".to_owned()], "null"));
    }
}
