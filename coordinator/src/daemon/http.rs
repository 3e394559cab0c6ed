//! The coordinator's metrics port: `/metrics` (Prometheus text), `/healthz`
//! (the process runs) and `/readyz` (Redis is reachable). Readiness does not
//! depend on leadership: a follower is as ready as the leader, it is waiting.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::redis::Redis;

/// Serves the metrics port until `shutdown`.
pub async fn serve_metrics(
    listener: TcpListener,
    prometheus: Option<PrometheusHandle>,
    redis: Redis,
    leader: watch::Receiver<bool>,
    shutdown: CancellationToken,
) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let (prometheus, redis, leader, shutdown) = (
            prometheus.clone(),
            redis.clone(),
            leader.clone(),
            shutdown.clone(),
        );
        connections.spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(
                    req.uri().path(),
                    prometheus.as_ref(),
                    &redis,
                    *leader.borrow(),
                );
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = shutdown.cancelled() => {
                    conn.as_mut().graceful_shutdown();
                    let _ = conn.await;
                }
            }
        });
    }
    connections.close();
    connections.wait().await;
}

fn respond(
    path: &str,
    prometheus: Option<&PrometheusHandle>,
    redis: &Redis,
    leading: bool,
) -> Response<Full<Bytes>> {
    let role = if leading { "leader" } else { "follower" };
    match path {
        "/metrics" => {
            let text = prometheus.map(PrometheusHandle::render).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => json(
            StatusCode::OK,
            format!(r#"{{"status":"ok","role":"{role}"}}"#),
        ),
        "/readyz" if redis.is_healthy() => json(
            StatusCode::OK,
            format!(r#"{{"status":"ready","role":"{role}"}}"#),
        ),
        "/readyz" => json(
            StatusCode::SERVICE_UNAVAILABLE,
            r#"{"status":"unavailable","reason":"redis unreachable"}"#.to_owned(),
        ),
        _ => json(StatusCode::NOT_FOUND, r#"{"error":"not found"}"#.to_owned()),
    }
}

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}
