//! `belfry-bench`: a load generator for any Pusher-protocol-7 server on
//! loopback (Belfry, Reverb, soketi, sockudo). It connects many clients with
//! a minimal WebSocket client, publishes signed events through the HTTP API
//! and reports deliveries/s, loss, duplicates, latency percentiles and what
//! the server and the generator spent in memory and CPU.
//!
//! This file is the command line only; `scenario/` holds the workloads and
//! `micro` the in-process micro-benchmarks of the node's hot paths.

mod fleet;
mod intake;
mod micro;
mod procfs;
mod publish;
mod pusher;
mod report;
mod scenario;
mod stats;
mod ws;

use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};

use scenario::broadcast::BroadcastPlan;
use scenario::idle::IdlePlan;
use scenario::presence::PresencePlan;
use scenario::ramp::RampPlan;
use scenario::Common;

#[derive(Parser)]
#[command(
    name = "belfry-bench",
    version,
    about = "Load generator for Pusher-protocol-7 WebSocket servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// N subscribed, silent connections: server RSS per connection.
    Idle {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 3.0)]
        settle_secs: f64,
        /// Subscribe every client to the same channel.
        #[arg(long)]
        shared_channel: bool,
        #[command(flatten)]
        common: Common,
    },
    /// N subscribers on one channel, R events/s to it.
    Fanout {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Every client on its own channel, R events/s to random channels.
    Spread {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        #[arg(long, default_value_t = 1000.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Raise the event rate until p99 passes a bound or events are lost.
    Ramp {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// 1 = fan-out; more spreads the clients over that many channels.
        #[arg(long, default_value_t = 1)]
        channels: usize,
        #[arg(long, default_value_t = 10.0)]
        start_rate: f64,
        #[arg(long, default_value_t = 100_000.0)]
        max_rate: f64,
        /// Each step's rate is the previous one times this.
        #[arg(long, default_value_t = 1.5)]
        factor: f64,
        #[arg(long, default_value_t = 5.0)]
        step_secs: f64,
        /// A step fails when its p99 latency is above this.
        #[arg(long, default_value_t = 250.0)]
        p99_ms: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Join/leave churn on presence channels with observers timing member events.
    Presence {
        #[arg(long, default_value_t = 10)]
        channels: usize,
        /// Members that stay subscribed and count member_added/member_removed.
        #[arg(long, default_value_t = 500)]
        observers: usize,
        /// Connections that join and leave (one user each).
        #[arg(long, default_value_t = 100)]
        churners: usize,
        /// Joins per second over all churners.
        #[arg(long, default_value_t = 50.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Subscribers spread over several --ws nodes, publishing through --http.
    Cluster {
        #[arg(long, default_value_t = 1000)]
        clients: usize,
        /// 1 = fan-out; more spreads the clients over that many channels.
        #[arg(long, default_value_t = 1)]
        channels: usize,
        #[arg(long, default_value_t = 10.0)]
        rate: f64,
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        #[command(flatten)]
        common: Common,
    },
    /// Micro-benchmarks of the node's hot paths, in-process: ns per operation.
    Micro {
        /// A very short variant (well under 3 s) that only checks the code runs.
        #[arg(long)]
        quick: bool,
        /// Measured runs per benchmark (default 7, or 3 with --quick).
        #[arg(long)]
        runs: Option<usize>,
        /// Subscriber counts for the fan-out benchmarks (default 1000,10000).
        #[arg(long, value_delimiter = ',')]
        recipients: Option<Vec<usize>>,
        #[arg(long)]
        json: bool,
    },
    /// The Redis bus's intake alone: envelopes/s read from a real redis-server,
    /// decoded and handed on (the fan-out only counts).
    Intake {
        #[arg(long, default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        #[arg(long, default_value_t = 1_000_000)]
        count: u64,
        /// Envelopes per Publisher batch (one pipeline).
        #[arg(long, default_value_t = 1000)]
        batch: usize,
        /// Batches in flight at once.
        #[arg(long, default_value_t = 4)]
        lanes: usize,
        #[arg(long)]
        json: bool,
    },
    /// Print a free TCP port on 127.0.0.1 (for scripts).
    #[command(hide = true)]
    FreePort,
    /// Wait until GET {url}{path} answers 200 (for scripts).
    #[command(hide = true)]
    WaitReady {
        #[arg(long, default_value = "http://127.0.0.1:8080")]
        http: String,
        /// `/readyz` also waits for a cluster node's Redis.
        #[arg(long, default_value = "/up")]
        path: String,
        #[arg(long, default_value_t = 20.0)]
        timeout: f64,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let code = local.block_on(&runtime, run(cli.command))?;
    std::process::exit(code);
}

async fn run(command: Command) -> anyhow::Result<i32> {
    let (report, common) = match command {
        Command::Idle {
            clients,
            settle_secs,
            shared_channel,
            common,
        } => {
            let plan = IdlePlan {
                clients,
                settle_secs,
                shared_channel,
            };
            (scenario::idle::run(&common, plan).await?, common)
        }
        Command::Fanout {
            clients,
            rate,
            duration,
            common,
        } => {
            let plan = BroadcastPlan {
                clients,
                channels: 1,
                rate,
                duration_secs: duration,
            };
            (
                scenario::broadcast::run(&common, "fanout", plan).await?,
                common,
            )
        }
        Command::Spread {
            clients,
            rate,
            duration,
            common,
        } => {
            let plan = BroadcastPlan {
                clients,
                channels: clients,
                rate,
                duration_secs: duration,
            };
            (
                scenario::broadcast::run(&common, "spread", plan).await?,
                common,
            )
        }
        Command::Cluster {
            clients,
            channels,
            rate,
            duration,
            common,
        } => {
            let via_redis = common.publish == scenario::PublishVia::Redis;
            if common.ws.len() < 2 || (common.http.is_none() && !via_redis) {
                eprintln!(
                    "cluster: expected several --ws URLs, and an --http URL of another node \
                     or --publish redis"
                );
            }
            let plan = BroadcastPlan {
                clients,
                channels,
                rate,
                duration_secs: duration,
            };
            (
                scenario::broadcast::run(&common, "cluster", plan).await?,
                common,
            )
        }
        Command::Ramp {
            clients,
            channels,
            start_rate,
            max_rate,
            factor,
            step_secs,
            p99_ms,
            common,
        } => {
            let plan = RampPlan {
                clients,
                channels,
                start_rate,
                max_rate,
                factor,
                step_secs,
                p99_ms,
            };
            (scenario::ramp::run(&common, plan).await?, common)
        }
        Command::Presence {
            channels,
            observers,
            churners,
            rate,
            duration,
            common,
        } => {
            let plan = PresencePlan {
                channels,
                observers,
                churners,
                rate,
                duration_secs: duration,
            };
            (scenario::presence::run(&common, plan).await?, common)
        }
        Command::Micro {
            quick,
            runs,
            recipients,
            json,
        } => {
            let report = micro::run(micro::MicroPlan::new(quick, runs, recipients)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", report.table());
            }
            return Ok(0);
        }
        Command::Intake {
            redis_url,
            count,
            batch,
            lanes,
            json,
        } => {
            let report = intake::run(&redis_url, count, batch.max(1), lanes.max(1)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "intake: {} envelopes in {:.2} s = {:.0} envelopes/s, {:.2} us CPU per envelope (bench process)",
                    report.envelopes, report.seconds, report.envelopes_per_sec, report.cpu_us_per_envelope
                );
            }
            return Ok(0);
        }
        Command::FreePort => {
            let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
            println!("{}", listener.local_addr()?.port());
            return Ok(0);
        }
        Command::WaitReady {
            http,
            path,
            timeout,
        } => {
            return wait_ready(&http, &path, Duration::from_secs_f64(timeout)).await;
        }
    };
    scenario::emit(&report, &common)
}

/// Polls `GET {path}` every 100 ms; 0 once it answers 200, 1 on timeout.
async fn wait_ready(url: &str, path: &str, timeout: Duration) -> anyhow::Result<i32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let endpoint = ws::Endpoint::parse(url)?;
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        let attempt = async {
            let mut s = ws::tcp_connect(endpoint.addr, None).await?;
            let req = format!(
                "GET {}{path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                endpoint.prefix, endpoint.host_header
            );
            s.write_all(req.as_bytes()).await?;
            let mut head = [0u8; 12];
            s.read_exact(&mut head).await?;
            Ok::<bool, std::io::Error>(&head[9..12] == b"200")
        };
        if let Ok(Ok(true)) = tokio::time::timeout(Duration::from_secs(1), attempt).await {
            return Ok(0);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{url}{path} did not answer 200 within {timeout:?}");
    Ok(1)
}
