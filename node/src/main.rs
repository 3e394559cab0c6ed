//! `belfry-node`: load the configuration, start the listeners, and drain
//! gracefully on SIGTERM.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use belfry_coordinator::metrics_server;
use belfry_node::config::{Cli, Config};
use belfry_node::edge::Edge;
use belfry_node::node::Node;
use belfry_node::tls::Tls;
use belfry_node::{server, shutdown, telemetry};
use clap::Parser;
use tokio::net::TcpListener;

/// jemalloc, because it gives freed memory back: with glibc's malloc a
/// burst of half-sent requests left RSS at its peak with nothing in use,
/// and `max_memory_mb` then refused every new client for minutes.
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read at its start: a background thread purges
/// freed pages after about a second, also while the node is idle.
#[cfg(feature = "jemalloc")]
#[allow(non_upper_case_globals)]
#[export_name = "_rjem_malloc_conf"]
pub static malloc_conf: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() {
    let cli = Cli::parse();
    belfry_coordinator::logging::init(cli.log_format);
    let names: Vec<String> = std::env::vars_os()
        .filter_map(|(name, _)| name.into_string().ok())
        .collect();
    let config = match Config::load_with(&cli, &|name| std::env::var(name).ok(), &names) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("belfry-node: {e}");
            std::process::exit(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build();
    let result = runtime
        .context("cannot start the async runtime")
        .and_then(|rt| rt.block_on(run(config)));
    if let Err(e) = result {
        eprintln!("belfry-node: {e:#}");
        std::process::exit(1);
    }
}

async fn run(config: Config) -> anyhow::Result<()> {
    let prometheus = metrics_server::install_recorder();
    let node = match config.redis_url.clone() {
        Some(url) => Node::clustered(config, &url)
            .await
            .map_err(anyhow::Error::msg)?,
        None => Node::embedded(config),
    };
    let config = &node.config;
    telemetry::zero_at_start(&config.apps.iter().map(|a| a.id.clone()).collect::<Vec<_>>());
    let edge = Edge::new(config);

    // Every task of the process's own: stopped together at the end.
    let mut servers = tokio::task::JoinSet::new();
    let stop_reloader = tokio_util::sync::CancellationToken::new();
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let tls = Tls::load(cert, key).map_err(anyhow::Error::msg)?;
            tracing::info!(cert = %cert.display(), "TLS on the main port: wss:// and https:// only; SIGHUP reloads the certificate");
            servers.spawn(tls.clone().reload_on_sighup(stop_reloader.clone()));
            Some(tls)
        }
        _ => None,
    };
    let address = format!("{}:{}", config.host, config.port);
    let listener = TcpListener::bind(&address)
        .await
        .with_context(|| format!("cannot listen on {address}"))?;
    servers.spawn(server::serve(
        node.clone(),
        edge.clone(),
        listener,
        tls.clone(),
    ));
    if config.metrics_port != 0 {
        let address = format!("{}:{}", config.host, config.metrics_port);
        let metrics = TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen for metrics on {address}"))?;
        // The node's own deadline and descriptor budget, and its drain: the
        // port answers (readiness failing) until the drain is over.
        servers.spawn(metrics_server::serve(
            metrics,
            prometheus,
            node.clone(),
            edge.fds.clone(),
            Duration::from_secs(config.header_timeout_secs),
            node.shutdown.stop_token(),
        ));
    }
    telemetry::ready(true, false);
    announce(&node);
    if edge.fds.usable() != usize::MAX {
        tracing::info!(
            client_sockets = edge.fds.usable(),
            reserve = config.fd_reserve,
            "file descriptors: new connections past the reserve get 503"
        );
    }

    shutdown::signal().await;
    drain(&node).await;
    stop_reloader.cancel();
    servers.shutdown().await;
    Ok(())
}

fn announce(node: &Arc<Node>) {
    let c = &node.config;
    let metrics = if c.metrics_port == 0 {
        "off".to_owned()
    } else {
        format!("{}:{}", c.host, c.metrics_port)
    };
    tracing::info!(
        "belfry-node listening on {}:{} (metrics {metrics}, {} app(s), {})",
        c.host,
        c.port,
        c.apps.len(),
        if node.is_clustered() {
            "Redis bus"
        } else {
            "embedded bus"
        }
    );
    if c.uses_dev_app() {
        let app = &c.apps[0];
        eprintln!(
            "\nDevelopment app (no configuration given):\n  REVERB_APP_ID={}\n  REVERB_APP_KEY={}\n  REVERB_APP_SECRET={}\n  REVERB_HOST={}\n  REVERB_PORT={}\n",
            app.id, app.key, app.secret, c.host, c.port
        );
    }
}

/// Readiness fails, clients are told to reconnect elsewhere, and the process
/// exits once they are gone or the grace period ends.
async fn drain(node: &Arc<Node>) {
    let grace = Duration::from_secs(node.config.shutdown_grace_secs);
    let deadline = tokio::time::Instant::now() + grace;
    node.shutdown.begin_drain();
    telemetry::ready(false, true);
    tracing::info!("SIGTERM: draining (readiness now fails)");
    let delay = Duration::from_secs(node.config.drain_delay_secs).min(grace / 2);
    tokio::time::sleep(delay).await;
    let closing = node.close_all_for_shutdown();
    tracing::info!(connections = closing, "closing connections with 4200");
    node.tasks.close();
    if tokio::time::timeout_at(deadline, node.tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("grace period over with connections still open; exiting");
    }
    node.leave_cluster().await;
    node.shutdown.stop_accepting();
}
