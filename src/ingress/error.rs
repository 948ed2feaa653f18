//! The ingress's refusal vocabulary. Each variant maps to the status code that tells a cloud the
//! truth (see `shared/docs/cloud-push-contracts.md`): 4xx only for what can never succeed, 503
//! for anything worth retrying.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

/// Why a request was not accepted.
#[derive(Debug, thiserror::Error)]
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
    /// Something outside HELIOS failed; the cloud should retry (503 with Retry-After).
    #[error("{0}")]
    Unavailable(String),
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
            IngressError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response, with the request id so a refusal can be found in the logs.
    pub fn into_response_with_id(self, request_id: &str) -> Response {
        let status = self.status();
        let body = serde_json::json!({
            "error": self.to_string(),
            "status": status.as_u16(),
            "request_id": request_id,
        });
        let mut resp = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
        }
        resp
    }
}
