//! Configuration: one typed struct with its defaults, loaded from a TOML
//! file, then environment variables (Belfry's own and Laravel Reverb's),
//! then the command line, each overriding the one before.
//!
//! A bad file is refused at start with a message naming the field; with no
//! configuration at all the node serves one development app.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub mod laravel;

/// Command line. Every flag has a `BELFRY_*` variable too.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "belfry-node",
    version,
    about = "Belfry edge node: a Pusher protocol 7 WebSocket server and HTTP API, drop-in for Laravel Reverb.",
    after_help = "Reverb's REVERB_* and Laravel's REDIS_* variables are read too, from the \
environment or from the app's .env (--env-file), so a Laravel app starts it unchanged. With no \
configuration it serves one development app and prints its credentials. See docs/configuration.md."
)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, env = "BELFRY_CONFIG")]
    pub config: Option<PathBuf>,
    /// A Laravel .env to read REVERB_* and REDIS_* from; the process environment wins over it.
    #[arg(long, env = "BELFRY_ENV_FILE")]
    pub env_file: Option<PathBuf>,
    /// Address to listen on for WebSockets and the HTTP API [default: 127.0.0.1].
    #[arg(long, env = "BELFRY_HOST")]
    pub host: Option<String>,
    /// Port for WebSockets and the HTTP API [default: 8080].
    #[arg(long, env = "BELFRY_PORT")]
    pub port: Option<u16>,
    /// PEM certificate chain: the main port then serves wss:// and https:// (with --tls-key). Reloaded on SIGHUP.
    #[arg(long, env = "BELFRY_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "BELFRY_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Port for /metrics, /healthz and /readyz; 0 turns it off [default: 9601].
    #[arg(long, env = "BELFRY_METRICS_PORT")]
    pub metrics_port: Option<u16>,
    /// Redis URL; switches the node to cluster mode (redis:// or redis-cluster://).
    #[arg(long, env = "BELFRY_REDIS_URL")]
    pub redis_url: Option<String>,
    /// Prefix of every Belfry Redis key and pub/sub channel; coordinator and publishers must match [default: belfry].
    #[arg(long, env = "BELFRY_REDIS_PREFIX")]
    pub redis_prefix: Option<String>,
    /// PEM CA certificate(s) trusted for rediss://, besides the system's.
    #[arg(long, env = "BELFRY_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<PathBuf>,
    /// Path prefix in front of /app and /apps, e.g. /ws.
    #[arg(long, env = "BELFRY_PATH_PREFIX")]
    pub path_prefix: Option<String>,
    /// Node-wide connection ceiling; new connections over it get 4100 (0 = none).
    #[arg(long, env = "BELFRY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Refuse new connections (4100) while resident memory is above this many MiB (0 = none).
    #[arg(long, env = "BELFRY_MAX_MEMORY_MB")]
    pub max_memory_mb: Option<u64>,
    /// WebSockets one client address may hold open at once; over it: 429 (0 = none) [default: 2000].
    #[arg(long, env = "BELFRY_MAX_CONNECTIONS_PER_IP")]
    pub max_connections_per_ip: Option<usize>,
    /// New WebSockets one client address may open a minute, in a burst; over it: 429 (0 = none) [default: 2000].
    #[arg(long, env = "BELFRY_CONNECTIONS_PER_IP_PER_MINUTE")]
    pub connections_per_ip_per_minute: Option<u32>,
    /// Proxies whose X-Forwarded-For / Forwarded is believed: comma-separated CIDRs, e.g. 10.0.0.0/8.
    #[arg(long, env = "BELFRY_TRUSTED_PROXIES", value_delimiter = ',')]
    pub trusted_proxies: Option<Vec<String>>,
    /// Seconds a request head may take to arrive (slowloris) [default: 5].
    #[arg(long, env = "BELFRY_HEADER_TIMEOUT_SECS")]
    pub header_timeout_secs: Option<u64>,
    /// Seconds an HTTP API request body may take to arrive; over it: 408 [default: 10].
    #[arg(long, env = "BELFRY_BODY_TIMEOUT_SECS")]
    pub body_timeout_secs: Option<u64>,
    /// File descriptors kept free; over the line new connections get 503 at once (0 = off) [default: 128].
    #[arg(long, env = "BELFRY_FD_RESERVE")]
    pub fd_reserve: Option<usize>,
    /// Fan-out shards (0 = one per available CPU).
    #[arg(long, env = "BELFRY_FANOUT_SHARDS")]
    pub fanout_shards: Option<usize>,
    /// HTTP API requests per second for every app, overriding the file; over it: 429 (0 = none).
    #[arg(long, env = "BELFRY_API_REQUESTS_PER_SECOND")]
    pub api_requests_per_second: Option<u32>,
    /// Seconds a refused webhook is retried before it is dropped, on a single node [default: 600].
    #[arg(long, env = "BELFRY_WEBHOOK_RETRY_SECS")]
    pub webhook_retry_secs: Option<u64>,
    /// Seconds from SIGTERM to exit, at most [default: 25].
    #[arg(long, env = "BELFRY_SHUTDOWN_GRACE_SECS")]
    pub shutdown_grace_secs: Option<u64>,
    /// Seconds readiness fails before clients are closed with 4200 [default: 1].
    #[arg(long, env = "BELFRY_DRAIN_DELAY_SECS")]
    pub drain_delay_secs: Option<u64>,
    /// Log format: "pretty" for development, "json" for production.
    #[arg(long, env = "BELFRY_LOG_FORMAT", default_value = "pretty")]
    pub log_format: LogFormat,
}

pub use belfry_coordinator::logging::LogFormat;

/// Who may send client events (`client-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientEvents {
    /// Any subscriber, on public channels too (Reverb's `all`).
    All,
    /// Subscribers of private and presence channels only (Pusher).
    #[default]
    Members,
    /// Nobody.
    None,
}

/// One application: its credentials and limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    pub id: String,
    pub key: String,
    pub secret: String,
    /// Origins allowed to connect; host patterns such as `*.example.com`, or `*`.
    pub allowed_origins: Vec<String>,
    /// Connections for this app; 0 means no limit. Over it: 4004.
    pub max_connections: usize,
    pub client_events: ClientEvents,
    /// Seconds sent to clients as `activity_timeout`: how long they stay
    /// silent before they ping. Also the server's ping interval unless
    /// `ping_interval` is set.
    pub activity_timeout: u64,
    /// Seconds of silence after which the server pings a client (Reverb's
    /// `ping_interval`); 0 means the same as `activity_timeout`.
    pub ping_interval: u64,
    /// Seconds to wait for any reply to a server ping before closing with 4201.
    pub pong_timeout: u64,
    /// Largest WebSocket message accepted from a client; larger closes with 1009.
    pub max_message_bytes: usize,
    /// Largest event `data` accepted by the HTTP API (413 over it).
    pub max_payload_bytes: usize,
    pub max_channels_per_trigger: usize,
    pub max_batch_size: usize,
    pub max_presence_members: usize,
    pub max_user_info_bytes: usize,
    /// Channels one connection may be subscribed to at once.
    pub max_channels_per_connection: usize,
    /// Client events per connection per second; over it: 4301.
    pub client_event_rate: u32,
    /// Signed HTTP API requests per second (a burst of one second's worth
    /// passes); over it: 429 with `Retry-After`. 0 means none.
    pub api_requests_per_second: u32,
    /// How long a cache channel keeps its last event.
    pub cache_ttl_secs: u64,
    /// Cluster mode: also take Laravel's Redis broadcaster messages, which it
    /// PUBLISHes to `{prefix}{channel}` (e.g. "laravel_database_").
    pub laravel_redis_prefix: Option<String>,
    /// `[[apps.webhooks]]`: URLs that get Pusher's webhooks (docs/webhooks.md).
    pub webhooks: Vec<belfry_coordinator::webhook::WebhookTarget>,
    /// Send `pusher_internal:subscription_count` (pusher-js:
    /// `pusher:subscription_count`) to the subscribers of every channel but
    /// presence ones, at most once a second per channel, cluster-wide.
    pub subscription_count_events: bool,
    /// Milliseconds a `channel_vacated` or `member_removed` webhook waits;
    /// the pair is left out if the channel or user is back within it.
    pub webhook_grace_ms: u64,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            key: String::new(),
            secret: String::new(),
            allowed_origins: vec!["*".into()],
            max_connections: 0,
            client_events: ClientEvents::Members,
            activity_timeout: 30,
            ping_interval: 0,
            pong_timeout: 30,
            max_message_bytes: 10_240,
            max_payload_bytes: 10_240,
            max_channels_per_trigger: 100,
            max_batch_size: 10,
            max_presence_members: 100,
            max_user_info_bytes: 1_024,
            max_channels_per_connection: 500,
            client_event_rate: 10,
            api_requests_per_second: 0,
            cache_ttl_secs: 1_800,
            laravel_redis_prefix: None,
            webhooks: Vec::new(),
            subscription_count_events: false,
            webhook_grace_ms: belfry_coordinator::webhook::config::DEFAULT_GRACE_MS,
        }
    }
}

/// The whole node configuration.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub host: String,
    pub port: u16,
    /// 0 turns the metrics listener off.
    pub metrics_port: u16,
    /// PEM certificate chain; with `tls_key` the main port speaks TLS only (wss://, https://).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    pub path_prefix: String,
    /// Cluster mode when set.
    pub redis_url: Option<String>,
    /// PEM CA certificate(s) a `rediss://` Redis is verified against, besides the system's roots.
    pub redis_tls_ca: Option<PathBuf>,
    /// Prefix of every Redis key and pub/sub channel Belfry uses.
    pub redis_prefix: String,
    /// Largest HTTP API request body, in bytes (413 over it); 0 means what
    /// the app's limits allow (a full batch of full events).
    pub max_request_bytes: usize,
    /// Cluster mode: this node's name in Redis; defaults to host name, pid and a random suffix.
    pub node_id: Option<String>,
    /// Cluster mode: seconds a presence connection outlives its node's last refresh.
    pub presence_ttl_secs: u64,
    /// Node-wide connection ceiling (admission control); 0 means none. Over it: 4100.
    pub max_connections: usize,
    /// Refuse new connections (4100) while the process's resident memory is above this; 0 means none.
    pub max_memory_mb: u64,
    /// Per-connection send queue, in frames; a client that falls this far behind is closed with 4100.
    pub send_queue_frames: usize,
    /// WebSockets one client address (IPv4, or IPv6 /64) may hold at once; 0 means none. Over it: 429.
    pub max_connections_per_ip: usize,
    /// New WebSockets one address may open a minute, all at once if its
    /// bucket is full; 0 means none. Over it: 429 with `Retry-After`.
    pub connections_per_ip_per_minute: u32,
    /// CIDRs of proxies whose `X-Forwarded-For` / `Forwarded` is believed.
    pub trusted_proxies: Vec<String>,
    /// Seconds a request head may take to arrive, on a new or kept-alive connection.
    pub header_timeout_secs: u64,
    /// Seconds an HTTP API request body may take to arrive; over it: 408.
    pub body_timeout_secs: u64,
    /// File descriptors kept free for probes, metrics and Redis; new
    /// connections over the line are answered 503 and closed. 0 means off.
    pub fd_reserve: usize,
    /// Fan-out shards: each owns a share of the connections and writes its
    /// own sockets, so one channel's fan-out runs on every core. 0 means one
    /// per available CPU.
    pub fanout_shards: usize,
    /// Single node: seconds a refused webhook is retried before it is
    /// dropped (in a cluster the coordinator's `--webhook-retry-secs`).
    pub webhook_retry_secs: u64,
    /// Seconds between SIGTERM and the process exiting, at most.
    pub shutdown_grace_secs: u64,
    /// Seconds readiness fails before clients are closed, so load balancers stop sending new ones.
    pub drain_delay_secs: u64,
    pub apps: Vec<AppConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8080,
            metrics_port: 9601,
            tls_cert: None,
            tls_key: None,
            path_prefix: String::new(),
            redis_url: None,
            redis_tls_ca: None,
            redis_prefix: "belfry".into(),
            max_request_bytes: 0,
            node_id: None,
            presence_ttl_secs: 30,
            max_connections: 0,
            max_memory_mb: 0,
            send_queue_frames: 1_024,
            max_connections_per_ip: 2_000,
            connections_per_ip_per_minute: 2_000,
            trusted_proxies: Vec::new(),
            header_timeout_secs: 5,
            body_timeout_secs: 10,
            fd_reserve: 128,
            fanout_shards: 0,
            webhook_retry_secs: 600,
            shutdown_grace_secs: 25,
            drain_delay_secs: 1,
            apps: Vec::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

/// The development app served when nothing else is configured.
pub const DEV_APP: (&str, &str, &str) = ("belfry", "belfry-key", "belfry-secret");

impl Config {
    /// The number of fan-out shards to run: `fanout_shards`, or one per CPU
    /// this process may use.
    pub fn fanout_shards(&self) -> usize {
        match self.fanout_shards {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }

    /// Builds the configuration from file, environment and command line.
    /// `env` is a lookup so tests need not touch the process environment.
    pub fn load(cli: &Cli, env: &dyn Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        Self::load_with(cli, env, &[])
    }

    /// `load`, where `env_names` are the process environment's variable
    /// names, so unknown `REVERB_*` ones can be warned about.
    pub fn load_with(
        cli: &Cli,
        env: &dyn Fn(&str) -> Option<String>,
        env_names: &[String],
    ) -> Result<Config, ConfigError> {
        let mut config = match &cli.config {
            Some(path) => Self::from_file(path)?,
            None => Config::default(),
        };
        let file = match &cli.env_file {
            Some(path) => Some(
                belfry_coordinator::dotenv::DotEnv::read(path, env)
                    .map_err(|e| ConfigError::Invalid(e.to_string()))?,
            ),
            None => None,
        };
        let mut names = env_names.to_vec();
        names.extend(file.iter().flat_map(|f| f.names().map(str::to_owned)));
        let layered = belfry_coordinator::dotenv::layered(env, file.as_ref());
        for warning in laravel::apply(&mut config, &layered, &names)? {
            tracing::warn!("{warning}");
        }
        if let Some(host) = &cli.host {
            config.host = host.clone();
        }
        if let Some(port) = cli.port {
            config.port = port;
        }
        if let Some(port) = cli.metrics_port {
            config.metrics_port = port;
        }
        if let Some(url) = &cli.redis_url {
            config.redis_url = Some(url.clone());
        }
        if let Some(prefix) = &cli.redis_prefix {
            config.redis_prefix = prefix.clone();
        }
        if let Some(cert) = &cli.tls_cert {
            config.tls_cert = Some(cert.clone());
        }
        if let Some(key) = &cli.tls_key {
            config.tls_key = Some(key.clone());
        }
        if let Some(ca) = &cli.redis_tls_ca {
            config.redis_tls_ca = Some(ca.clone());
        }
        if let Some(prefix) = &cli.path_prefix {
            config.path_prefix = prefix.clone();
        }
        if let Some(n) = cli.max_connections {
            config.max_connections = n;
        }
        if let Some(n) = cli.max_memory_mb {
            config.max_memory_mb = n;
        }
        if let Some(n) = cli.max_connections_per_ip {
            config.max_connections_per_ip = n;
        }
        if let Some(n) = cli.connections_per_ip_per_minute {
            config.connections_per_ip_per_minute = n;
        }
        if let Some(list) = &cli.trusted_proxies {
            config.trusted_proxies = list
                .iter()
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect();
        }
        if let Some(n) = cli.header_timeout_secs {
            config.header_timeout_secs = n;
        }
        if let Some(n) = cli.body_timeout_secs {
            config.body_timeout_secs = n;
        }
        if let Some(n) = cli.fd_reserve {
            config.fd_reserve = n;
        }
        if let Some(n) = cli.webhook_retry_secs {
            config.webhook_retry_secs = n;
        }
        if let Some(n) = cli.fanout_shards {
            config.fanout_shards = n;
        }
        if let Some(n) = cli.shutdown_grace_secs {
            config.shutdown_grace_secs = n;
        }
        if let Some(n) = cli.drain_delay_secs {
            config.drain_delay_secs = n;
        }
        config.path_prefix = normalize_prefix(&config.path_prefix);
        config.validate()?;
        // After validation, which may have added the development app.
        if let Some(n) = cli.api_requests_per_second {
            for app in &mut config.apps {
                app.api_requests_per_second = n;
            }
        }
        Ok(config)
    }

    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| ConfigError::Parse {
            path: path.to_owned(),
            message,
        })
    }

    pub fn from_toml(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string().trim_end().to_owned())
    }

    /// Seconds of silence after which the server pings a client of `app`.
    pub fn ping_after(app: &AppConfig) -> std::time::Duration {
        let secs = if app.ping_interval == 0 {
            app.activity_timeout
        } else {
            app.ping_interval
        };
        std::time::Duration::from_secs(secs)
    }

    /// True when the development app is being served because nothing was configured.
    pub fn uses_dev_app(&self) -> bool {
        self.apps.len() == 1 && self.apps[0].id == DEV_APP.0 && self.apps[0].secret == DEV_APP.2
    }

    fn validate(&mut self) -> Result<(), ConfigError> {
        if self.apps.is_empty() {
            self.apps.push(AppConfig {
                id: DEV_APP.0.into(),
                key: DEV_APP.1.into(),
                secret: DEV_APP.2.into(),
                ..AppConfig::default()
            });
        }
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        for (i, app) in self.apps.iter().enumerate() {
            for (field, value) in [("id", &app.id), ("key", &app.key), ("secret", &app.secret)] {
                if value.is_empty() {
                    return invalid(format!("apps[{i}].{field} must not be empty"));
                }
            }
            if app.key.contains('/') || app.id.contains('/') {
                return invalid(format!("apps[{i}]: id and key must not contain '/'"));
            }
            if let Some(e) = app.webhooks.iter().find_map(|w| w.check().err()) {
                return invalid(format!("apps[{i}].webhooks: {e}"));
            }
            if app.activity_timeout == 0 {
                return invalid(format!(
                    "apps[{i}].activity_timeout must be at least 1 second"
                ));
            }
            if app.pong_timeout == 0 {
                return invalid(format!("apps[{i}].pong_timeout must be at least 1 second"));
            }
            if app.max_message_bytes < 128 {
                return invalid(format!("apps[{i}].max_message_bytes must be at least 128"));
            }
            for (j, other) in self.apps.iter().enumerate().skip(i + 1) {
                if other.id == app.id {
                    return invalid(format!("apps[{j}].id duplicates apps[{i}].id ({})", app.id));
                }
                if other.key == app.key {
                    return invalid(format!("apps[{j}].key duplicates apps[{i}].key"));
                }
            }
        }
        let prefixes: Vec<&String> = self
            .apps
            .iter()
            .filter_map(|a| a.laravel_redis_prefix.as_ref())
            .collect();
        for (i, p) in prefixes.iter().enumerate() {
            if p.is_empty() || p.starts_with(&format!("{}:", self.redis_prefix)) {
                return invalid(format!(
                    "laravel_redis_prefix {p:?} must be non-empty and not overlap redis_prefix"
                ));
            }
            if prefixes[i + 1..]
                .iter()
                .any(|q| q.starts_with(p.as_str()) || p.starts_with(q.as_str()))
            {
                return invalid(format!("laravel_redis_prefix {p:?} overlaps another app's"));
            }
        }
        if self.presence_ttl_secs < 3 {
            return invalid("presence_ttl_secs must be at least 3".into());
        }
        for cidr in &self.trusted_proxies {
            crate::edge::address::Cidr::parse(cidr)
                .map_err(|e| ConfigError::Invalid(format!("trusted_proxies: {e}")))?;
        }
        if self.header_timeout_secs == 0 || self.body_timeout_secs == 0 {
            return invalid("header_timeout_secs and body_timeout_secs must be at least 1".into());
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return invalid("tls_cert and tls_key go together: set both, or neither".into());
        }
        if self.send_queue_frames == 0 {
            return invalid("send_queue_frames must be at least 1".into());
        }
        if self.fanout_shards > 1024 {
            return invalid("fanout_shards must be at most 1024".into());
        }
        Ok(())
    }
}

/// "/ws/" and "ws" both become "/ws"; "" and "/" become "".
fn normalize_prefix(prefix: &str) -> String {
    let trimmed = prefix.trim_matches('/');
    if trimmed.is_empty() {
        String::new()
    } else {
        format!("/{trimmed}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn no_env(_: &str) -> Option<String> {
        None
    }

    #[test]
    fn nothing_configured_serves_the_dev_app_locally() {
        let config = Config::load(&Cli::default(), &no_env).unwrap();
        assert_eq!(config.host, "127.0.0.1");
        assert_eq!(config.port, 8080);
        assert!(config.uses_dev_app());
    }

    #[test]
    fn reverb_env_starts_a_laravel_app_unchanged() {
        let env = |name: &str| match name {
            "REVERB_APP_ID" => Some("123".to_owned()),
            "REVERB_APP_KEY" => Some("k".to_owned()),
            "REVERB_APP_SECRET" => Some("s".to_owned()),
            "REVERB_SERVER_PORT" => Some("6001".to_owned()),
            "REVERB_SERVER_HOST" => Some("0.0.0.0".to_owned()),
            _ => None,
        };
        let config = Config::load(&Cli::default(), &env).unwrap();
        assert_eq!(config.port, 6001);
        assert_eq!(config.host, "0.0.0.0");
        assert_eq!(config.apps[0].id, "123");
        assert!(!config.uses_dev_app());
    }

    #[test]
    fn command_line_beats_environment() {
        let env = |name: &str| (name == "REVERB_SERVER_PORT").then(|| "6001".to_owned());
        let cli = Cli {
            port: Some(7000),
            path_prefix: Some("ws/".into()),
            ..Cli::default()
        };
        let config = Config::load(&cli, &env).unwrap();
        assert_eq!(config.port, 7000);
        assert_eq!(config.path_prefix, "/ws");
    }

    #[test]
    fn a_bad_field_is_named() {
        let err = Config::from_toml(
            "[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\nmax_conections = 5\n",
        )
        .unwrap_err();
        assert!(err.contains("max_conections"), "{err}");
        let err = Config::from_toml("port = \"eighty\"").unwrap_err();
        assert!(err.contains("port"), "{err}");
    }

    #[test]
    fn docs_list_every_field() {
        let docs = include_str!("../../docs/configuration.md");
        let config = Config {
            redis_url: Some(String::new()),
            redis_tls_ca: Some(PathBuf::new()),
            tls_cert: Some(PathBuf::new()),
            tls_key: Some(PathBuf::new()),
            node_id: Some(String::new()),
            apps: vec![AppConfig {
                laravel_redis_prefix: Some(String::new()),
                ..AppConfig::default()
            }],
            ..Config::default()
        };
        let value = toml::Value::try_from(&config).unwrap();
        let app = value["apps"][0].as_table().unwrap().clone();
        let fields = value.as_table().unwrap().keys().chain(app.keys());
        for field in fields {
            assert!(
                docs.contains(&format!("| `{field}` |")),
                "docs/configuration.md misses `{field}`"
            );
        }
    }

    #[test]
    fn docs_list_every_flag_and_variable() {
        use clap::CommandFactory;
        let docs = include_str!("../../docs/configuration.md");
        for arg in Cli::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                assert!(
                    docs.contains(&format!("| `--{long}")),
                    "docs/configuration.md misses --{long}"
                );
            }
            if let Some(env) = arg.get_env().and_then(|e| e.to_str()) {
                assert!(
                    docs.contains(&format!("`{env}`")),
                    "docs/configuration.md misses {env}"
                );
            }
        }
    }

    #[test]
    fn edge_limits_load_from_flags_and_bad_proxies_are_refused() {
        let cli = Cli {
            trusted_proxies: Some(vec!["10.0.0.0/8".into(), " fd00::/8".into()]),
            api_requests_per_second: Some(50),
            max_connections_per_ip: Some(0),
            ..Cli::default()
        };
        let config = Config::load(&cli, &no_env).unwrap();
        assert_eq!(config.trusted_proxies, ["10.0.0.0/8", "fd00::/8"]);
        assert_eq!(config.apps[0].api_requests_per_second, 50);
        assert_eq!(config.max_connections_per_ip, 0);
        assert_eq!(config.connections_per_ip_per_minute, 2_000);
        let cli = Cli {
            trusted_proxies: Some(vec!["ingress.local".into()]),
            ..Cli::default()
        };
        let err = Config::load(&cli, &no_env).unwrap_err().to_string();
        assert!(err.contains("trusted_proxies"), "{err}");
    }

    #[test]
    fn app_fields_default_and_empty_secret_is_refused() {
        let mut config =
            Config::from_toml("[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"\"\n").unwrap();
        assert_eq!(config.apps[0].max_batch_size, 10);
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("apps[0].secret"), "{err}");
    }
}
