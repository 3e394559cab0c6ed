//! The metrics port both binaries serve: `/metrics` (Prometheus text),
//! `/healthz` (liveness) and `/readyz` (readiness), and the recorder behind
//! `/metrics`. What the probes answer is each binary's own (`Probes`: the
//! node's `Node`, the coordinator's `daemon::Health`); how the port accepts,
//! times out and stops is the same for both, so it is written once, here.
//!
//! Not the node's main port (WebSockets, the HTTP API): that is
//! `belfry-node`'s `server` module.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Bucket bounds, in seconds, of every histogram either binary records.
/// Without them the exporter renders summaries, whose quantiles cannot be
/// summed over replicas as `histogram_quantile` over buckets can.
const LATENCY_BUCKETS: [f64; 13] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

/// Installs the process's Prometheus recorder; must run before any metric
/// handle is made, or that handle records into nothing. `None` (logged) if
/// a recorder is already installed: the process runs on without metrics.
pub fn install_recorder() -> Option<PrometheusHandle> {
    PrometheusBuilder::new()
        .set_buckets(&LATENCY_BUCKETS)
        .and_then(PrometheusBuilder::install_recorder)
        .map_err(|e| tracing::warn!(error = %e, "metrics recorder not installed"))
        .ok()
}

/// A probe's answer: a status and a JSON body, sent as it is.
pub struct Probe {
    status: StatusCode,
    body: String,
}

impl Probe {
    /// `body` must be JSON text; it is not re-encoded, so a body's bytes
    /// (key order included) stay what the binary has always sent.
    pub fn json(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
        }
    }

    pub fn into_response(self) -> Response<Full<Bytes>> {
        let mut response = Response::new(Full::new(Bytes::from(self.body)));
        *response.status_mut() = self.status;
        response
            .headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        response
    }
}

/// What a binary says about itself on the port. Orchestrators and load
/// balancers act on the statuses; the bodies are for the people reading.
pub trait Probes: Send + Sync + 'static {
    /// `/healthz`: the process runs and answers (liveness).
    fn healthz(&self) -> Probe;
    /// `/readyz`: whether it should be given work now (readiness).
    fn readyz(&self) -> Probe;
    /// Any other path: 404, each binary in the shape of its other errors.
    fn not_found(&self, path: &str) -> Probe;
    /// Runs before every scrape, for gauges that are read off state rather
    /// than kept up to date as it changes (the node's readiness gauge).
    fn before_scrape(&self) {}
}

/// A budget of open sockets the port's connections count against: the
/// node's descriptor reserve. The port never refuses a socket for it, since
/// the reserve is kept so that probes and scrapes still get an answer when
/// the main port is full; but its sockets are counted, so the main port
/// sheds before they run the process out of descriptors.
pub trait Descriptors: Send + Sync + 'static {
    /// Held while the connection is open; gives its share back on drop.
    type Slot: Send + 'static;
    fn open(self: &Arc<Self>) -> Self::Slot;
    /// After accept failed with `error`: whether a waiting client was taken
    /// off the backlog anyway (out of descriptors), so the loop goes on at
    /// once instead of backing off.
    fn accept_failed(
        &self,
        listener: &TcpListener,
        error: &io::Error,
    ) -> impl Future<Output = bool> + Send;
}

/// No budget: the coordinator keeps no descriptor reserve.
pub struct Unbudgeted;

impl Descriptors for Unbudgeted {
    type Slot = ();
    fn open(self: &Arc<Self>) {}
    fn accept_failed(&self, _: &TcpListener, _: &io::Error) -> impl Future<Output = bool> + Send {
        std::future::ready(false)
    }
}

/// Serves the port until `shutdown` is cancelled, then lets answers in
/// flight finish for at most `header_timeout`, so a scraper that stops
/// reading cannot hold the process's exit.
///
/// `header_timeout` is how long a client may take to send a request head:
/// one that trickles it (slowloris) or leaves a kept-alive connection idle
/// is dropped rather than keeping a task, a buffer and a descriptor.
pub async fn serve<P: Probes, D: Descriptors>(
    listener: TcpListener,
    prometheus: Option<PrometheusHandle>,
    probes: Arc<P>,
    descriptors: Arc<D>,
    header_timeout: Duration,
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
                if !descriptors.accept_failed(&listener, &e).await {
                    tracing::warn!(error = %e, "metrics accept failed");
                    // Accept errors come in bursts (EMFILE); do not spin on them.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                continue;
            }
        };
        let slot = descriptors.open();
        let _ = stream.set_nodelay(true);
        let (prometheus, probes, shutdown) = (prometheus.clone(), probes.clone(), shutdown.clone());
        connections.spawn(async move {
            let _slot = slot;
            let service = service_fn(move |req: Request<Incoming>| {
                let response = respond(req.uri().path(), prometheus.as_ref(), &*probes);
                async move { Ok::<_, Infallible>(response) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
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
    let _ = tokio::time::timeout(header_timeout, connections.wait()).await;
}

fn respond(
    path: &str,
    prometheus: Option<&PrometheusHandle>,
    probes: &impl Probes,
) -> Response<Full<Bytes>> {
    match path {
        "/metrics" => {
            probes.before_scrape();
            let text = prometheus.map(PrometheusHandle::render).unwrap_or_default();
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/healthz" => probes.healthz().into_response(),
        "/readyz" => probes.readyz().into_response(),
        path => probes.not_found(path).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[derive(Default)]
    struct Fake {
        ready: AtomicBool,
        scrapes: AtomicUsize,
    }

    impl Probes for Fake {
        fn healthz(&self) -> Probe {
            Probe::json(StatusCode::OK, r#"{"status":"alive"}"#)
        }
        fn readyz(&self) -> Probe {
            if self.ready.load(Ordering::Relaxed) {
                Probe::json(StatusCode::OK, r#"{"status":"ready"}"#)
            } else {
                Probe::json(StatusCode::SERVICE_UNAVAILABLE, r#"{"status":"not ready"}"#)
            }
        }
        fn not_found(&self, path: &str) -> Probe {
            Probe::json(StatusCode::NOT_FOUND, format!(r#"{{"missing":"{path}"}}"#))
        }
        fn before_scrape(&self) {
            self.scrapes.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Counts open sockets, as the node's descriptor budget does.
    #[derive(Default)]
    struct Counted {
        sockets: AtomicUsize,
    }

    struct CountedSlot(Arc<Counted>);

    impl Drop for CountedSlot {
        fn drop(&mut self) {
            self.0.sockets.fetch_sub(1, Ordering::Relaxed);
        }
    }

    impl Descriptors for Counted {
        type Slot = CountedSlot;
        fn open(self: &Arc<Self>) -> CountedSlot {
            self.sockets.fetch_add(1, Ordering::Relaxed);
            CountedSlot(self.clone())
        }
        fn accept_failed(
            &self,
            _: &TcpListener,
            _: &io::Error,
        ) -> impl Future<Output = bool> + Send {
            std::future::ready(false)
        }
    }

    struct Port {
        address: std::net::SocketAddr,
        probes: Arc<Fake>,
        open: Arc<Counted>,
        shutdown: CancellationToken,
        server: tokio::task::JoinHandle<()>,
    }

    async fn start(header_timeout: Duration) -> Port {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let probes = Arc::new(Fake::default());
        let open = Arc::new(Counted::default());
        let shutdown = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            None,
            probes.clone(),
            open.clone(),
            header_timeout,
            shutdown.clone(),
        ));
        Port {
            address,
            probes,
            open,
            shutdown,
            server,
        }
    }

    /// One request on its own connection: the status line, headers and body.
    async fn get(port: &Port, path: &str) -> String {
        let mut stream = TcpStream::connect(port.address).await.unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    }

    #[tokio::test]
    async fn every_path_answers_from_the_binary_probes() {
        let port = start(Duration::from_secs(5)).await;
        let metrics = get(&port, "/metrics").await;
        assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
        assert!(metrics.contains("content-type: text/plain; version=0.0.4"));
        assert_eq!(port.probes.scrapes.load(Ordering::Relaxed), 1);

        let alive = get(&port, "/healthz").await;
        assert!(alive.starts_with("HTTP/1.1 200"), "{alive}");
        assert!(alive.contains("content-type: application/json"));
        assert!(alive.ends_with(r#"{"status":"alive"}"#));

        assert!(get(&port, "/readyz").await.starts_with("HTTP/1.1 503"));
        port.probes.ready.store(true, Ordering::Relaxed);
        let ready = get(&port, "/readyz").await;
        assert!(ready.starts_with("HTTP/1.1 200") && ready.ends_with(r#"{"status":"ready"}"#));

        let missing = get(&port, "/nope").await;
        assert!(missing.starts_with("HTTP/1.1 404") && missing.ends_with(r#"{"missing":"/nope"}"#));
        assert_eq!(port.probes.scrapes.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn a_client_that_trickles_its_request_head_is_dropped() {
        let port = start(Duration::from_millis(300)).await;
        let mut slow = TcpStream::connect(port.address).await.unwrap();
        slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: te")
            .await
            .unwrap();
        let mut rest = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), slow.read_to_end(&mut rest)).await;
        assert!(read.is_ok(), "still open after three header timeouts");
        // Its socket is counted out of the budget once it is gone.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(port.open.sockets.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn an_idle_kept_alive_connection_is_closed() {
        let port = start(Duration::from_millis(300)).await;
        let mut idle = TcpStream::connect(port.address).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut answer = Vec::new();
        let read =
            tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "kept open past three header timeouts");
        assert!(answer.starts_with(b"HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn shutdown_stops_the_port_though_a_client_holds_a_connection() {
        let port = start(Duration::from_millis(300)).await;
        let mut idle = TcpStream::connect(port.address).await.unwrap();
        idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        let mut first = [0u8; 12];
        idle.read_exact(&mut first).await.unwrap();
        assert_eq!(&first, b"HTTP/1.1 200");
        assert_eq!(port.open.sockets.load(Ordering::Relaxed), 1);
        port.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(2), port.server)
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
        assert!(TcpStream::connect(port.address).await.is_err());
    }
}
