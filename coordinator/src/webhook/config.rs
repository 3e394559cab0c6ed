//! Which URLs want which webhook events: the `[[apps.webhooks]]` tables of
//! the apps TOML. The node reads them as part of its configuration; the
//! coordinator reads the same file and keeps only what it needs here (the
//! app's key and secret to sign with, and the targets), ignoring the rest.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// Every event type Belfry can send, in Pusher's names.
pub const EVENT_TYPES: [&str; 7] = [
    "channel_occupied",
    "channel_vacated",
    "member_added",
    "member_removed",
    "client_event",
    "cache_miss",
    "subscription_count",
];

/// One `[[apps.webhooks]]` table.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookTarget {
    /// Where the POSTs go (`http://` or `https://`).
    pub url: String,
    /// Which events this URL gets; every type when left out.
    #[serde(default = "all_event_types")]
    pub event_types: Vec<String>,
    /// Only channels starting with one of these; every channel when empty.
    #[serde(default)]
    pub channel_prefixes: Vec<String>,
}

fn all_event_types() -> Vec<String> {
    EVENT_TYPES.iter().map(|s| (*s).to_owned()).collect()
}

impl WebhookTarget {
    pub fn wants(&self, name: &str, channel: &str) -> bool {
        self.event_types.iter().any(|t| t == name)
            && (self.channel_prefixes.is_empty()
                || self.channel_prefixes.iter().any(|p| channel.starts_with(p)))
    }

    /// A configuration error, said once at start.
    pub fn check(&self) -> Result<(), String> {
        if let Err(e) = super::client::Target::parse(&self.url) {
            return Err(format!("webhook url {:?}: {e}", self.url));
        }
        if let Some(bad) = self
            .event_types
            .iter()
            .find(|t| !EVENT_TYPES.contains(&t.as_str()))
        {
            return Err(format!(
                "webhook event type {bad:?} is not one of {}",
                EVENT_TYPES.join(", ")
            ));
        }
        Ok(())
    }
}

/// Pusher's debounce: a `channel_vacated` or `member_removed` waits this
/// long, and is left out with the `channel_occupied` or `member_added` that
/// undoes it inside the window (a page reload, a dropped connection that
/// comes back).
pub const DEFAULT_GRACE_MS: u64 = 3_000;

fn default_grace_ms() -> u64 {
    DEFAULT_GRACE_MS
}

/// One app as the webhooks need it.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookApp {
    pub id: String,
    pub key: String,
    pub secret: String,
    #[serde(default)]
    pub webhooks: Vec<WebhookTarget>,
    /// How long `channel_vacated` and `member_removed` are held back (0: sent at once).
    #[serde(default = "default_grace_ms")]
    pub webhook_grace_ms: u64,
}

impl WebhookApp {
    /// Whether this app's edge `name` on `channel` is to be queued: some URL
    /// wants it, or, with a grace period, some URL wants the edge it undoes
    /// (a `channel_occupied` is what cancels a held `channel_vacated`, so it
    /// must reach the dispatcher even for a URL that wants only vacated).
    pub fn wants(&self, name: &str, channel: &str) -> bool {
        let wanted = |name: &str| self.webhooks.iter().any(|t| t.wants(name, channel));
        if wanted(name) {
            return true;
        }
        let partner = match name {
            "channel_occupied" => "channel_vacated",
            "channel_vacated" => "channel_occupied",
            "member_added" => "member_removed",
            "member_removed" => "member_added",
            _ => return false,
        };
        self.webhook_grace_ms > 0 && wanted(partner)
    }
}

/// Every app with webhooks, by id.
#[derive(Debug, Clone, Default)]
pub struct WebhookApps {
    by_id: HashMap<String, WebhookApp>,
}

#[derive(Deserialize)]
struct AppsFile {
    #[serde(default)]
    apps: Vec<WebhookApp>,
}

impl WebhookApps {
    pub fn new(apps: impl IntoIterator<Item = WebhookApp>) -> Result<WebhookApps, String> {
        let mut by_id = HashMap::new();
        for app in apps {
            for target in &app.webhooks {
                target
                    .check()
                    .map_err(|e| format!("app {:?}: {e}", app.id))?;
            }
            if !app.webhooks.is_empty() {
                by_id.insert(app.id.clone(), app);
            }
        }
        Ok(WebhookApps { by_id })
    }

    /// The `apps` of a node's TOML configuration file.
    pub fn from_toml(text: &str) -> Result<WebhookApps, String> {
        let file: AppsFile = toml::from_str(text).map_err(|e| e.to_string())?;
        Self::new(file.apps)
    }

    pub fn app(&self, id: &str) -> Option<&WebhookApp> {
        self.by_id.get(id)
    }

    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    /// Whether any URL of `app` wants `name` events on `channel`, so that
    /// nothing is queued for apps nobody listens to. The internal `#online`
    /// channel never produces webhooks.
    pub fn wants(&self, app: &str, name: &str, channel: &str) -> bool {
        !channel.starts_with('#') && self.app(app).is_some_and(|a| a.wants(name, channel))
    }
}

/// The variables that give the app `REVERB_APP_*` define its webhooks, for
/// deployments configured by environment (docker-compose, a Laravel `.env`).
pub const ENV_VARIABLES: [&str; 3] = [
    "BELFRY_WEBHOOK_URL",
    "BELFRY_WEBHOOK_EVENT_TYPES",
    "BELFRY_WEBHOOK_GRACE_MS",
];

/// The webhooks `BELFRY_WEBHOOK_URL` (comma-separated URLs),
/// `BELFRY_WEBHOOK_EVENT_TYPES` (comma-separated; every type when unset) and
/// `BELFRY_WEBHOOK_GRACE_MS` give, and the grace period if set. Empty
/// values count as unset.
pub fn from_env(
    get: &dyn Fn(&str) -> Option<String>,
) -> Result<(Vec<WebhookTarget>, Option<u64>), String> {
    let get = |name: &str| get(name).filter(|v| !v.trim().is_empty());
    let list = |v: String| -> Vec<String> {
        v.split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let event_types = get("BELFRY_WEBHOOK_EVENT_TYPES")
        .map(list)
        .unwrap_or_else(all_event_types);
    let targets: Vec<WebhookTarget> = get("BELFRY_WEBHOOK_URL")
        .map(list)
        .unwrap_or_default()
        .into_iter()
        .map(|url| WebhookTarget {
            url,
            event_types: event_types.clone(),
            channel_prefixes: Vec::new(),
        })
        .collect();
    for target in &targets {
        target
            .check()
            .map_err(|e| format!("BELFRY_WEBHOOK_URL: {e}"))?;
    }
    let grace = get("BELFRY_WEBHOOK_GRACE_MS")
        .map(|v| {
            v.trim()
                .parse::<u64>()
                .map_err(|_| format!("BELFRY_WEBHOOK_GRACE_MS: not a whole number: {v:?}"))
        })
        .transpose()?;
    Ok((targets, grace))
}

/// The app `REVERB_APP_ID`, `REVERB_APP_KEY` and `REVERB_APP_SECRET`
/// define, with the webhooks of `from_env`; none without all three.
pub fn env_app(get: &dyn Fn(&str) -> Option<String>) -> Result<Option<WebhookApp>, String> {
    let value = |name: &str| get(name).and_then(|v| crate::dotenv::EnvValue::of(&v).text());
    let (Some(id), Some(key), Some(secret)) = (
        value("REVERB_APP_ID"),
        value("REVERB_APP_KEY"),
        value("REVERB_APP_SECRET"),
    ) else {
        return Ok(None);
    };
    // Laravel's `env()` words (`null`, `empty`) mean what they mean to the nodes.
    let (webhooks, grace) = from_env(&value)?;
    Ok(Some(WebhookApp {
        id,
        key,
        secret,
        webhooks,
        webhook_grace_ms: grace.unwrap_or(DEFAULT_GRACE_MS),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_nodes_apps_file_and_filters_by_type_and_prefix() {
        let apps = WebhookApps::from_toml(
            r#"
            port = 6001
            [[apps]]
            id = "a"
            key = "k"
            secret = "s"
            max_connections = 5
            webhook_grace_ms = 0
            [[apps.webhooks]]
            url = "http://127.0.0.1:9/hook"
            event_types = ["channel_occupied"]
            channel_prefixes = ["private-"]
            [[apps]]
            id = "quiet"
            key = "k2"
            secret = "s2"
            "#,
        )
        .unwrap();
        assert!(apps.wants("a", "channel_occupied", "private-x"));
        assert!(!apps.wants("a", "channel_occupied", "public"));
        assert!(!apps.wants("a", "channel_vacated", "private-x"));
        assert!(!apps.wants("quiet", "channel_occupied", "private-x"));
        assert!(!apps.wants("a", "channel_occupied", "#online"));
    }

    #[test]
    fn with_a_grace_period_the_undoing_edge_is_queued_too() {
        let apps = WebhookApps::from_toml(
            r#"
            [[apps]]
            id = "a"
            key = "k"
            secret = "s"
            [[apps.webhooks]]
            url = "http://127.0.0.1:9/hook"
            event_types = ["channel_vacated", "member_added"]
            "#,
        )
        .unwrap();
        // channel_occupied is what cancels a held channel_vacated; member_removed
        // is held so that a quick return does not send member_added again.
        assert!(apps.wants("a", "channel_occupied", "x"));
        assert!(apps.wants("a", "member_removed", "presence-x"));
        assert!(!apps.wants("a", "client_event", "x"));
        assert!(!apps.wants("a", "channel_occupied", "#online"));
    }

    #[test]
    fn refuses_unknown_event_types_and_schemes_takes_https() {
        let bad = |t: &str| {
            WebhookApps::from_toml(&format!(
                "[[apps]]\nid='a'\nkey='k'\nsecret='s'\n[[apps.webhooks]]\n{t}\n"
            ))
            .unwrap_err()
        };
        assert!(bad("url='http://x/'\nevent_types=['nope']").contains("nope"));
        assert!(bad("url='ftp://x/'").contains("http:// or https://"));
        assert!(bad("url='http:///path'").contains("http:///path"));
        let ok = WebhookApps::from_toml(
            "[[apps]]\nid='a'\nkey='k'\nsecret='s'\n[[apps.webhooks]]\nurl='https://x.example/h'\n",
        )
        .unwrap();
        assert_eq!(ok.app("a").unwrap().webhook_grace_ms, DEFAULT_GRACE_MS);
    }

    #[test]
    fn the_environment_defines_the_env_apps_webhooks() {
        let vars = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| (*v).to_owned())
            }
        };
        let env = vars(&[
            ("REVERB_APP_ID", "1"),
            ("REVERB_APP_KEY", "k"),
            ("REVERB_APP_SECRET", "s"),
            ("BELFRY_WEBHOOK_URL", "https://a.example/h, http://b:8000/h"),
            (
                "BELFRY_WEBHOOK_EVENT_TYPES",
                "channel_occupied,member_added",
            ),
            ("BELFRY_WEBHOOK_GRACE_MS", "500"),
        ]);
        let app = env_app(&env).unwrap().unwrap();
        assert_eq!((app.id.as_str(), app.webhook_grace_ms), ("1", 500));
        let urls: Vec<_> = app.webhooks.iter().map(|w| w.url.as_str()).collect();
        assert_eq!(urls, ["https://a.example/h", "http://b:8000/h"]);
        assert!(app
            .webhooks
            .iter()
            .all(|w| w.wants("member_added", "presence-x")));
        assert!(!app.webhooks[0].wants("channel_vacated", "x"));

        let bare = vars(&[
            ("REVERB_APP_ID", "1"),
            ("REVERB_APP_KEY", "k"),
            ("REVERB_APP_SECRET", "s"),
        ]);
        let app = env_app(&bare).unwrap().unwrap();
        assert!(app.webhooks.is_empty());
        assert_eq!(app.webhook_grace_ms, DEFAULT_GRACE_MS);
        assert!(env_app(&vars(&[("BELFRY_WEBHOOK_URL", "http://x/")]))
            .unwrap()
            .is_none());
        let err = from_env(&vars(&[("BELFRY_WEBHOOK_URL", "ftp://x/")])).unwrap_err();
        assert!(err.contains("BELFRY_WEBHOOK_URL"), "{err}");
        let err = from_env(&vars(&[
            ("BELFRY_WEBHOOK_URL", "http://x/"),
            ("BELFRY_WEBHOOK_EVENT_TYPES", "nope"),
        ]))
        .unwrap_err();
        assert!(err.contains("nope"), "{err}");
    }
}
