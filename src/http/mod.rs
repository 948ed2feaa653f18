//! The HTTP kit every cloud's endpoints are built from: the state they share ([`Front`]: raw
//! landing, the broker health, the overload guard), the request extractor ([`Incoming`]: headers,
//! query, body read with a size limit and a timeout), the refusal vocabulary ([`IngressError`]),
//! and the response bookkeeping (status metrics, bounded log lines). It knows no cloud: each
//! cloud's folder builds its routes from these parts, and the ingress assembles them.

pub mod error;
pub mod landing;
pub mod overload;
pub mod request_id;
pub mod shape;

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{FromRequest, Request};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use bytes::Bytes;
use chrono::{DateTime, Utc};

use crate::kafka::KafkaHealth;
use crate::model::text::echo;
use crate::source::Source;
pub use error::IngressError;
use landing::{Delivery, Landing, RecordKind};
pub use overload::Overload;

/// What every endpoint shares.
pub struct Front {
    pub landing: Landing,
    pub kafka_health: KafkaHealth,
    pub overload: Overload,
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive (slow clients are cut off).
    pub body_timeout: Duration,
}

impl Front {
    /// Lands a delivery; `Ok` means Kafka acknowledged it.
    pub async fn land(
        &self,
        source: Source,
        endpoint: &'static str,
        inc: &Incoming,
        body: &[u8],
        kind: RecordKind,
        attribute_headers: bool,
    ) -> Result<(), IngressError> {
        self.land_traced(source, endpoint, inc, body, kind, attribute_headers, None)
            .await
    }

    /// [`Front::land`] for a body that carries its trace context (`trace_hint`) where the
    /// request's headers do not.
    #[allow(clippy::too_many_arguments)]
    pub async fn land_traced(
        &self,
        source: Source,
        endpoint: &'static str,
        inc: &Incoming,
        body: &[u8],
        kind: RecordKind,
        attribute_headers: bool,
        trace_hint: Option<&str>,
    ) -> Result<(), IngressError> {
        let d = Delivery {
            source,
            endpoint,
            request_id: &inc.request_id,
            received_at: inc.received_at,
            headers: &inc.headers,
            body,
            trace_hint,
        };
        self.landing.land(&d, kind, attribute_headers).await
    }

    /// The readiness answer: 200 while Kafka answers the health probe, 503 otherwise; `checks`
    /// says which checks are in force (never a configured value).
    pub fn readiness(&self, checks: serde_json::Value) -> Response {
        let ready = self.kafka_health.is_reachable();
        let body = serde_json::json!({
            "status": if ready { "ready" } else { "unavailable" },
            "version": env!("CARGO_PKG_VERSION"),
            "kafka": self.kafka_health.detail(),
            "checks": checks,
        });
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        (status, Json(body)).into_response()
    }

    /// Turns a handler's outcome into the response, recording metrics and the request id.
    /// Messages echoed from requests are bounded in the response and in the log line.
    pub fn finish(
        &self,
        source: Source,
        endpoint: &'static str,
        inc: &Incoming,
        result: Result<Response, IngressError>,
    ) -> Response {
        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                // 408 is final for SNS and EventBridge (every 4xx but 429 is): a body that came
                // too slowly may come faster next time, so they hear 503.
                let e = match e {
                    IngressError::BodyTimeout(d) if source == Source::Aws => {
                        IngressError::Unavailable(format!(
                            "the request body did not arrive within {d:?} (HELIOS_BODY_READ_TIMEOUT_MS); retry"
                        ))
                    }
                    e => e,
                };
                let status = e.status();
                let msg = e.to_string();
                let msg = echo(&msg);
                if status.is_server_error() {
                    tracing::warn!(request_id = %inc.request_id, source = %source, endpoint, status = status.as_u16(), error = %msg, "request not accepted");
                } else {
                    tracing::info!(request_id = %inc.request_id, source = %source, endpoint, status = status.as_u16(), error = %msg, "request refused");
                }
                e.into_response_with_id(&inc.request_id)
            }
        };
        if let Ok(v) = HeaderValue::from_str(&inc.request_id) {
            resp.headers_mut().insert("x-request-id", v);
        }
        let status = resp.status().as_u16().to_string();
        metrics::counter!("helios_ingress_requests_total", "source" => source.as_str(), "endpoint" => endpoint, "status" => status)
            .increment(1);
        metrics::histogram!("helios_ingress_request_duration_seconds", "source" => source.as_str(), "endpoint" => endpoint)
            .record(inc.started.elapsed().as_secs_f64());
        resp
    }
}

/// A request as every handler sees it: headers, query string, and the body (or why it could
/// not be read: too large, too slow, broken connection).
pub struct Incoming {
    pub request_id: String,
    pub received_at: DateTime<Utc>,
    pub started: Instant,
    pub headers: HeaderMap,
    pub query: Option<String>,
    body: Result<Bytes, IngressError>,
}

impl Incoming {
    /// The body, or the error that reading it produced.
    pub fn body(&self) -> Result<&Bytes, IngressError> {
        match &self.body {
            Ok(b) => Ok(b),
            Err(e) => Err(e.clone()),
        }
    }

    /// A header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query-string parameter (percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        query_param(self.query.as_deref(), name)
    }
}

/// A parameter of a query string (percent-decoded).
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    let q = query?;
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .ok()?
        .query_pairs()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

/// A handler state that carries the [`Front`] (each cloud's state does).
pub trait HasFront {
    fn front(&self) -> &Front;
}

impl<T> FromRequest<Arc<T>> for Incoming
where
    T: HasFront + Send + Sync + 'static,
{
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, state: &Arc<T>) -> Result<Self, Self::Rejection> {
        let front = state.front();
        let started = Instant::now();
        let received_at = Utc::now();
        let (mut parts, body) = req.into_parts();
        let headers = std::mem::take(&mut parts.headers);
        let query = parts.uri.query().map(str::to_string);
        let req = Request::from_parts(parts, body);
        let request_id = headers
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .filter(|v| !v.is_empty() && v.len() <= 128)
            .map(str::to_string)
            .unwrap_or_else(request_id::new);
        let limit = front.max_body_bytes;
        let body =
            match tokio::time::timeout(front.body_timeout, Bytes::from_request(req, state)).await {
                Err(_) => Err(IngressError::BodyTimeout(front.body_timeout)),
                Ok(Ok(b)) => Ok(b),
                Ok(Err(rej)) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                    Err(IngressError::TooLarge { limit })
                }
                Ok(Err(rej)) => Err(IngressError::BadRequest(format!(
                    "could not read the request body: {}",
                    rej.body_text()
                ))),
            };
        Ok(Incoming {
            request_id,
            received_at,
            started,
            headers,
            query,
            body,
        })
    }
}

/// The JSON answer to an accepted delivery.
pub fn accepted(inc: &Incoming, status: StatusCode) -> Response {
    /// Serialized as it is (no JSON tree built per request: the hot path of every endpoint).
    #[derive(serde::Serialize)]
    struct Accepted<'a> {
        status: &'static str,
        request_id: &'a str,
    }
    (
        status,
        Json(Accepted {
            status: "accepted",
            request_id: &inc.request_id,
        }),
    )
        .into_response()
}

/// Checks that a body is well-formed JSON without building it (the hot path of most endpoints).
pub fn check_json(body: &[u8]) -> Result<(), IngressError> {
    serde_json::from_slice::<serde::de::IgnoredAny>(body)
        .map(|_| ())
        .map_err(|e| IngressError::BadRequest(format!("body is not valid JSON: {e}")))
}

/// A JSON body, parsed; or `None` when it is well-formed JSON that cannot be represented as a
/// value (a lone surrogate `\ud800`, a number such as `1e400`). Such a body is still landed
/// untouched: the processor dead-letters it (`invalid_json`) and the raw topic keeps it, so a
/// later fix can replay it. Only what is not JSON at all is refused (400).
pub fn parse_json_lenient(body: &[u8]) -> Result<Option<serde_json::Value>, IngressError> {
    match serde_json::from_slice(body) {
        Ok(v) => Ok(Some(v)),
        Err(_) => check_json(body).map(|()| None),
    }
}

/// Constant-time comparison of a presented secret with the expected one.
pub fn secret_matches(presented: &[u8], expected: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    // Length is not secret; the content comparison is constant-time.
    presented.len() == expected.len() && bool::from(presented.ct_eq(expected))
}
