//! `ApiError`: the one place where failures become an HTTP status and the
//! JSON body `{"error": {"code", "message"}}` of docs/API.md.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::auth::AuthError;
use crate::json::JsonError;
use crate::limits::RateLimited;
use crate::log::LogError;
use crate::model::ValidationError;
use crate::routes::RouteError;

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Seconds, for `Retry-After` on 429/503.
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            retry_after: None,
        }
    }

    pub fn invalid_json(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_json", message)
    }

    pub fn invalid_body(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_body", message)
    }

    pub fn invalid_topic(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_topic", message)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            retry_after: Some(1),
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
        }
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        let code = match e {
            ValidationError::Topic(_) | ValidationError::TopicCount(_) => "invalid_topic",
            ValidationError::EventName(_) | ValidationError::ReservedEventName => "invalid_event",
        };
        Self::new(StatusCode::BAD_REQUEST, code, e.to_string())
    }
}

impl From<crate::idempotency::KeyError> for ApiError {
    fn from(e: crate::idempotency::KeyError) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            e.to_string(),
        )
    }
}

impl From<JsonError> for ApiError {
    fn from(e: JsonError) -> Self {
        Self::invalid_json(format!("`data`: {e}"))
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Forbidden { .. } => {
                Self::new(StatusCode::FORBIDDEN, "forbidden", e.to_string())
            }
            AuthError::ScopedTooLong(_) => Self::invalid_topic(e.to_string()),
            _ => Self::new(StatusCode::UNAUTHORIZED, "unauthorized", e.to_string()),
        }
    }
}

impl From<RateLimited> for ApiError {
    fn from(e: RateLimited) -> Self {
        let seconds = e.retry_after.as_secs_f64().ceil().max(1.0) as u64;
        Self {
            retry_after: Some(seconds),
            ..Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("too many publishes; retry after {seconds} s"),
            )
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_payload",
            e.to_string(),
        )
    }
}

/// Only decides the answer: the handler that meets a log error logs it
/// (once, with its context), so a conversion never has side effects.
impl From<LogError> for ApiError {
    fn from(e: LogError) -> Self {
        match e {
            LogError::Closed => Self::unavailable(
                "the gateway is shutting down; retry on another instance or later, with the same Idempotency-Key",
            ),
            LogError::Replication { .. } => Self::unavailable(
                "the event was stored on the Redis primary but not confirmed by enough replicas in time; it may still be delivered; retry with the same Idempotency-Key so it is not stored twice",
            ),
            // Redis lost the log (flushed, or a failover to a replica that
            // lacked it): only restarting the gateways helps, not a retry.
            LogError::Lost(_) => Self::unavailable(
                "Redis lost this gateway's log (its data was flushed or rolled back); restart the gateways: retrying will not help",
            ),
            LogError::Failed(ref cause) | LogError::Commit(ref cause)
                if matches!(**cause, LogError::Lost(_)) =>
            {
                Self::unavailable(
                    "Redis lost this gateway's log (its data was flushed or rolled back); restart the gateways: retrying will not help",
                )
            }
            // Mapped by the publish handler, which knows the request; kept
            // total here.
            LogError::KeyReused { .. } => Self::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used before with a different request",
            ),
            // Refused before anything was written: the log failed earlier.
            LogError::Failed(_) => Self::unavailable(
                "storage failed earlier and refuses writes until the gateway is restarted; nothing was stored",
            ),
            // The write itself failed: sled may still persist a batch whose
            // sync failed, and Redis may have applied a command whose answer
            // was lost. Saying "nothing was stored" would be a guess.
            _ => Self::unavailable(
                "storage failed during the write; the event may or may not have been stored: retry later with the same Idempotency-Key, which stores it at most once",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({ "error": { "code": self.code, "message": self.message } });
        let mut response = (self.status, Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
