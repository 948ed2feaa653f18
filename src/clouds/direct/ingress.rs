//! Direct ingestion (`POST /api/v1/events/ingest`): one event object or an array of them, from
//! systems that are not a cloud push. Protected by an API key header.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};

use super::config::IngestAuth;
use crate::http::landing::RecordKind;
use crate::http::overload;
use crate::http::{parse_json_lenient, secret_matches, Front, HasFront, Incoming, IngressError};
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
    let f = front.clone();
    Router::new()
        .route(
            "/api/v1/events/ingest",
            post(handle).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    overload::guard(
                        f.clone(),
                        Source::Direct,
                        ENDPOINT,
                        overload::too_many_requests,
                        req,
                        next,
                    )
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

async fn process(st: &DirectState, inc: &Incoming) -> Result<Response, IngressError> {
    let auth = &st.auth;
    if let Some(expected) = &auth.api_key {
        let ok = inc
            .headers
            .get(auth.header.as_str())
            .is_some_and(|v| secret_matches(v.as_bytes(), expected.as_bytes()));
        if !ok {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "direct", "reason" => "api_key")
                .increment(1);
            return Err(IngressError::Unauthorized(format!(
                "missing or wrong API key (header `{}`)",
                auth.header
            )));
        }
    }
    let body = inc.body()?;
    let count = match parse_json_lenient(body)? {
        None => None,
        Some(serde_json::Value::Object(_)) => Some(1),
        Some(serde_json::Value::Array(a)) if a.is_empty() => {
            return Err(IngressError::BadRequest(
                "empty array: nothing to ingest".into(),
            ))
        }
        Some(serde_json::Value::Array(a)) => {
            if let Some(i) = a.iter().position(|e| !e.is_object()) {
                return Err(IngressError::BadRequest(format!(
                    "element {i} of the array is not an event object"
                )));
            }
            Some(a.len())
        }
        Some(_) => {
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
