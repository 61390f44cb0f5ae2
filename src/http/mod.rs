//! The HTTP layer: routes, layers and handlers of docs/API.md.
//!
//! Handlers are thin: extract and validate, call the domain, map the error
//! through [`ApiError`]. No compression layer anywhere: it would buffer event
//! streams. The trace layer logs the path only, never the query string
//! (tokens may travel in `?access_token=`).

mod access;
mod console;
pub mod error;
mod h2;
mod hop;
pub mod listener;
mod ops;
mod publish;
mod raw;
pub mod server;
mod subscribe;
mod table;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::PathRejection;
use axum::extract::Path;
use axum::http::{header, HeaderName, HeaderValue, Method, Request, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{on, MethodRouter};
use axum::Router;
use tower_http::cors::{AllowOrigin, CorsLayer};
use tower_http::trace::TraceLayer;

pub use error::ApiError;

use crate::app::App;
use crate::config::CorsConfig;
use crate::model::Topic;

/// The whole router, with its state.
pub fn router(app: Arc<App>) -> Router {
    let mut routes: Router<Arc<App>> = Router::new();
    for route in table::ROUTES {
        routes = routes.route(route.path, method_router(route));
    }
    let mut router = routes
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(Arc::clone(&app));
    let max_url_bytes = app.config.limits.max_url_bytes;
    router = router.layer(axum::middleware::from_fn(move |request: Request<axum::body::Body>, next: axum::middleware::Next| async move {
        let target = request.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
        if target > max_url_bytes {
            return ApiError::new(
                StatusCode::URI_TOO_LONG,
                "uri_too_long",
                format!("the request target is {target} bytes; the limit is {max_url_bytes} (limits.max_url_bytes)"),
            )
            .into_response();
        }
        next.run(request).await
    }));
    // Outside the URL check: a browser must be able to read a 414 too (it
    // sees a bare CORS failure otherwise).
    if let Some(cors) = cors_layer(&app.config.cors) {
        router = router.layer(cors);
    }
    router.layer(
        TraceLayer::new_for_http()
            .make_span_with(|request: &Request<_>| {
                tracing::info_span!("http", method = %request.method(), path = %request.uri().path())
            }),
    )
}

/// The handler of one table entry, for its method only.
fn method_router(route: &table::Route) -> MethodRouter<Arc<App>> {
    use table::Endpoint;
    let filter = route.verb.filter();
    match route.endpoint {
        Endpoint::Console => on(filter, console::index),
        Endpoint::ConsoleAsset => on(filter, console::asset),
        Endpoint::ClientJs => on(filter, console::client_js),
        Endpoint::ClientDts => on(filter, console::client_dts),
        Endpoint::Healthz => on(filter, ops::healthz),
        Endpoint::Readyz => on(filter, ops::readyz),
        Endpoint::Metrics => on(filter, ops::metrics),
        Endpoint::ListTopics => on(filter, ops::list_topics),
        Endpoint::TopicInfo => on(filter, ops::topic_info),
        Endpoint::SubscribeTopic => on(filter, subscribe::subscribe_topic),
        Endpoint::SubscribeEvents => on(filter, subscribe::subscribe_events),
        Endpoint::PublishTopic => on(filter, publish::publish_topic),
        Endpoint::PublishMany => on(filter, publish::publish_many),
        Endpoint::PublishBatch => on(filter, publish::publish_batch),
        Endpoint::Broadcast => on(filter, publish::broadcast),
    }
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such route; see docs/API.md for the routes this gateway serves")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "method not allowed here; see the Allow header",
    )
}

/// The `{topic}` path segment, percent-decoded and validated.
pub(crate) fn path_topic(path: Result<Path<String>, PathRejection>) -> Result<Topic, ApiError> {
    let Path(raw) = path.map_err(|e| {
        ApiError::invalid_topic(format!(
            "topic is not valid UTF-8 after percent-decoding: {}",
            e.body_text()
        ))
    })?;
    Ok(Topic::parse(&raw)?)
}

fn cors_layer(config: &CorsConfig) -> Option<CorsLayer> {
    if config.allowed_origins.is_empty() {
        return None;
    }
    let layer = CorsLayer::new()
        .allow_methods([Method::GET, Method::POST])
        .allow_headers([
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
            header::AUTHORIZATION,
            publish::IDEMPOTENCY_KEY,
        ])
        // Scripts may read when to retry a 429/503, and whether an answer was replayed.
        .expose_headers([header::RETRY_AFTER, publish::IDEMPOTENT_REPLAYED])
        .max_age(Duration::from_secs(600));
    if config.allowed_origins.iter().any(|o| o == "*") {
        // A wildcard cannot be combined with credentials (cookies) by browsers.
        Some(layer.allow_origin(AllowOrigin::any()))
    } else {
        let origins: Vec<HeaderValue> = config
            .allowed_origins
            .iter()
            .filter_map(|o| o.parse().ok())
            .collect();
        Some(layer.allow_origin(origins).allow_credentials(true))
    }
}
