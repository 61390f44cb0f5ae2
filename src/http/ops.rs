//! Operations endpoints: `/healthz`, `/readyz`, `/metrics`, `/topics/{topic}/info`.

use std::sync::Arc;

use axum::extract::rejection::PathRejection;
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;

use super::access::Access;
use super::error::ApiError;
use crate::app::App;

/// `200` while the process runs.
pub async fn healthz() -> Response {
    Json(serde_json::json!({ "status": "ok" })).into_response()
}

/// `200` when storage is open and writable and (Redis) this node's tail
/// delivers: its delivery probes come back in time. Else `503`.
pub async fn readyz(State(app): State<Arc<App>>) -> Result<Response, ApiError> {
    if app.stop.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    if !app.logs_ready() {
        return Err(ApiError::unavailable(
            "storage is not writable, or this node's tail of the log does not deliver",
        ));
    }
    Ok(Json(serde_json::json!({ "status": "ready" })).into_response())
}

/// Prometheus text exposition.
pub async fn metrics(State(app): State<Arc<App>>) -> Response {
    if let Some(bytes) = app.log.size_on_disk() {
        app.metrics
            .storage_bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    app.metrics
        .log_head
        .set(i64::try_from(app.log.durable_head()).unwrap_or(i64::MAX));
    app.metrics.tail_lag.set(app.tail_lag().as_secs_f64());
    app.metrics.refresh_memory();
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// `GET /topics`: every topic the log knows that the caller may see, with
/// the same fields as `/topics/{topic}/info` (an extension of the shared
/// contract, listed in docs/API.md; used by the web console). Names are the
/// caller's (unscoped) names.
pub async fn list_topics(
    State(app): State<Arc<App>>,
    access: Access,
) -> Result<Response, ApiError> {
    let scope = app.gate.listing_scope(&access.caller)?;
    if app.stop.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    let shard = app
        .shard(&scope)
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cannot open the log to list topics"))?;
    let epoch = shard.log.epoch();
    let mut newest_listed = 0;
    let topics: Vec<serde_json::Value> = shard
        .log
        .topics()
        .into_iter()
        .filter_map(|(stored, info)| {
            let visible = scope.strip(&stored)?;
            app.gate.may_list(&access.caller, &visible).then(|| {
                newest_listed = newest_listed.max(info.last.unwrap_or(0));
                serde_json::json!({
                    "topic": visible.as_str(),
                    "first_id": info.first.map(|seq| epoch.id(seq)),
                    "last_id": info.last.map(|seq| epoch.id(seq)),
                    "count": info.count,
                    "subscribers": shard.hub.subscriber_count(&stored),
                })
            })
        })
        .collect();
    // The log's head counts every org's events when orgs share one log: an
    // org sees the newest id among its own listed topics instead.
    let head = if app.log_is_shared_with_other_orgs(&scope) {
        newest_listed
    } else {
        shard.log.durable_head()
    };
    Ok(Json(serde_json::json!({ "topics": topics, "head_id": epoch.id(head) })).into_response())
}

/// `{"topic", "first_id", "last_id", "count", "subscribers"}`; needs the
/// right to subscribe to the topic.
pub async fn topic_info(
    State(app): State<Arc<App>>,
    access: Access,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let topic = super::path_topic(path)?;
    let scope = app
        .gate
        .subscribe(&access.caller, std::slice::from_ref(&topic))?;
    let stored = scope.apply(&topic)?;
    if app.stop.is_cancelled() {
        return Err(ApiError::unavailable("shutting down"));
    }
    let shard = app
        .shard(&scope)
        .await
        .inspect_err(|e| tracing::error!(error = %e, "cannot open the log for topic info"))?;
    let info = shard.log.topic_info(&stored);
    let epoch = shard.log.epoch();
    Ok(Json(serde_json::json!({
        "topic": topic.as_str(),
        "first_id": info.first.map(|seq| epoch.id(seq)),
        "last_id": info.last.map(|seq| epoch.id(seq)),
        "count": info.count,
        "subscribers": shard.hub.subscriber_count(&stored),
    }))
    .into_response())
}
