//! The Pusher HTTP API that Laravel's broadcasters and the Pusher server SDKs
//! call: trigger events (one or a batch), query channels and presence users,
//! and terminate a user's connections.
//!
//! A request is matched to its app, its body read within the app's limit
//! and the body deadline, its signature checked, the app's API rate
//! applied, and only then acted on. Publishing answers 200 only
//! after the bus took every envelope, and 503 when it cannot.

pub mod signature;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use belfry_coordinator::{BusError, Envelope};
use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full};
use hyper::body::Body as _;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{json, Value};

use crate::edge::rate::retry_after_secs;
use crate::edge::Edge;
use crate::node::Node;
use crate::protocol::frame::data_string;
use crate::protocol::{ChannelKind, ChannelName, SocketId};
use crate::registry::AppRegistry;
use crate::telemetry;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    MethodNotAllowed(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Unavailable(String),
    /// The publish may have been taken: a retry may duplicate it.
    #[error("{0}")]
    OutcomeUnknown(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{message}")]
    TooManyRequests { message: String, retry_after: u64 },
}

/// Counts that cannot be read right now: 503, as for any store that is away.
impl From<belfry_coordinator::OccupancyError> for ApiError {
    fn from(e: belfry_coordinator::OccupancyError) -> Self {
        ApiError::Unavailable(e.to_string())
    }
}

impl ApiError {
    fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::OutcomeUnknown(_) => StatusCode::GATEWAY_TIMEOUT,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooManyRequests { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }
}

pub fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Which route a request is, for the requests counter (bounded labels).
#[derive(Clone, Copy)]
enum Route {
    Events,
    BatchEvents,
    Channels,
    Channel,
    Users,
    Terminate,
    Unknown,
}

impl Route {
    fn label(self) -> &'static str {
        match self {
            Route::Events => "events",
            Route::BatchEvents => "batch_events",
            Route::Channels => "channels",
            Route::Channel => "channel",
            Route::Users => "users",
            Route::Terminate => "terminate_connections",
            Route::Unknown => "unknown",
        }
    }
}

/// Handles `/apps/{id}/...`; `path` is the request path without the prefix.
pub async fn handle(
    node: Arc<Node>,
    edge: &Edge,
    req: Request<Incoming>,
    path: &str,
) -> Response<Full<Bytes>> {
    let started = Instant::now();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let route = match segments.as_slice() {
        ["apps", _, "events"] => Route::Events,
        ["apps", _, "batch_events"] => Route::BatchEvents,
        ["apps", _, "channels"] => Route::Channels,
        ["apps", _, "channels", _] => Route::Channel,
        ["apps", _, "channels", _, "users"] => Route::Users,
        ["apps", _, "users", _, "terminate_connections"] => Route::Terminate,
        _ => Route::Unknown,
    };
    let result = dispatch(&node, edge, req, path, &segments, route, started).await;
    let response = match result {
        Ok(body) => json_response(StatusCode::OK, &body),
        Err(ApiError::TooManyRequests {
            message,
            retry_after,
        }) => crate::server::too_many_requests(&message, retry_after),
        Err(e) => {
            tracing::debug!(route = route.label(), error = %e, "API request refused");
            json_response(e.status(), &json!({ "error": e.to_string() }))
        }
    };
    telemetry::http_request(route.label(), response.status().as_u16());
    response
}

async fn dispatch(
    node: &Node,
    edge: &Edge,
    req: Request<Incoming>,
    path: &str,
    segments: &[&str],
    route: Route,
    started: Instant,
) -> Result<Value, ApiError> {
    let app_id = segments.get(1).copied().unwrap_or_default();
    let app = node
        .registry
        .by_id(app_id)
        .cloned()
        .ok_or_else(|| ApiError::NotFound(format!("No app with id {app_id:?}")))?;
    if let Route::Unknown = route {
        return Err(ApiError::NotFound(format!("No API route {path}")));
    }
    let expected = match route {
        Route::Events | Route::BatchEvents | Route::Terminate => Method::POST,
        _ => Method::GET,
    };
    if req.method() != expected {
        return Err(ApiError::MethodNotAllowed(format!(
            "{path} takes {expected}"
        )));
    }
    let method = req.method().as_str().to_owned();
    let params = signature::query_pairs(req.uri().query().unwrap_or(""));
    let deadline = Duration::from_secs(node.config.body_timeout_secs);
    let body = read_body(req.into_body(), body_limit(&node.config, &app), deadline).await?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    signature::verify(&app.config, &method, path, &params, &body, now)?;
    // Counted only once signed: requests anyone can forge with the app id
    // must not be able to spend the app's own budget.
    if let Err(wait) = edge.api.take(&app.config.id, Instant::now()) {
        telemetry::api_rate_limited(&app.config.id);
        return Err(ApiError::TooManyRequests {
            message: format!(
                "Over this app's limit of {} API requests per second",
                app.config.api_requests_per_second
            ),
            retry_after: retry_after_secs(wait),
        });
    }

    let param = |name: &str| {
        params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    let info: Vec<&str> = param("info")
        .map(|i| i.split(',').collect())
        .unwrap_or_default();
    match route {
        Route::Events => {
            let event: TriggerEvent = parse_json(&body)?;
            // Pusher takes `info` in the body; a query parameter works too.
            let body_info = event.info.clone().unwrap_or_default();
            let mut requested: Vec<&str> = body_info.split(',').collect();
            requested.extend(info.iter().copied());
            let with_info = event_info(&requested);
            let (envelopes, channels) = event.into_envelopes(&app)?;
            publish(node, envelopes, started).await?;
            if with_info.is_empty() {
                return Ok(json!({}));
            }
            let mut out = serde_json::Map::new();
            for channel in &channels {
                out.insert(
                    channel.to_string(),
                    channel_attributes(node, &app, channel, &with_info).await?,
                );
            }
            Ok(json!({ "channels": out }))
        }
        Route::BatchEvents => {
            let batch: Batch = parse_json(&body)?;
            let max = app.config.max_batch_size;
            if batch.batch.len() > max {
                return Err(ApiError::BadRequest(format!(
                    "Batch has {} events; at most {max} are allowed",
                    batch.batch.len()
                )));
            }
            let mut envelopes = Vec::with_capacity(batch.batch.len());
            let mut wants = Vec::with_capacity(batch.batch.len());
            for event in batch.batch {
                let requested = event.info.clone().unwrap_or_default();
                let with_info = event_info(&requested.split(',').collect::<Vec<_>>());
                let (mut e, channels) = event.into_envelopes(&app)?;
                envelopes.append(&mut e);
                wants.push((channels, with_info));
            }
            publish(node, envelopes, started).await?;
            if wants.iter().all(|(_, w)| w.is_empty()) {
                return Ok(json!({ "batch": {} }));
            }
            let mut out = Vec::with_capacity(wants.len());
            for (channels, with_info) in wants {
                match channels.first() {
                    Some(channel) if !with_info.is_empty() => {
                        out.push(channel_attributes(node, &app, channel, &with_info).await?)
                    }
                    _ => out.push(json!({})),
                }
            }
            Ok(json!({ "batch": out }))
        }
        Route::Channels => {
            let prefix = param("filter_by_prefix").unwrap_or("");
            let wants_users = info.contains(&"user_count");
            if wants_users && !prefix.starts_with("presence-") {
                return Err(ApiError::BadRequest(
                    "info=user_count needs filter_by_prefix=presence-".into(),
                ));
            }
            let attributes = event_info(&info);
            let mut out = BTreeMap::new();
            let channels = node.channels(&app).await?;
            for (name, subscriptions) in channels {
                if !name.starts_with(prefix) {
                    continue;
                }
                let Ok(channel) = ChannelName::parse(&name) else {
                    continue;
                };
                let mut attrs = serde_json::Map::new();
                if attributes.contains(&"subscription_count") {
                    attrs.insert("subscription_count".into(), json!(subscriptions));
                }
                if attributes.contains(&"user_count") && channel.kind() == ChannelKind::Presence {
                    attrs.insert(
                        "user_count".into(),
                        json!(user_count(node, &app, &channel).await?),
                    );
                }
                out.insert(name, Value::Object(attrs));
            }
            Ok(json!({ "channels": out }))
        }
        Route::Channel => {
            let channel = path_channel(segments[3])?;
            if info.contains(&"user_count") && channel.kind() != ChannelKind::Presence {
                return Err(ApiError::BadRequest(
                    "info=user_count is only for presence channels".into(),
                ));
            }
            let subscriptions = node.subscription_count(&app, channel.as_str()).await?;
            let mut out = serde_json::Map::new();
            out.insert("occupied".into(), json!(subscriptions > 0));
            let attributes = event_info(&info);
            if let Value::Object(extra) =
                channel_attributes(node, &app, &channel, &attributes).await?
            {
                out.extend(extra);
            }
            if info.contains(&"cache") && channel.is_cache() {
                let cached = node
                    .bus
                    .cached(&app.config.id, channel.as_str())
                    .await
                    .map_err(|e| ApiError::Unavailable(e.to_string()))?;
                if let Some(e) = cached {
                    out.insert("cache".into(), json!({ "event": e.event, "data": e.data }));
                }
            }
            Ok(Value::Object(out))
        }
        Route::Users => {
            let channel = path_channel(segments[3])?;
            if channel.kind() != ChannelKind::Presence {
                return Err(ApiError::BadRequest(
                    "Users can only be listed for presence channels".into(),
                ));
            }
            let members = node
                .presence
                .members(&app.config.id, channel.as_str())
                .await
                .map_err(|e| ApiError::Unavailable(e.to_string()))?;
            let users: Vec<Value> = members.iter().map(|m| json!({ "id": m.user_id })).collect();
            Ok(json!({ "users": users }))
        }
        Route::Terminate => {
            let user_id = signature::percent_decode(segments[3]);
            publish(
                node,
                vec![Envelope::terminate(&app.config.id, &user_id)],
                started,
            )
            .await?;
            Ok(json!({}))
        }
        Route::Unknown => Err(ApiError::NotFound(format!("No API route {path}"))),
    }
}

fn path_channel(segment: &str) -> Result<ChannelName, ApiError> {
    let name = signature::percent_decode(segment);
    ChannelName::parse(&name)
        .map_err(|e| ApiError::BadRequest(format!("Invalid channel name {name:?}: {e}")))
}

/// `max_request_bytes`, or else the biggest body an app's limits allow: a
/// full batch of full events.
fn body_limit(config: &crate::config::Config, app: &AppRegistry) -> usize {
    if config.max_request_bytes != 0 {
        return config.max_request_bytes;
    }
    let c = &app.config;
    c.max_batch_size.max(1) * (c.max_payload_bytes + 1024)
        + c.max_channels_per_trigger * 200
        + 16 * 1024
}

/// Reads a body of at most `limit` bytes within `deadline`. A declared
/// length over the limit is refused before a byte is read, and each chunk
/// is copied out as it comes: holding hyper's chunks would pin a read
/// buffer of kilobytes to every byte of a body trickled one byte at a time.
async fn read_body(
    mut body: Incoming,
    limit: usize,
    deadline: Duration,
) -> Result<Bytes, ApiError> {
    let too_large = || {
        ApiError::TooLarge(format!(
            "Request body is larger than this app's limit of {limit} bytes"
        ))
    };
    if body.size_hint().lower() > limit as u64 {
        return Err(too_large());
    }
    let read = async {
        let mut buf = BytesMut::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| {
                ApiError::BadRequest(format!("Could not read the request body: {e}"))
            })?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > limit {
                    return Err(too_large());
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf.freeze())
    };
    tokio::time::timeout(deadline, read).await.map_err(|_| {
        ApiError::Timeout(format!(
            "Request body did not arrive within {} s",
            deadline.as_secs()
        ))
    })?
}

fn parse_json<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::BadRequest(format!("Request body is not valid: {e}")))
}

async fn publish(node: &Node, envelopes: Vec<Envelope>, started: Instant) -> Result<(), ApiError> {
    node.bus.publish(envelopes).await.map_err(|e| match e {
        BusError::Unavailable(_) => ApiError::Unavailable(format!("Event not accepted: {e}")),
        BusError::Unknown(_) => ApiError::OutcomeUnknown(format!(
            "Event may or may not have been published ({e}); a retry may deliver it twice"
        )),
    })?;
    telemetry::publish_latency(started.elapsed().as_secs_f64());
    Ok(())
}

/// The count attributes asked for, of the two the API knows.
fn event_info(info: &[&str]) -> Vec<&'static str> {
    ["subscription_count", "user_count"]
        .into_iter()
        .filter(|known| info.contains(known))
        .collect()
}

/// `subscription_count` and `user_count` (presence only) of one channel.
async fn channel_attributes(
    node: &Node,
    app: &AppRegistry,
    channel: &ChannelName,
    attributes: &[&str],
) -> Result<Value, ApiError> {
    let mut out = serde_json::Map::new();
    if attributes.contains(&"subscription_count") {
        let count = node.subscription_count(app, channel.as_str()).await?;
        out.insert("subscription_count".into(), json!(count));
    }
    if attributes.contains(&"user_count") && channel.kind() == ChannelKind::Presence {
        out.insert(
            "user_count".into(),
            json!(user_count(node, app, channel).await?),
        );
    }
    Ok(Value::Object(out))
}

/// Distinct users on a presence channel.
async fn user_count(
    node: &Node,
    app: &AppRegistry,
    channel: &ChannelName,
) -> Result<usize, ApiError> {
    let members = node
        .presence
        .members(&app.config.id, channel.as_str())
        .await
        .map_err(|e| ApiError::Unavailable(e.to_string()))?;
    Ok(members.len())
}

#[derive(Deserialize)]
struct TriggerEvent<'a> {
    name: String,
    #[serde(borrow)]
    data: Option<&'a RawValue>,
    #[serde(default)]
    channels: Option<Vec<String>>,
    #[serde(default)]
    channel: Option<String>,
    #[serde(default)]
    socket_id: Option<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize)]
struct Batch<'a> {
    #[serde(borrow)]
    batch: Vec<TriggerEvent<'a>>,
}

/// Longest event name accepted (Pusher's limit).
const MAX_EVENT_NAME: usize = 200;

impl TriggerEvent<'_> {
    fn into_envelopes(
        self,
        app: &AppRegistry,
    ) -> Result<(Vec<Envelope>, Vec<ChannelName>), ApiError> {
        let limits = &app.config;
        if self.name.is_empty() || self.name.len() > MAX_EVENT_NAME {
            return Err(ApiError::BadRequest(format!(
                "Event name must be 1 to {MAX_EVENT_NAME} characters"
            )));
        }
        let data = data_string(self.data);
        if data.len() > limits.max_payload_bytes {
            return Err(ApiError::TooLarge(format!(
                "Event data is {} bytes; this app allows at most {}",
                data.len(),
                limits.max_payload_bytes
            )));
        }
        let names = match (self.channels, self.channel) {
            (Some(list), _) if !list.is_empty() => list,
            (_, Some(one)) => vec![one],
            _ => {
                return Err(ApiError::BadRequest(
                    "Give channels (a list) or channel".into(),
                ))
            }
        };
        if names.len() > limits.max_channels_per_trigger {
            return Err(ApiError::BadRequest(format!(
                "Event is for {} channels; at most {} are allowed",
                names.len(),
                limits.max_channels_per_trigger
            )));
        }
        let socket_id = match self.socket_id.as_deref() {
            None | Some("") => None,
            Some(s) => Some(
                SocketId::parse(s)
                    .ok_or_else(|| ApiError::BadRequest(format!("Invalid socket_id {s:?}")))?
                    .to_string(),
            ),
        };
        let mut channels = Vec::with_capacity(names.len());
        let mut envelopes = Vec::with_capacity(names.len());
        for name in names {
            let channel = ChannelName::parse(&name)
                .map_err(|e| ApiError::BadRequest(format!("Invalid channel name {name:?}: {e}")))?;
            let mut envelope = Envelope::event(&limits.id, &name, &self.name, data.clone());
            envelope.socket_id = socket_id.clone();
            envelopes.push(envelope);
            channels.push(channel);
        }
        Ok((envelopes, channels))
    }
}
