//! `belfry-coordinator`: the cluster's housekeeper (`run`, the default) and a
//! one-shot publisher for scripts and debugging (`publish`).
//!
//! This file only turns flags into the library's types and wires them up;
//! the work itself lives in `daemon` and `publisher`.

use std::time::Duration;

use anyhow::Context;
use belfry_coordinator::channel::check_channel_name;
use belfry_coordinator::daemon::{self, Coordinator, CoordinatorOptions};
use belfry_coordinator::keys::Keys;
use belfry_coordinator::logging::LogFormat;
use belfry_coordinator::metrics_server::{self, Unbudgeted};
use belfry_coordinator::publisher::Publisher;
use belfry_coordinator::redis::Redis;
use belfry_coordinator::webhook::WebhookApps;
use belfry_coordinator::Envelope;
use clap::{Args, Parser, Subcommand};
use fred::interfaces::ClientLike;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long a command waits for Redis before giving up.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a metrics client may take to send a request head: the nodes'
/// default `header_timeout_secs`. Scrapers and probes send theirs at once.
const METRICS_HEADER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Parser)]
#[command(
    name = "belfry-coordinator",
    version,
    about = "Belfry's cluster coordinator: expires presence of dead nodes (announcing member_removed), \
             reaps dead nodes' occupancy, and publishes envelopes from the command line.",
    long_about = None,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Without a subcommand, `run` with these flags.
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Campaign for leadership and, while leading, sweep (the default).
    Run(RunArgs),
    /// Publish one event straight into Redis and exit.
    Publish(PublishArgs),
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Redis to coordinate (required): redis://host:port/db or redis-cluster://host:port?node=host:port
    #[arg(long, env = "BELFRY_REDIS_URL")]
    redis_url: Option<String>,
    /// Without --redis-url: a Laravel .env whose REDIS_* name the Redis (the environment's REDIS_* win).
    #[arg(long, env = "BELFRY_ENV_FILE")]
    env_file: Option<std::path::PathBuf>,
    /// PEM CA certificate(s) trusted for a rediss:// Redis, besides the system's.
    #[arg(long, env = "BELFRY_REDIS_TLS_CA")]
    redis_tls_ca: Option<std::path::PathBuf>,
    /// Prefix of every Belfry key and pub/sub channel; the nodes must use the same.
    #[arg(long, env = "BELFRY_REDIS_PREFIX", default_value = "belfry")]
    redis_prefix: String,
    /// Address the metrics port listens on.
    #[arg(long, env = "BELFRY_HOST", default_value = "127.0.0.1")]
    host: String,
    /// Port serving /metrics, /healthz and /readyz; 0 turns it off.
    #[arg(long, env = "BELFRY_METRICS_PORT", default_value_t = 9602)]
    metrics_port: u16,
    /// How often the leader removes expired presence and dead nodes, in ms.
    #[arg(long, env = "BELFRY_SWEEP_INTERVAL_MS", default_value_t = 1000)]
    sweep_interval_ms: u64,
    /// How long a crashed leader's lock survives it, in ms (renewed every third).
    #[arg(long, env = "BELFRY_LEADER_TTL_MS", default_value_t = 5000)]
    leader_ttl_ms: u64,
    /// This replica's name in the leader lock [default: host-pid-nonce]
    #[arg(long, env = "BELFRY_INSTANCE_ID")]
    instance_id: Option<String>,
    /// Log format; RUST_LOG filters (e.g. RUST_LOG=belfry_coordinator=debug).
    #[arg(long, env = "BELFRY_LOG_FORMAT", value_enum, default_value_t = LogFormat::Pretty)]
    log_format: LogFormat,
    /// The nodes' TOML configuration file; its `[[apps]]` give the webhook
    /// URLs and the secrets to sign with. Without it, the app REVERB_APP_ID,
    /// REVERB_APP_KEY and REVERB_APP_SECRET define gets the webhooks of
    /// BELFRY_WEBHOOK_URL, BELFRY_WEBHOOK_EVENT_TYPES and BELFRY_WEBHOOK_GRACE_MS.
    #[arg(long, env = "BELFRY_CONFIG")]
    config: Option<std::path::PathBuf>,
    /// How long a refused webhook is retried before it is dropped, in seconds.
    #[arg(long, env = "BELFRY_WEBHOOK_RETRY_SECS", default_value_t = 600)]
    webhook_retry_secs: u64,
}

#[derive(Args)]
struct PublishArgs {
    /// Redis the nodes use.
    #[arg(long, env = "BELFRY_REDIS_URL")]
    redis_url: String,
    /// PEM CA certificate(s) trusted for a rediss:// Redis, besides the system's.
    #[arg(long, env = "BELFRY_REDIS_TLS_CA")]
    redis_tls_ca: Option<std::path::PathBuf>,
    /// Prefix of every Belfry key and pub/sub channel; the nodes must use the same.
    #[arg(long, env = "BELFRY_REDIS_PREFIX", default_value = "belfry")]
    redis_prefix: String,
    /// App id.
    #[arg(long)]
    app: String,
    /// Pusher channel name, e.g. private-orders.1
    #[arg(long, required_unless_present = "stdin")]
    channel: Option<String>,
    /// Event name.
    #[arg(long, required_unless_present = "stdin")]
    event: Option<String>,
    /// Event data exactly as clients should receive it (usually JSON text).
    #[arg(long, required_unless_present = "stdin")]
    data: Option<String>,
    /// Publish many events instead: one JSON object a line on standard input,
    /// `{"channel":..,"event":..,"data":..,"socket_id":..}` (`data` a string
    /// or any JSON value), in batches of `--batch`, `--in-flight` at once.
    #[arg(long, conflicts_with_all = ["channel", "event", "data"])]
    stdin: bool,
    /// Events per Redis pipeline with --stdin.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Batches in flight at once with --stdin.
    #[arg(long, default_value_t = 4)]
    in_flight: usize,
    /// A socket id to leave out (the publisher's own connection).
    #[arg(long)]
    socket_id: Option<String>,
    /// How long a cache channel keeps this event, in seconds.
    #[arg(long, default_value_t = 1800)]
    cache_ttl_secs: u64,
}

/// The Redis a Laravel app's `REDIS_*` name, from the environment or `.env`.
/// Runs `read` over the environment layered over `--env-file`, as the nodes
/// read a Laravel `.env`: the process environment wins.
fn with_laravel_env<T>(
    env_file: Option<&std::path::Path>,
    read: impl FnOnce(&dyn Fn(&str) -> Option<String>) -> T,
) -> anyhow::Result<T> {
    use belfry_coordinator::dotenv::{self, DotEnv};
    let process = |name: &str| std::env::var(name).ok();
    let file = env_file.map(|p| DotEnv::read(p, &process)).transpose()?;
    let env = dotenv::layered(&process, file.as_ref());
    Ok(read(&env))
}

fn laravel_redis_url(env_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    with_laravel_env(env_file, belfry_coordinator::dotenv::laravel_redis_url)
}

/// The app `REVERB_APP_*` define, with its `BELFRY_WEBHOOK_*` webhooks.
fn env_webhook_app(
    env_file: Option<&std::path::Path>,
) -> anyhow::Result<Option<belfry_coordinator::webhook::WebhookApp>> {
    with_laravel_env(env_file, belfry_coordinator::webhook::config::env_app)?
        .map_err(|e| anyhow::anyhow!(e))
}

fn main() {
    let cli = Cli::parse();
    let result = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
        .and_then(|runtime| {
            runtime.block_on(async {
                match cli.command {
                    Some(Command::Publish(args)) => publish(args).await,
                    Some(Command::Run(args)) => run(args).await,
                    None => run(cli.run).await,
                }
            })
        });
    if let Err(e) = result {
        eprintln!("belfry-coordinator: {e:#}");
        std::process::exit(1);
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    belfry_coordinator::logging::init(args.log_format);
    let prometheus = metrics_server::install_recorder();
    daemon::zero_metrics();
    belfry_coordinator::webhook::zero_metrics();
    let url = match args.redis_url {
        Some(url) => url,
        None => laravel_redis_url(args.env_file.as_deref())?.context(
            "--redis-url (or BELFRY_REDIS_URL, or REDIS_* in --env-file) is required: the coordinator works on the cluster's Redis",
        )?,
    };
    let redis = Redis::connect_with_ca(&url, args.redis_tls_ca.as_deref())
        .context("cannot use --redis-url")?;
    if !redis.wait_connected(CONNECT_TIMEOUT).await {
        let why = redis.last_error().unwrap_or_else(|| "no answer yet".into());
        tracing::warn!("Redis is not usable yet ({why}); retrying in the background");
    }
    let mut options = CoordinatorOptions {
        sweep_interval: Duration::from_millis(args.sweep_interval_ms.max(10)),
        leader_ttl: Duration::from_millis(args.leader_ttl_ms.max(30)),
        ..CoordinatorOptions::default()
    };
    if let Some(id) = args.instance_id {
        options.instance_id = id;
    }
    if let Some(path) = &args.config {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let apps = WebhookApps::from_toml(&text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        options.webhooks = std::sync::Arc::new(apps);
    } else if let Some(app) = env_webhook_app(args.env_file.as_deref())? {
        // Configured by environment like the nodes (docker-compose, a Laravel .env).
        let apps = WebhookApps::new([app]).map_err(|e| anyhow::anyhow!(e))?;
        options.webhooks = std::sync::Arc::new(apps);
    }
    options.dispatch.retry_for = Duration::from_secs(args.webhook_retry_secs);
    let coordinator = Coordinator::new(redis.clone(), Keys::new(&args.redis_prefix), options);
    let shutdown = CancellationToken::new();

    let mut tasks = tokio::task::JoinSet::new();
    if args.metrics_port != 0 {
        let address = format!("{}:{}", args.host, args.metrics_port);
        let listener = TcpListener::bind(&address)
            .await
            .with_context(|| format!("cannot listen for metrics on {address}"))?;
        tasks.spawn(metrics_server::serve(
            listener,
            prometheus,
            std::sync::Arc::new(coordinator.health()),
            std::sync::Arc::new(Unbudgeted),
            METRICS_HEADER_TIMEOUT,
            shutdown.clone(),
        ));
    }
    tasks.spawn(cancel_on_signal(shutdown.clone()));
    tasks.spawn(redis.clone().probe_health(shutdown.clone()));
    tracing::info!(
        instance = %coordinator.instance_id(),
        prefix = %args.redis_prefix,
        metrics = args.metrics_port,
        "belfry-coordinator running"
    );

    coordinator.run(shutdown.clone()).await;
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    let _ = redis.client.quit().await;
    let _ = redis.subscriber.quit().await;
    tracing::info!("belfry-coordinator stopped");
    Ok(())
}

async fn cancel_on_signal(shutdown: CancellationToken) {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the coordinator");
            let _ = tokio::signal::ctrl_c().await;
            shutdown.cancel();
            return;
        }
    };
    tokio::select! {
        _ = shutdown.cancelled() => return,
        _ = term.recv() => tracing::info!("SIGTERM: releasing leadership and exiting"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: releasing leadership and exiting"),
    }
    shutdown.cancel();
}

async fn publish(args: PublishArgs) -> anyhow::Result<()> {
    // Refused before Redis is touched: no client could subscribe to it.
    if let Some(channel) = &args.channel {
        check_channel_name(channel)
            .with_context(|| format!("invalid --channel {channel:?}; nothing was published"))?;
    }
    let redis = Redis::connect_with_ca(&args.redis_url, args.redis_tls_ca.as_deref())
        .context("cannot use --redis-url")?;
    if !redis.wait_connected(CONNECT_TIMEOUT).await {
        let why = redis.last_error().unwrap_or_else(|| "no answer".into());
        anyhow::bail!(
            "cannot use Redis within {}s ({why}); nothing was published",
            CONNECT_TIMEOUT.as_secs()
        );
    }
    let publisher = Publisher::new(redis.clone(), Keys::new(&args.redis_prefix))
        .with_cache_ttl(Duration::from_secs(args.cache_ttl_secs));
    if args.stdin {
        let outcome = publish_lines(&publisher, &args).await;
        let _ = redis.client.quit().await;
        return outcome;
    }
    let (Some(channel), Some(event), Some(data)) = (args.channel, args.event, args.data) else {
        anyhow::bail!("--channel, --event and --data are required without --stdin");
    };
    let mut envelope = Envelope::event(&args.app, &channel, &event, data);
    envelope.socket_id = args.socket_id;
    let receivers = publisher
        .publish_batch(vec![envelope.clone()])
        .await
        .context("publish failed")?;
    let nodes = receivers.first().copied().unwrap_or(0);
    println!(
        "published {} to app {} channel {} ({} bytes of data{}); {} node(s) subscribed",
        envelope.event,
        envelope.app,
        envelope.channel,
        envelope.data.len(),
        envelope
            .socket_id
            .as_deref()
            .map(|s| format!(", excluding socket {s}"))
            .unwrap_or_default(),
        nodes
    );
    let _ = redis.client.quit().await;
    Ok(())
}

/// One line of `publish --stdin`.
#[derive(serde::Deserialize)]
struct Line {
    channel: String,
    event: String,
    #[serde(default)]
    data: serde_json::Value,
    #[serde(default)]
    socket_id: Option<String>,
}

/// Publishes every line of standard input, batched; fails (after sending
/// everything else) if any batch was refused or its outcome is unknown.
async fn publish_lines(publisher: &Publisher, args: &PublishArgs) -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use tokio::io::AsyncBufReadExt;
    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    let mut batches = Vec::new();
    let mut batch = Vec::new();
    let mut number = 0usize;
    while let Some(line) = lines.next_line().await? {
        number += 1;
        if line.trim().is_empty() {
            continue;
        }
        let line: Line = serde_json::from_str(&line).with_context(|| {
            format!("line {number} is not an event object; nothing was published")
        })?;
        check_channel_name(&line.channel).with_context(|| {
            format!(
                "line {number}: invalid channel {:?}; nothing was published",
                line.channel
            )
        })?;
        let data = match line.data {
            serde_json::Value::String(s) => s,
            other => other.to_string(),
        };
        let mut envelope = Envelope::event(&args.app, &line.channel, &line.event, data);
        envelope.socket_id = line.socket_id;
        batch.push(envelope);
        if batch.len() >= args.batch.max(1) {
            batches.push(std::mem::take(&mut batch));
        }
    }
    if !batch.is_empty() {
        batches.push(batch);
    }
    let events: usize = batches.iter().map(Vec::len).sum();
    let results: Vec<_> = futures_util::stream::iter(batches.into_iter().map(|b| {
        let n = b.len();
        async move { (n, publisher.publish_batch(b).await) }
    }))
    .buffer_unordered(args.in_flight.max(1))
    .collect()
    .await;
    let (mut sent, mut not_sent, mut unknown) = (0, 0, 0);
    for (n, result) in results {
        match result {
            Ok(_) => sent += n,
            Err(belfry_coordinator::publisher::PublishError::NotSent(_)) => not_sent += n,
            Err(belfry_coordinator::publisher::PublishError::Unknown(_)) => unknown += n,
        }
    }
    println!("published {sent} of {events} events; {not_sent} not sent, {unknown} outcome unknown");
    anyhow::ensure!(
        not_sent == 0 && unknown == 0,
        "{not_sent} events were not sent and {unknown} may or may not have been"
    );
    Ok(())
}
