//! Subscribe handlers: `GET /topics/{topic}` and `GET /events?topic=…`.
//!
//! They validate topics (a bad topic is a 400: there is nothing to resume),
//! pick the resume point (header, then query, then live), and hand over to a
//! [`Subscription`]. A stream never answers 429/503 (an `EventSource` would
//! give up): when shedding load it answers `200`, `retry:`, a comment, and
//! closes, and the client comes back later and resumes.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;

use super::access::Access;
use super::error::ApiError;
use crate::app::App;
use crate::metrics::Metrics;
use crate::model::{parse_topic_list, ResumePoint, Topic};
use crate::sse;
use crate::subscription::{Handoff, StreamGuards, Subscription};

pub async fn subscribe_topic(
    State(app): State<Arc<App>>,
    access: Access,
    path: Result<Path<String>, PathRejection>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let topic = super::path_topic(path)?;
    let pairs = query_pairs(query.as_deref());
    open_stream(&app, &access, vec![topic], &headers, &pairs, "topic").await
}

pub async fn subscribe_events(
    State(app): State<Arc<App>>,
    access: Access,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(query.as_deref());
    let topics = parse_topic_list(
        pairs
            .iter()
            .filter(|(k, _)| k == "topic")
            .map(|(_, v)| v.as_str()),
    )?;
    let max = app.config.limits.max_topics_per_stream;
    if topics.len() > max {
        return Err(ApiError::invalid_topic(format!(
            "a stream may follow at most {max} topics (limits.max_topics_per_stream); this one names {}",
            topics.len()
        )));
    }
    open_stream(&app, &access, topics, &headers, &pairs, "events").await
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(query.unwrap_or("").as_bytes())
        .into_owned()
        .collect()
}

/// The resume id: `Last-Event-ID`, then `?last_event_id=`, then
/// `?lastEventId=`; empty values count as absent.
fn resume_id(headers: &HeaderMap, pairs: &[(String, String)]) -> Option<String> {
    if let Some(value) = headers.get("last-event-id") {
        let text = String::from_utf8_lossy(value.as_bytes()).into_owned();
        if !text.is_empty() {
            return Some(text);
        }
    }
    ["last_event_id", "lastEventId"].iter().find_map(|key| {
        pairs
            .iter()
            .find(|(k, v)| k == key && !v.is_empty())
            .map(|(_, v)| v.clone())
    })
}

/// Authorizes, takes the connection slots (or sheds), and starts the stream.
/// 401/403 stay errors: no reconnect is wanted for them.
async fn open_stream(
    app: &Arc<App>,
    access: &Access,
    topics: Vec<Topic>,
    headers: &HeaderMap,
    pairs: &[(String, String)],
    mode: &'static str,
) -> Result<Response, ApiError> {
    let scope = app.gate.subscribe(&access.caller, &topics)?;
    let stored = topics
        .iter()
        .map(|t| scope.apply(t))
        .collect::<Result<Vec<_>, _>>()?;
    if app.stop.is_cancelled() {
        return Ok(shed(
            app,
            "shutting_down",
            "the gateway is shutting down; reconnect shortly",
        ));
    }
    let Ok(permit) = Arc::clone(&app.stream_permits).try_acquire_owned() else {
        return Ok(shed(
            app,
            "max_connections",
            "too many connections; reconnect later",
        ));
    };
    let Some(ip_slot) = app.limits.stream_slot(access.ip) else {
        return Ok(shed(
            app,
            "max_connections_per_ip",
            "too many connections from this address; reconnect later",
        ));
    };
    let shard = match app.shard(&scope).await {
        Ok(shard) => shard,
        Err(e) => {
            tracing::warn!(error = %e, "cannot open the log of this stream");
            return Ok(shed(
                app,
                "storage_unavailable",
                "storage is unavailable; reconnect shortly",
            ));
        }
    };
    let resume = ResumePoint::parse(resume_id(headers, pairs).as_deref(), shard.log.epoch());
    if let ResumePoint::After(seq) = resume {
        // Acknowledged through another node but not seen by this one yet?
        shard.log.settle(seq).await;
    }
    let ends_in = access.caller.principal().map(|p| p.remaining());
    let subscription = Subscription::start(
        app.stream_context_for(&shard),
        stored,
        resume,
        app.stream_settings(),
        StreamGuards {
            permit,
            ip_slot: Some(ip_slot),
            ends_in,
        },
        mode,
    );
    let (handoff, body) = Handoff::new(subscription);
    let mut response = event_stream_response(Body::from_stream(body));
    response.extensions_mut().insert(handoff);
    Ok(response)
}

/// `200` + `retry:` + a comment saying why, then close.
fn shed(app: &App, reason: &'static str, why: &str) -> Response {
    app.metrics
        .streams_shed
        .get_or_create(&Metrics::label("reason", reason))
        .inc();
    let body = format!(
        "{}{}",
        sse::retry_block(app.config.stream.retry_ms),
        sse::comment_block(why)
    );
    event_stream_response(Body::from(body))
}

fn event_stream_response(body: Body) -> Response {
    let mut response = Response::new(body);
    *response.status_mut() = StatusCode::OK;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_id_precedence() {
        let mut headers = HeaderMap::new();
        let pairs = query_pairs(Some("lastEventId=c&last_event_id=b"));
        assert_eq!(resume_id(&headers, &pairs).as_deref(), Some("b"));
        headers.insert("last-event-id", HeaderValue::from_static("a"));
        assert_eq!(resume_id(&headers, &pairs).as_deref(), Some("a"));
        headers.insert("last-event-id", HeaderValue::from_static(""));
        assert_eq!(resume_id(&headers, &pairs).as_deref(), Some("b"));
        let pairs = query_pairs(Some("last_event_id=&lastEventId=c"));
        assert_eq!(resume_id(&headers, &pairs).as_deref(), Some("c"));
        assert_eq!(resume_id(&HeaderMap::new(), &[]), None);
    }
}
