//! Direct ingestion (`POST /api/v1/events/ingest`): one event object or an array of them, from
//! systems that are not a cloud push. Protected by an API key header.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::ingress::landing::RecordKind;
use crate::ingress::{parse_json_lenient, secret_matches, App, Incoming, IngressError};
use crate::source::Source;

const ENDPOINT: &str = "ingest";

/// `POST /api/v1/events/ingest`
pub async fn handle(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    let result = process(&app, &inc).await;
    app.finish(Source::Direct, ENDPOINT, &inc, result)
}

async fn process(app: &App, inc: &Incoming) -> Result<Response, IngressError> {
    let auth = &app.cfg.ingest;
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
    app.land(
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

// ---- normalization (processor side) ----------------------------------------------------------

use crate::model::draft::{generic_draft, json, object_or_array};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};

/// Normalizes a direct ingestion: one event object or an array of them. An event without an
/// id gets one derived from its raw record position (stable across reprocessing; send your own
/// `event_id` to have resubmissions deduplicated).
pub fn normalize(raw: &RawRecord) -> Normalized {
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let items = match object_or_array(&v, "direct") {
        Ok(items) => items,
        Err(e) => return Normalized::Failed(e),
    };
    let out = items
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let i = i as u32;
            if !e.is_object() {
                return Err(NormalizeError::new(
                    DlqReason::UnrecognizedPayload,
                    "array element is not an event object",
                )
                .at(i));
            }
            let mut d = generic_draft(e);
            if d.event_id.is_none() {
                // From the original raw record's position, so a redriven copy derives the same id.
                d.event_id = Some(format!("raw-{}/{i}", raw.origin()));
            }
            d.finish(Source::Direct, raw, i)
        })
        .collect();
    Normalized::events(out)
}
