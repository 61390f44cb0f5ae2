//! Publish handlers: `POST /topics/{topic}`, `POST /publish`,
//! `POST /{module}/broadcast/{kind}` and `POST /publish/batch`.
//!
//! Each one reads a bounded JSON body, validates everything, and only then
//! appends: a refused publish stores nothing. The answer waits for the group
//! commit, so `201` means on disk. Every route takes an `Idempotency-Key`;
//! a batch item is validated by its single route's code (`prepare_*`), and
//! a batch is one append (one commit, all or nothing).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::access::Access;
use super::error::ApiError;
use crate::app::App;
use crate::auth::{AuthError, Caller, Scope};
use crate::idempotency::{ClientKey, KeyError, StoredKey};
use crate::json;
use crate::log::{Appended, LogError, NewEvent};
use crate::model::{parse_topic_list, Epoch, EventName, Topic};
use crate::routes::RouteSpec;

/// The request header of the IETF httpapi draft.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer replayed from a stored key.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// `POST /topics/{topic}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopicPublish<'a> {
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /publish` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MultiPublish<'a> {
    #[serde(borrow)]
    topics: Vec<Cow<'a, str>>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    #[serde(borrow)]
    data: &'a RawValue,
}

/// `POST /{module}/broadcast/{kind}` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Broadcast<'a> {
    /// Required: the projects module always sends its event atom, so a
    /// missing one is a broken publisher, not a `message`.
    #[serde(borrow)]
    event: Cow<'a, str>,
    #[serde(borrow)]
    payload: &'a RawValue,
}

/// `POST /publish/batch` body.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchPublish<'a> {
    #[serde(borrow)]
    events: Vec<BatchItem<'a>>,
}

/// One event of a batch: the body of `POST /publish` (`topics`) or of a
/// broadcast route (`route`), and its own key. Which fields may appear
/// together is checked by [`BatchItem::prepare`], with the single route's code.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchItem<'a> {
    #[serde(default, borrow)]
    topics: Option<Vec<Cow<'a, str>>>,
    #[serde(default, borrow)]
    route: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    event: Option<Cow<'a, str>>,
    /// `"data": null` is data (JSON null), not a missing field.
    #[serde(default, borrow, deserialize_with = "present")]
    data: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "present")]
    payload: Option<&'a RawValue>,
    #[serde(default, borrow)]
    idempotency_key: Option<Cow<'a, str>>,
}

/// Deserializes a field that is present, whatever its value (`null` too).
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<&'de RawValue>, D::Error> {
    <&'de RawValue>::deserialize(d).map(Some)
}

/// One validated event, before the caller's scope is applied: what every
/// publish route (and every batch item) turns its body into.
struct Prepared {
    /// Client-visible topics, repeats removed, order kept: the answer's `topics`.
    topics: Vec<Topic>,
    name: EventName,
    data: String,
    key: Option<ClientKey>,
}

pub async fn publish_topic(
    State(app): State<Arc<App>>,
    access: Access,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let topic = super::path_topic(path)?;
    let key = header_key(&headers)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: TopicPublish = parse_body(&bytes)?;
    let name = event_name(request.event.as_deref())?;
    let data = json::compact(request.data.get(), app.config.limits.max_json_depth)?;
    let prepared = Prepared {
        topics: vec![topic],
        name,
        data,
        key,
    };
    publish_one(&app, &access, prepared, started).await
}

pub async fn publish_many(
    State(app): State<Arc<App>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let key = header_key(&headers)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: MultiPublish = parse_body(&bytes)?;
    let prepared = prepare_many(
        &app,
        &request.topics,
        request.event.as_deref(),
        request.data,
        key,
    )?;
    publish_one(&app, &access, prepared, started).await
}

pub async fn broadcast(
    State(app): State<Arc<App>>,
    access: Access,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let Path((module, kind)) = path.map_err(|e| ApiError::not_found(e.body_text()))?;
    let route = app.route(&module, &kind).ok_or_else(|| {
        ApiError::not_found(format!(
            "no broadcast route {module}/{kind}; configured: {}",
            app.route_names().join(", ")
        ))
    })?;
    let key = header_key(&headers)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: Broadcast = parse_body(&bytes)?;
    let prepared = prepare_broadcast(&app, route, &request.event, request.payload, key)?;
    publish_one(&app, &access, prepared, started).await
}

/// `POST /publish/batch`: every item validated as its single route would
/// validate it, then all stored in one commit, or none.
pub async fn publish_batch(
    State(app): State<Arc<App>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let batch_key = header_key(&headers)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: BatchPublish = parse_body(&bytes)?;
    let most = app.config.publish.max_batch_events;
    if request.events.is_empty() || request.events.len() > most {
        return Err(ApiError::invalid_body(format!(
            "`events` holds {} events; a batch holds 1 to publish.max_batch_events ({most})",
            request.events.len()
        )));
    }
    let mut prepared = Vec::with_capacity(request.events.len());
    for (index, item) in request.events.iter().enumerate() {
        let item = item
            .prepare(&app, index, batch_key.as_ref())
            .map_err(|e| at_item(index, e))?;
        prepared.push(item);
    }
    let (appended, _, epoch) = store(&app, &access, &prepared, true).await?;
    observe(&app, started);
    let all_replayed = appended.iter().all(|a| a.replayed);
    let ids: Vec<String> = appended.iter().map(|a| epoch.id(a.seq)).collect();
    let mut response = (StatusCode::CREATED, Json(BatchPublished { ids: &ids })).into_response();
    if all_replayed {
        mark_replayed(&mut response);
    }
    Ok(response)
}

impl BatchItem<'_> {
    /// Validates the item with its single route's code; its key is its own
    /// `idempotency_key`, else `<batch key>#<index>` when the batch has one.
    fn prepare(
        &self,
        app: &App,
        index: usize,
        batch_key: Option<&ClientKey>,
    ) -> Result<Prepared, ApiError> {
        let key = match &self.idempotency_key {
            Some(raw) => Some(ClientKey::parse(raw).map_err(|mut e| {
                e.where_ = " in `idempotency_key`".into();
                ApiError::from(e)
            })?),
            None => batch_key.map(|k| k.for_item(index)),
        };
        let forbid = |field: &str, with: &str| {
            ApiError::invalid_body(format!("`{field}`: not allowed with `{with}`"))
        };
        let missing = |field: &str| ApiError::invalid_body(format!("missing field `{field}`"));
        match (&self.topics, &self.route) {
            (Some(topics), None) => {
                if self.payload.is_some() {
                    return Err(forbid("payload", "topics"));
                }
                let data = self.data.ok_or_else(|| missing("data"))?;
                prepare_many(app, topics, self.event.as_deref(), data, key)
            }
            (None, Some(route)) => {
                if self.data.is_some() {
                    return Err(forbid("data", "route"));
                }
                let spec = route
                    .split_once('/')
                    .and_then(|(module, kind)| app.route(module, kind))
                    .ok_or_else(|| {
                        ApiError::new(
                            StatusCode::UNPROCESSABLE_ENTITY,
                            "invalid_payload",
                            format!(
                                "`route`: no broadcast route {route:?}; configured: {}",
                                app.route_names().join(", ")
                            ),
                        )
                    })?;
                let event = self.event.as_deref().ok_or_else(|| missing("event"))?;
                let payload = self.payload.ok_or_else(|| missing("payload"))?;
                prepare_broadcast(app, spec, event, payload, key)
            }
            (Some(_), Some(_)) => Err(forbid("route", "topics")),
            (None, None) => Err(ApiError::invalid_body(
                "an item names its topics with `topics` or a broadcast route with `route`",
            )),
        }
    }
}

/// Names the batch item an error is about: `events[3]: ...`, or
/// `events[3].field: ...` when the message starts with a field name.
fn at_item(index: usize, mut e: ApiError) -> ApiError {
    e.message = match e.message.strip_prefix('`') {
        Some(rest) => format!("`events[{index}].{rest}"),
        None => format!("`events[{index}]`: {}", e.message),
    };
    e
}

/// `POST /publish` body (also a batch item with `topics`) → one event.
fn prepare_many(
    app: &App,
    topics: &[Cow<'_, str>],
    event: Option<&str>,
    data: &RawValue,
    key: Option<ClientKey>,
) -> Result<Prepared, ApiError> {
    let topics = parse_topic_list(topics.iter().map(|t| t.as_ref()))?;
    let name = event_name(event)?;
    let data = json::compact(data.get(), app.config.limits.max_json_depth)?;
    Ok(Prepared {
        topics,
        name,
        data,
        key,
    })
}

/// A broadcast route's body (also a batch item with `route`) → one event
/// on the topics the route's rules give.
fn prepare_broadcast(
    app: &App,
    route: &RouteSpec,
    event: &str,
    payload: &RawValue,
    key: Option<ClientKey>,
) -> Result<Prepared, ApiError> {
    let name = EventName::parse(event)?;
    let data = json::compact(payload.get(), app.config.limits.max_json_depth)?;
    // Routes never read numbers, and `Value` refuses valid ones beyond f64 (`1e999`).
    let value: serde_json::Value = serde_json::from_str(&json::zero_numbers(&data))
        .map_err(|e| ApiError::invalid_json(format!("`payload`: {e}")))?;
    let topics = route.topics_for(&value)?;
    Ok(Prepared {
        topics,
        name,
        data,
        key,
    })
}

/// The `Idempotency-Key` header, if sent: one value of 1 to 255 visible ASCII characters.
fn header_key(headers: &HeaderMap) -> Result<Option<ClientKey>, ApiError> {
    let mut values = headers.get_all(IDEMPOTENCY_KEY).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            "send one Idempotency-Key header, not several",
        ));
    }
    let text = value.to_str().map_err(|_| KeyError {
        where_: String::new(),
    })?;
    Ok(Some(ClientKey::parse(text)?))
}

/// Checks before any body is read: publishing needs a token once auth is on,
/// and the caller's rate limits must allow one more publish.
fn admit(app: &App, access: &Access) -> Result<(), ApiError> {
    if matches!(access.caller, Caller::Anonymous) {
        return Err(AuthError::Missing.into());
    }
    app.limits
        .publish(access.ip, access.caller.principal().map(|p| p.rate_key))?;
    Ok(())
}

/// Stores one event and answers `201 {"id", "topics"}`.
async fn publish_one(
    app: &App,
    access: &Access,
    prepared: Prepared,
    started: Instant,
) -> Result<Response, ApiError> {
    let batch = [prepared];
    let (appended, _, epoch) = store(app, access, &batch, false).await?;
    observe(app, started);
    let Some(first) = appended.first() else {
        return Err(ApiError::from(LogError::Closed));
    };
    let id = epoch.id(first.seq);
    let names: Vec<String> = batch[0].topics.iter().map(|t| t.to_string()).collect();
    let mut response = (
        StatusCode::CREATED,
        Json(Published {
            id: &id,
            topics: &names,
        }),
    )
        .into_response();
    if first.replayed {
        mark_replayed(&mut response);
    }
    Ok(response)
}

/// Checks the caller may publish to every event's topics, scopes them and
/// their keys to the caller's org, and appends them in one commit.
async fn store(
    app: &App,
    access: &Access,
    prepared: &[Prepared],
    batch: bool,
) -> Result<(Vec<Appended>, Scope, Epoch), ApiError> {
    if app.stop.is_cancelled() {
        return Err(ApiError::unavailable(
            "the gateway is shutting down; retry later (with the same Idempotency-Key, if you sent one)",
        ));
    }
    let name_item = |index: usize, e: ApiError| if batch { at_item(index, e) } else { e };
    let mut events = Vec::with_capacity(prepared.len());
    let mut scope = None;
    for (index, item) in prepared.iter().enumerate() {
        let item_scope = app
            .gate
            .publish(&access.caller, &item.topics)
            .map_err(|e| name_item(index, e.into()))?;
        let topics = item
            .topics
            .iter()
            .map(|t| item_scope.apply(t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| name_item(index, e.into()))?;
        let org = match &item_scope {
            Scope::Org(org) => Some(org.as_str()),
            Scope::Global => None,
        };
        let key = item
            .key
            .as_ref()
            .map(|k| StoredKey::new(org, k, &topics, &item.name, &item.data));
        events.push(NewEvent {
            topics,
            name: item.name.clone(),
            data: item.data.clone(),
            key,
        });
        scope.get_or_insert(item_scope);
    }
    let scope = scope.unwrap_or(Scope::Global);
    let shard = app.shard(&scope).await.map_err(storage_failed)?;
    let appended = shard.log.append_all(events).await.map_err(|e| match e {
        LogError::KeyReused { index } => {
            let e = ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                format!(
                    "this Idempotency-Key was used within the last {} s with a different request; \
                     a new event needs a new key (nothing was stored)",
                    app.config.publish.idempotency_window_s
                ),
            );
            name_item(index, e)
        }
        e => storage_failed(e),
    })?;
    Ok((appended, scope, shard.log.epoch().clone()))
}

fn observe(app: &App, started: Instant) {
    app.metrics
        .publish_duration
        .observe(started.elapsed().as_secs_f64());
}

/// `Idempotent-Replayed: true`: the answer is the stored one, nothing new was stored.
fn mark_replayed(response: &mut Response) {
    response
        .headers_mut()
        .insert(IDEMPOTENT_REPLAYED, HeaderValue::from_static("true"));
}

/// Logs a log failure that refuses a publish (once, here where it is
/// handled) and turns it into the `503` answer. A shutdown is no failure.
fn storage_failed(e: LogError) -> ApiError {
    match &e {
        LogError::Closed => {}
        LogError::Replication { .. } => tracing::error!(error = %e, "replication not confirmed"),
        _ => tracing::error!(error = %e, "storage unavailable"),
    }
    ApiError::from(e)
}

/// The `201` body. Serialised straight from borrowed fields: building a
/// `serde_json::Value` first cost a map and a copy of every string per
/// publish. Field order is the key order clients have always seen.
#[derive(Serialize)]
struct Published<'a> {
    id: &'a str,
    topics: &'a [String],
}

/// The batch's `201` body: each item's id, in item order.
#[derive(Serialize)]
struct BatchPublished<'a> {
    ids: &'a [String],
}

fn event_name(raw: Option<&str>) -> Result<EventName, ApiError> {
    Ok(match raw {
        None => EventName::default_name(),
        Some(name) => EventName::parse(name)?,
    })
}

/// Parses the body shape, telling malformed JSON (`invalid_json`) from JSON
/// of the wrong shape (`invalid_body`, naming the field at fault).
fn parse_body<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ApiError> {
    // serde would also fill a struct from a JSON array (`[null, 1]`).
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(ApiError::invalid_body(
            "the body must be a JSON object, not an array",
        ));
    }
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let parsed = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data if field == "." => {
                ApiError::invalid_body(inner.to_string())
            }
            serde_json::error::Category::Data => {
                ApiError::invalid_body(format!("`{field}`: {inner}"))
            }
            _ => ApiError::invalid_json(inner.to_string()),
        }
    })?;
    // Trailing characters after the object.
    deserializer
        .end()
        .map_err(|e| ApiError::invalid_json(e.to_string()))?;
    Ok(parsed)
}

/// Checks the content type and reads at most `limits.max_body_bytes`,
/// refusing a larger declared or streamed body with 413.
async fn read_json_body(app: &App, headers: &HeaderMap, body: Body) -> Result<Bytes, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !is_json_media_type(content_type) {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`",
        ));
    }
    let limit = app.config.limits.max_body_bytes;
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!("the body is larger than limits.max_body_bytes ({limit} bytes)"),
        )
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|len| len > limit as u64) {
        return Err(too_large());
    }
    axum::body::to_bytes(body, limit).await.map_err(|e| {
        if is_length_limit(&e) {
            too_large()
        } else {
            ApiError::invalid_body(format!("could not read the request body: {e}"))
        }
    })
}

fn is_length_limit(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if e.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// `application/json` or any `application/*+json`, parameters allowed.
fn is_json_media_type(value: &str) -> bool {
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

#[cfg(test)]
mod tests {
    use super::{is_json_media_type, Published};

    #[test]
    fn the_201_body_keeps_its_bytes() {
        let topics = ["a".to_owned(), "b".to_owned()];
        let body = serde_json::to_string(&Published {
            id: "Ep0ch-7",
            topics: &topics,
        })
        .unwrap();
        assert_eq!(body, r#"{"id":"Ep0ch-7","topics":["a","b"]}"#);
    }

    #[test]
    fn json_media_types() {
        for ok in [
            "application/json",
            "Application/JSON; charset=utf-8",
            "application/merge-patch+json",
        ] {
            assert!(is_json_media_type(ok), "{ok}");
        }
        for bad in [
            "",
            "text/plain",
            "application/jsonx",
            "text/json",
            "application/x-www-form-urlencoded",
        ] {
            assert!(!is_json_media_type(bad), "{bad}");
        }
    }
}
