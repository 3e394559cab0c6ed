//! What a Laravel app's Reverb and Redis variables mean for the node, so the
//! app's own `.env` (or environment) starts Belfry as it would start Reverb.
//!
//! Each `REVERB_*` variable is either honoured here, known to be read only by
//! the Laravel app (the client-facing `REVERB_HOST`, `REVERB_PORT`,
//! `REVERB_SCHEME`), or warned about by name: none is dropped silently.
//! Values go through Laravel's `env()` conversions, so `null` means unset.
//! The reading of the file itself is `belfry_coordinator::dotenv`.

use belfry_coordinator::dotenv::{laravel_redis_prefix, laravel_redis_url, EnvValue};

use super::{AppConfig, ClientEvents, Config, ConfigError};

/// Read by the Laravel app (the broadcaster and Echo), not by a server.
const APP_SIDE: &[&str] = &[
    "REVERB_HOST",
    "REVERB_PORT",
    "REVERB_SCHEME",
    "REVERB_SERVER",
];

/// Per-app options, applied to the app the variables define.
const APP_OPTIONS: &[&str] = &[
    "REVERB_APP_PING_INTERVAL",
    "REVERB_APP_ACTIVITY_TIMEOUT",
    "REVERB_APP_MAX_CONNECTIONS",
    "REVERB_APP_MAX_MESSAGE_SIZE",
    "REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM",
];

/// Server-wide variables honoured below.
const SERVER: &[&str] = &[
    "REVERB_APP_ID",
    "REVERB_APP_KEY",
    "REVERB_APP_SECRET",
    "REVERB_SERVER_HOST",
    "REVERB_SERVER_PORT",
    "REVERB_SERVER_PATH",
    "REVERB_MAX_REQUEST_SIZE",
    "REVERB_SCALING_ENABLED",
];

/// Applies the Laravel variables visible through `env` to `config` (a file's
/// values, which they override). `names` are the variable names present, to
/// find `REVERB_*` ones Belfry does not know. Returns the warnings to log.
pub fn apply(
    config: &mut Config,
    env: &dyn Fn(&str) -> Option<String>,
    names: &[String],
) -> Result<Vec<String>, ConfigError> {
    let mut warnings = Vec::new();
    // `env()` semantics: `null` and empty mean "not set", Reverb's default applies.
    let get = |name: &str| env(name).and_then(|v| EnvValue::of(&v).text());
    let number = |name: &str| -> Result<Option<u64>, ConfigError> {
        get(name)
            .map(|v| {
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| ConfigError::Invalid(format!("{name}: not a whole number: {v:?}")))
            })
            .transpose()
    };

    if let Some(host) = get("REVERB_SERVER_HOST") {
        config.host = host;
    }
    if let Some(port) = number("REVERB_SERVER_PORT")? {
        config.port = u16::try_from(port)
            .map_err(|_| ConfigError::Invalid(format!("REVERB_SERVER_PORT: not a port: {port}")))?;
    }
    if let Some(path) = get("REVERB_SERVER_PATH") {
        config.path_prefix = path;
    }
    if let Some(n) = number("REVERB_MAX_REQUEST_SIZE")? {
        config.max_request_bytes = n as usize;
    }

    let defines_app = config.apps.is_empty();
    let mut env_app = false;
    if defines_app {
        if let (Some(id), Some(key), Some(secret)) = (
            get("REVERB_APP_ID"),
            get("REVERB_APP_KEY"),
            get("REVERB_APP_SECRET"),
        ) {
            let mut app = AppConfig {
                id,
                key,
                secret,
                ..AppConfig::default()
            };
            app_options(&mut app, &get, &number)?;
            let (webhooks, grace) = belfry_coordinator::webhook::config::from_env(&get)
                .map_err(ConfigError::Invalid)?;
            app.webhooks = webhooks;
            if let Some(ms) = grace {
                app.webhook_grace_ms = ms;
            }
            config.apps.push(app);
            env_app = true;
        }
    }
    if !defines_app || config.apps.is_empty() {
        let webhooks = belfry_coordinator::webhook::config::ENV_VARIABLES;
        for name in APP_OPTIONS.iter().chain(webhooks.iter()) {
            if get(name).is_some() {
                warnings.push(format!(
                    "{name} is ignored: it applies to the app REVERB_APP_ID/KEY/SECRET define, \
                     and {}",
                    if defines_app {
                        "they are not all set"
                    } else {
                        "the configuration file's [[apps]] are used instead"
                    }
                ));
            }
        }
    }

    // Laravel's Redis broadcaster PUBLISHes into Redis; only a node listening
    // there hears it, so it selects cluster mode like Reverb's scaling does.
    let broadcasts_via_redis = get("BROADCAST_CONNECTION").as_deref() == Some("redis")
        || get("BROADCAST_DRIVER").as_deref() == Some("redis");
    let scaling = env("REVERB_SCALING_ENABLED").is_some_and(|v| EnvValue::of(&v).is_truthy());
    if (scaling || broadcasts_via_redis) && config.redis_url.is_none() {
        // Reverb's scaling server defaults to 127.0.0.1:6379, database 0.
        config.redis_url =
            Some(laravel_redis_url(env).unwrap_or_else(|| "redis://127.0.0.1:6379/0".to_owned()));
    }
    // Apps from the file say their own prefix; the one the variables define
    // is this Laravel app, whose broadcaster uses its Redis prefix.
    if broadcasts_via_redis && env_app {
        config.apps[0].laravel_redis_prefix = Some(laravel_redis_prefix(env));
    }

    if get("REVERB_SCALING_CHANNEL").is_some() {
        warnings.push(
            "REVERB_SCALING_CHANNEL has no meaning in Belfry: nodes share one Redis pub/sub \
             channel per Pusher channel (under redis_prefix), not one channel for everything"
                .to_owned(),
        );
    }
    let mut unknown: Vec<&str> = names
        .iter()
        .map(String::as_str)
        .filter(|n| n.starts_with("REVERB_"))
        .filter(|n| {
            !(SERVER.contains(n)
                || APP_OPTIONS.contains(n)
                || APP_SIDE.contains(n)
                || *n == "REVERB_SCALING_CHANNEL")
        })
        .collect();
    unknown.sort_unstable();
    unknown.dedup();
    for name in unknown {
        warnings.push(format!(
            "{name} is not honoured by Belfry (see docs/configuration.md for the REVERB_* it reads)"
        ));
    }
    Ok(warnings)
}

fn app_options(
    app: &mut AppConfig,
    get: &dyn Fn(&str) -> Option<String>,
    number: &dyn Fn(&str) -> Result<Option<u64>, ConfigError>,
) -> Result<(), ConfigError> {
    if let Some(n) = number("REVERB_APP_PING_INTERVAL")? {
        app.ping_interval = n;
    }
    if let Some(n) = number("REVERB_APP_ACTIVITY_TIMEOUT")? {
        app.activity_timeout = n;
    }
    // `null` (Reverb's default) means no limit, which is Belfry's 0.
    if let Some(n) = number("REVERB_APP_MAX_CONNECTIONS")? {
        app.max_connections = n as usize;
    }
    if let Some(n) = number("REVERB_APP_MAX_MESSAGE_SIZE")? {
        app.max_message_bytes = n as usize;
    }
    if let Some(from) = get("REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM") {
        app.client_events = match from.to_ascii_lowercase().as_str() {
            "all" => ClientEvents::All,
            "members" => ClientEvents::Members,
            "none" => ClientEvents::None,
            _ => {
                return Err(ConfigError::Invalid(format!(
                "REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM: expected all, members or none, not {from:?}"
            )))
            }
        };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Cli;
    use belfry_coordinator::dotenv::{layered, DotEnv};

    /// A fresh Laravel 11 app's `.env` after `php artisan install:broadcasting`
    /// (Reverb), trimmed to what matters here, plus scaling.
    const LARAVEL_ENV: &str = r#"APP_NAME="Acme Shop"
APP_ENV=local
APP_KEY=base64:Zm9vYmFyYmF6cXV4Zm9vYmFyYmF6cXV4Zm9vYmFyYmE=
APP_DEBUG=true
BROADCAST_CONNECTION=reverb
REDIS_CLIENT=phpredis
REDIS_HOST=127.0.0.1
REDIS_PASSWORD=null
REDIS_PORT=6380

REVERB_APP_ID=527364
REVERB_APP_KEY=p7wrd1yjsfqhmuxm1bbd
REVERB_APP_SECRET=kcmfqsx5xnuc0aoxtgyq
REVERB_HOST="localhost"
REVERB_PORT=8080
REVERB_SCHEME=http
REVERB_SERVER_PATH=/ws
REVERB_APP_PING_INTERVAL=45
REVERB_APP_MAX_CONNECTIONS=null
REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM=all
REVERB_SCALING_ENABLED=true
REVERB_SCALING_CHANNEL=reverb
REVERB_PULSE_INGEST_INTERVAL=15

VITE_REVERB_APP_KEY="${REVERB_APP_KEY}"
VITE_REVERB_HOST="${REVERB_HOST}"
"#;

    fn load(text: &str, process: &dyn Fn(&str) -> Option<String>) -> (Config, Vec<String>) {
        let file = DotEnv::parse(text, process).unwrap();
        let names: Vec<String> = file.names().map(str::to_owned).collect();
        let env = layered(process, Some(&file));
        let mut config = Config::default();
        let warnings = apply(&mut config, &env, &names).unwrap();
        (config, warnings)
    }

    #[test]
    fn a_laravel_env_means_what_it_means_to_reverb() {
        let (config, warnings) = load(LARAVEL_ENV, &|_| None);
        let app = &config.apps[0];
        assert_eq!(app.id, "527364");
        assert_eq!(app.key, "p7wrd1yjsfqhmuxm1bbd");
        assert_eq!(app.ping_interval, 45);
        assert_eq!(app.activity_timeout, 30, "Reverb's default stays");
        assert_eq!(app.max_connections, 0, "null is no limit");
        assert_eq!(app.client_events, ClientEvents::All);
        assert_eq!(config.path_prefix, "/ws");
        assert_eq!(
            config.host, "127.0.0.1",
            "REVERB_HOST is the app's, not the server's"
        );
        assert_eq!(
            config.redis_url.as_deref(),
            Some("redis://127.0.0.1:6380/0")
        );
        assert_eq!(app.laravel_redis_prefix, None, "broadcasts go over HTTP");
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("REVERB_SCALING_CHANNEL"));
        assert!(warnings[1].contains("REVERB_PULSE_INGEST_INTERVAL"));
    }

    #[test]
    fn the_process_environment_wins_and_scaling_off_stays_embedded() {
        let process = |n: &str| match n {
            "REVERB_SCALING_ENABLED" => Some("false".to_owned()),
            "REVERB_APP_ID" => Some("from-process".to_owned()),
            _ => None,
        };
        let (config, _) = load(LARAVEL_ENV, &process);
        assert_eq!(config.redis_url, None);
        assert_eq!(config.apps[0].id, "from-process");
    }

    #[test]
    fn the_redis_broadcaster_selects_redis_and_laravels_prefix() {
        let text = LARAVEL_ENV
            .replace("BROADCAST_CONNECTION=reverb", "BROADCAST_CONNECTION=redis")
            .replace(
                "REVERB_SCALING_ENABLED=true",
                "REVERB_SCALING_ENABLED=false",
            );
        let (config, _) = load(&text, &|_| None);
        assert_eq!(
            config.redis_url.as_deref(),
            Some("redis://127.0.0.1:6380/0")
        );
        assert_eq!(
            config.apps[0].laravel_redis_prefix.as_deref(),
            Some("acme-shop-database-")
        );
    }

    #[test]
    fn app_options_with_apps_from_a_file_are_warned_about() {
        let mut config =
            Config::from_toml("[[apps]]\nid = \"a\"\nkey = \"k\"\nsecret = \"s\"\n").unwrap();
        let env = |n: &str| (n == "REVERB_APP_PING_INTERVAL").then(|| "10".to_owned());
        let warnings = apply(&mut config, &env, &[]).unwrap();
        assert_eq!(config.apps[0].ping_interval, 0);
        assert!(
            warnings[0].contains("REVERB_APP_PING_INTERVAL"),
            "{warnings:?}"
        );
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        for (name, value) in [
            ("REVERB_SERVER_PORT", "70000"),
            ("REVERB_APP_MAX_MESSAGE_SIZE", "10kb"),
            ("REVERB_APP_ACCEPT_CLIENT_EVENTS_FROM", "everyone"),
        ] {
            let text = format!("{LARAVEL_ENV}{name}={value}\n");
            let file = DotEnv::parse(&text, &|_| None).unwrap();
            let env = layered(&|_| None, Some(&file));
            let err = apply(&mut Config::default(), &env, &[]).unwrap_err();
            assert!(err.to_string().contains(name), "{err}");
        }
    }

    #[test]
    fn env_file_flag_loads_the_file_and_flags_still_win() {
        let dir = std::env::temp_dir().join(format!("belfry-env-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(".env");
        std::fs::write(&path, LARAVEL_ENV).unwrap();
        let cli = Cli {
            env_file: Some(path),
            redis_prefix: Some("shop".into()),
            path_prefix: Some("/other".into()),
            ..Cli::default()
        };
        let config = Config::load(&cli, &|_| None).unwrap();
        assert_eq!(config.apps[0].key, "p7wrd1yjsfqhmuxm1bbd");
        assert_eq!(config.redis_prefix, "shop");
        assert_eq!(config.path_prefix, "/other");
        assert_eq!(Config::ping_after(&config.apps[0]).as_secs(), 45);
        std::fs::remove_dir_all(&dir).ok();
    }
}
