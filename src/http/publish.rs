//! Publish handlers: `POST /topics/{topic}`, `POST /publish`,
//! `POST /{module}/broadcast/{kind}`.
//!
//! Each one reads a bounded JSON body, validates everything, and only then
//! appends: a refused publish stores nothing. The answer waits for the group
//! commit, so `201` means on disk.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::access::Access;
use super::error::ApiError;
use crate::app::App;
use crate::auth::{AuthError, Caller};
use crate::json;
use crate::log::{LogError, NewEvent};
use crate::model::{parse_topic_list, EventName, Topic};

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

pub async fn publish_topic(
    State(app): State<Arc<App>>,
    access: Access,
    path: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let topic = super::path_topic(path)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: TopicPublish = parse_body(&bytes)?;
    let name = event_name(request.event.as_deref())?;
    let data = json::compact(request.data.get(), app.config.limits.max_json_depth)?;
    append(&app, &access, vec![topic], name, data, started).await
}

pub async fn publish_many(
    State(app): State<Arc<App>>,
    access: Access,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    admit(&app, &access)?;
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: MultiPublish = parse_body(&bytes)?;
    let topics = parse_topic_list(request.topics.iter().map(|t| t.as_ref()))?;
    let name = event_name(request.event.as_deref())?;
    let data = json::compact(request.data.get(), app.config.limits.max_json_depth)?;
    append(&app, &access, topics, name, data, started).await
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
    let bytes = read_json_body(&app, &headers, body).await?;
    let started = Instant::now();
    let request: Broadcast = parse_body(&bytes)?;
    let name = EventName::parse(&request.event)?;
    let data = json::compact(request.payload.get(), app.config.limits.max_json_depth)?;
    // Routes never read numbers, and `Value` refuses valid ones beyond f64 (`1e999`).
    let payload: serde_json::Value = serde_json::from_str(&json::zero_numbers(&data))
        .map_err(|e| ApiError::invalid_json(format!("`payload`: {e}")))?;
    let topics = route.topics_for(&payload)?;
    append(&app, &access, topics, name, data, started).await
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

async fn append(
    app: &App,
    access: &Access,
    topics: Vec<Topic>,
    name: EventName,
    data: String,
    started: Instant,
) -> Result<Response, ApiError> {
    if app.stop.is_cancelled() {
        return Err(ApiError::unavailable(
            "the gateway is shutting down; retry later",
        ));
    }
    let scope = app.gate.publish(&access.caller, &topics)?;
    let names: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    let topics = topics
        .iter()
        .map(|t| scope.apply(t))
        .collect::<Result<Vec<_>, _>>()?;
    let shard = app.shard(&scope).await.map_err(storage_failed)?;
    let seq = shard
        .log
        .append(NewEvent { topics, name, data })
        .await
        .map_err(storage_failed)?;
    app.metrics
        .publish_duration
        .observe(started.elapsed().as_secs_f64());
    let id = shard.log.epoch().id(seq);
    Ok((
        StatusCode::CREATED,
        Json(Published {
            id: &id,
            topics: &names,
        }),
    )
        .into_response())
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
