//! The ingress's refusal vocabulary. Each variant maps to the status code that tells a cloud the
//! truth (see `shared/docs/cloud-push-contracts.md`): 4xx only for what can never succeed, 503
//! (or 429 where that cloud retries it) for anything worth retrying.

use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use crate::model::text::bounded;

/// Longest error message sent back (messages may quote request values).
const MESSAGE_MAX: usize = 512;

/// Why a request was not accepted.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IngressError {
    /// Missing or wrong credentials (401).
    #[error("{0}")]
    Unauthorized(String),
    /// Authenticated but not allowed: bad signature, topic not on the allow-list (403).
    #[error("{0}")]
    Forbidden(String),
    /// A body this endpoint can never accept (400).
    #[error("{0}")]
    BadRequest(String),
    /// Body over the configured limit (413).
    #[error("request body is larger than the {limit}-byte limit (HELIOS_MAX_BODY_BYTES)")]
    TooLarge { limit: usize },
    /// Kafka refuses the record for good (too large for the broker or topic) (413).
    #[error("Kafka refuses this record (too large for the broker/topic limits): {0}")]
    RefusedByKafka(String),
    /// The body did not arrive within the read timeout (408; the connection is closed).
    #[error("the request body did not arrive within {0:?} (HELIOS_BODY_READ_TIMEOUT_MS)")]
    BodyTimeout(Duration),
    /// Something outside HELIOS failed; the cloud should retry (503 with Retry-After).
    #[error("{0}")]
    Unavailable(String),
    /// Over a rate limit or the in-flight cap, or Kafka is known to be down: 429 where the cloud
    /// retries a 429, else 503; with Retry-After.
    #[error("{message}")]
    Overloaded {
        status: StatusCode,
        retry_after_secs: u64,
        message: String,
    },
}

impl IngressError {
    /// The HTTP status this error answers with.
    pub fn status(&self) -> StatusCode {
        match self {
            IngressError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            IngressError::Forbidden(_) => StatusCode::FORBIDDEN,
            IngressError::BadRequest(_) => StatusCode::BAD_REQUEST,
            IngressError::TooLarge { .. } | IngressError::RefusedByKafka(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            IngressError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            IngressError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            IngressError::Overloaded { status, .. } => *status,
        }
    }

    /// The response, with the request id so a refusal can be found in the logs.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let status = self.status();
        let message = self.to_string();
        let body = serde_json::json!({
            "error": bounded(&message, MESSAGE_MAX),
            "status": status.as_u16(),
            "request_id": request_id,
        });
        let mut resp = (status, axum::Json(body)).into_response();
        let h = resp.headers_mut();
        match &self {
            IngressError::Overloaded {
                retry_after_secs, ..
            } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            IngressError::Unavailable(_) => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            }
            IngressError::BodyTimeout(_) => {
                h.insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        resp
    }
}
