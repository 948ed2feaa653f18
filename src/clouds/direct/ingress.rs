//! Direct ingestion (`POST /api/v1/events/ingest`): one event object or an array of them, from
//! systems that are not a cloud push. Protected by an API key header, checked at the door.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::config::IngestAuth;
use crate::http::landing::RecordKind;
use crate::http::overload::{self, Backpressure, Gate, Lane};
use crate::http::shape::Shape;
use crate::http::{secret_matches, Front, HasFront, Incoming, IngressError};
use crate::source::Source;

/// What the direct ingestion handler shares.
pub struct DirectState {
    pub front: Arc<Front>,
    pub auth: IngestAuth,
}

impl HasFront for DirectState {
    fn front(&self) -> &Front {
        &self.front
    }
}

/// The direct ingestion route (behind the overload guard).
pub fn routes(front: &Arc<Front>, auth: IngestAuth) -> Router {
    let st = Arc::new(DirectState {
        front: front.clone(),
        auth,
    });
    let s2 = st.clone();
    Router::new()
        .route(
            "/api/v1/events/ingest",
            post(handle).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let st = s2.clone();
                    async move {
                        let gate = Gate {
                            lane: Lane::Direct,
                            endpoint: ENDPOINT,
                            backpressure: Backpressure::TooManyRequests,
                            unconfigured: st.auth.api_key.is_none().then_some(OPEN_HINT),
                            credentials: credentials(&st.auth, req.headers()),
                        };
                        overload::guard(st.front.clone(), gate, req, next).await
                    }
                },
            )),
        )
        .with_state(st)
}

const ENDPOINT: &str = "ingest";

/// `POST /api/v1/events/ingest`
async fn handle(State(st): State<Arc<DirectState>>, inc: Incoming) -> Response {
    let result = process(&st, &inc).await;
    st.front.finish(Source::Direct, ENDPOINT, &inc, result)
}

const OPEN_HINT: &str = "set HELIOS_INGEST_API_KEY";

/// The API key header, checked at the door (before any shared capacity is spent).
fn credentials(auth: &IngestAuth, headers: &axum::http::HeaderMap) -> Result<(), IngressError> {
    let Some(expected) = &auth.api_key else {
        return Ok(());
    };
    let ok = headers
        .get(auth.header.as_str())
        .is_some_and(|v| secret_matches(v.as_bytes(), expected.as_bytes()));
    if ok {
        return Ok(());
    }
    metrics::counter!("helios_ingress_auth_failures_total", "source" => "direct", "reason" => "api_key")
        .increment(1);
    Err(IngressError::Unauthorized(format!(
        "missing or wrong API key (header `{}`)",
        auth.header
    )))
}

async fn process(st: &DirectState, inc: &Incoming) -> Result<Response, IngressError> {
    let body = inc.body()?;
    // Checked by its shape, never built: a body's memory is its bytes.
    let count = match crate::http::shape::shape(body) {
        Err(e) => {
            return Err(IngressError::BadRequest(format!(
                "body is not valid JSON: {e}"
            )))
        }
        Ok(Shape::Object) => Some(1),
        Ok(Shape::Array { len: 0, .. }) => {
            return Err(IngressError::BadRequest(
                "empty array: nothing to ingest".into(),
            ))
        }
        Ok(Shape::Array {
            first_non_object: Some(i),
            ..
        }) => {
            return Err(IngressError::BadRequest(format!(
                "element {i} of the array is not an event object"
            )))
        }
        Ok(Shape::Array { len, .. }) => Some(len),
        Ok(Shape::Scalar) => {
            return Err(IngressError::BadRequest(
                "body must be an event object or an array of event objects".into(),
            ))
        }
    };
    st.front
        .land(
            Source::Direct,
            ENDPOINT,
            inc,
            body,
            RecordKind::Event,
            false,
        )
        .await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(serde_json::json!({"status": "accepted", "events": count, "request_id": inc.request_id})),
    )
        .into_response())
}
