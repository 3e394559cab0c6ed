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
    /// Where the POSTs go (`http://`).
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
        if !self.url.starts_with("http://") {
            return Err(format!(
                "webhook url {:?}: only http:// URLs are supported",
                self.url
            ));
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

/// One app as the webhooks need it.
#[derive(Debug, Clone, Deserialize)]
pub struct WebhookApp {
    pub id: String,
    pub key: String,
    pub secret: String,
    #[serde(default)]
    pub webhooks: Vec<WebhookTarget>,
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
        !channel.starts_with('#')
            && self
                .app(app)
                .is_some_and(|a| a.webhooks.iter().any(|t| t.wants(name, channel)))
    }
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
    fn refuses_unknown_event_types_and_https() {
        let bad = |t: &str| {
            WebhookApps::from_toml(&format!(
                "[[apps]]\nid='a'\nkey='k'\nsecret='s'\n[[apps.webhooks]]\n{t}\n"
            ))
            .unwrap_err()
        };
        assert!(bad("url='http://x/'\nevent_types=['nope']").contains("nope"));
        assert!(bad("url='https://x/'").contains("http://"));
    }
}
