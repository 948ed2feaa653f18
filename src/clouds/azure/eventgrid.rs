//! Event Grid webhooks. Event Grid schema bodies are always arrays; CloudEvents-schema bodies are
//! one object (an array when output batching is on). Two handshakes:
//! - `Microsoft.EventGrid.SubscriptionValidationEvent` (Event Grid schema): answer **200** (202
//!   is not accepted) with `{"validationResponse": "<validationCode>"}`;
//! - CloudEvents abuse protection: `OPTIONS` with `WebHook-Request-Origin`, answered by echoing
//!   it in `WebHook-Allowed-Origin` (never hard-coded: sovereign clouds use other hosts).
//!
//! Both handshakes are also landed raw for the audit trail and never become business events.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::ingress::landing::RecordKind;
use crate::ingress::{accepted, parse_json_lenient, secret_matches, App, Incoming, IngressError};
use crate::source::Source;

const ENDPOINT: &str = "eventgrid";
/// Event type of the Event Grid schema validation handshake.
pub const VALIDATION_EVENT: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";

/// `POST /api/v1/webhooks/azure/eventgrid`
pub async fn handle_post(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    let result = process_post(&app, &inc).await;
    app.finish(Source::Azure, ENDPOINT, &inc, result)
}

/// `OPTIONS /api/v1/webhooks/azure/eventgrid` (CloudEvents webhook validation)
pub async fn handle_options(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    let result = process_options(&app, &inc).await;
    app.finish(Source::Azure, ENDPOINT, &inc, result)
}

fn subscription_label(inc: &Incoming) -> String {
    inc.header("aeg-subscription-name")
        .unwrap_or("unknown")
        .to_string()
}

fn handshake_metric(kind: &'static str, subscription: String, outcome: &'static str) {
    metrics::counter!("helios_ingress_handshakes_total",
        "source" => "azure", "kind" => kind, "subscription" => subscription, "outcome" => outcome)
    .increment(1);
}

fn check_secret(app: &App, inc: &Incoming) -> Result<(), IngressError> {
    let cfg = &app.cfg.eventgrid;
    let Some(expected) = &cfg.secret else {
        return Ok(());
    };
    let from_query = inc.query_param(&cfg.secret_param);
    let from_header = inc.header(&cfg.secret_header).map(str::to_string);
    let ok = [from_query, from_header]
        .into_iter()
        .flatten()
        .any(|p| secret_matches(p.as_bytes(), expected.as_bytes()));
    if ok {
        Ok(())
    } else {
        metrics::counter!("helios_ingress_auth_failures_total", "source" => "azure", "reason" => "eventgrid_secret")
            .increment(1);
        Err(IngressError::Unauthorized(format!(
            "missing or wrong Event Grid secret (query parameter `{}` or header `{}`)",
            cfg.secret_param, cfg.secret_header
        )))
    }
}

async fn process_options(app: &App, inc: &Incoming) -> Result<Response, IngressError> {
    let kind = "cloudevents_webhook_validation";
    if let Err(e) = check_secret(app, inc) {
        handshake_metric(kind, subscription_label(inc), "refused");
        return Err(e);
    }
    let origin = inc
        .headers
        .get("webhook-request-origin")
        .cloned()
        .ok_or_else(|| {
            IngressError::BadRequest(
                "OPTIONS without WebHook-Request-Origin: not a CloudEvents webhook validation"
                    .into(),
            )
        })?;
    app.land(
        Source::Azure,
        ENDPOINT,
        inc,
        &[],
        RecordKind::Handshake("cloudevents-webhook-validation"),
        false,
    )
    .await
    .inspect_err(|_| handshake_metric(kind, subscription_label(inc), "failed"))?;
    handshake_metric(kind, subscription_label(inc), "validated");
    tracing::info!(origin = ?origin, "CloudEvents webhook validation answered");
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert("webhook-allowed-origin", origin);
    h.insert("webhook-allowed-rate", HeaderValue::from_static("*"));
    h.insert("allow", HeaderValue::from_static("POST, OPTIONS"));
    Ok(resp)
}

async fn process_post(app: &App, inc: &Incoming) -> Result<Response, IngressError> {
    let validation_header = inc
        .header("aeg-event-type")
        .is_some_and(|v| v.eq_ignore_ascii_case("SubscriptionValidation"));
    if let Err(e) = check_secret(app, inc) {
        if validation_header {
            handshake_metric(
                "eventgrid_subscription_validation",
                subscription_label(inc),
                "refused",
            );
        }
        return Err(e);
    }
    let body = inc.body()?;
    let Some(v) = parse_json_lenient(body)? else {
        if validation_header {
            return Err(IngressError::BadRequest(
                "SubscriptionValidation body is not readable JSON".into(),
            ));
        }
        // Well-formed but not representable (e.g. a lone surrogate): landed for the processor
        // to dead-letter, replayable after a fix.
        app.land(Source::Azure, ENDPOINT, inc, body, RecordKind::Event, false)
            .await?;
        return Ok(accepted(inc, StatusCode::OK));
    };
    let events: Vec<&serde_json::Value> = match &v {
        serde_json::Value::Array(a) => a.iter().collect(),
        serde_json::Value::Object(_) => vec![&v],
        _ => return Err(IngressError::BadRequest(
            "Event Grid body must be an array of events (Event Grid schema) or a CloudEvent object"
                .into(),
        )),
    };
    if events.is_empty() {
        return Err(IngressError::BadRequest(
            "Event Grid body is an empty array".into(),
        ));
    }
    if events.iter().any(|e| !e.is_object()) {
        return Err(IngressError::BadRequest(
            "every element of an Event Grid array must be an event object".into(),
        ));
    }
    let validation = events
        .iter()
        .find(|e| e.get("eventType").and_then(|t| t.as_str()) == Some(VALIDATION_EVENT));
    if validation_header || validation.is_some() {
        let metric_kind = "eventgrid_subscription_validation";
        let code = validation
            .and_then(|e| e.get("data"))
            .and_then(|d| d.get("validationCode"))
            .and_then(|c| c.as_str())
            .ok_or_else(|| {
                handshake_metric(metric_kind, subscription_label(inc), "refused");
                IngressError::BadRequest(
                    "SubscriptionValidation without data.validationCode".into(),
                )
            })?
            .to_string();
        // A delivery that also carries business events is landed as events: the processor
        // skips the validation element (counted as a handshake) and keeps the others.
        let business = events.iter().any(|e| {
            let t = e.get("eventType").and_then(|t| t.as_str());
            t != Some(VALIDATION_EVENT) && t != Some(DELETION_EVENT)
        });
        let kind = if business {
            RecordKind::Event
        } else {
            RecordKind::Handshake("eventgrid-subscription-validation")
        };
        app.land(Source::Azure, ENDPOINT, inc, body, kind, false)
            .await
            .inspect_err(|_| handshake_metric(metric_kind, subscription_label(inc), "failed"))?;
        handshake_metric(metric_kind, subscription_label(inc), "validated");
        tracing::info!(subscription = %subscription_label(inc), business_events = business, "Event Grid subscription validation answered");
        return Ok((
            StatusCode::OK,
            Json(serde_json::json!({ "validationResponse": code })),
        )
            .into_response());
    }
    app.land(Source::Azure, ENDPOINT, inc, body, RecordKind::Event, false)
        .await?;
    Ok(accepted(inc, StatusCode::OK))
}

// ---- normalization (processor side) ----------------------------------------------------------

use base64::Engine;

use crate::model::draft::{json, object_or_array, str_field, Draft};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};

const DELETION_EVENT: &str = "Microsoft.EventGrid.SubscriptionDeletedEvent";

fn cloudevent_draft(e: &serde_json::Value) -> Draft {
    let source = str_field(e, "source");
    let id = str_field(e, "id");
    let data = match (e.get("data"), str_field(e, "data_base64")) {
        (Some(d), _) => d.clone(),
        (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| serde_json::json!({ "data_base64": b64 })),
            Err(_) => serde_json::json!({ "data_base64": b64 }),
        },
        (None, None) => serde_json::json!({}),
    };
    let mut d = Draft {
        // CloudEvents ids are unique per source only.
        event_id: match (source, id) {
            (Some(s), Some(i)) => Some(format!("{s}#{i}")),
            _ => None,
        },
        raw_type: str_field(e, "type").map(str::to_string),
        occurred_at: str_field(e, "time").map(str::to_string),
        data,
        ..Default::default()
    };
    d.meta("provider_source", source);
    d.meta("provider_event_id", id);
    d.meta("subject", str_field(e, "subject"));
    d.meta("schema", Some("cloudevents"));
    d
}

fn eventgrid_draft(e: &serde_json::Value) -> Draft {
    let mut d = Draft {
        event_id: str_field(e, "id").map(str::to_string),
        raw_type: str_field(e, "eventType").map(str::to_string),
        occurred_at: str_field(e, "eventTime").map(str::to_string),
        data: e
            .get("data")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
        ..Default::default()
    };
    d.meta("azure_topic", str_field(e, "topic"));
    d.meta("subject", str_field(e, "subject"));
    d.meta("data_version", str_field(e, "dataVersion"));
    d.meta("schema", Some("eventgrid"));
    d
}

/// Normalizes an Event Grid delivery: Event Grid schema array, or CloudEvents object/array.
pub fn normalize(raw: &RawRecord) -> Normalized {
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let items = match object_or_array(&v, "Event Grid") {
        Ok(items) => items,
        Err(e) => return Normalized::Failed(e),
    };
    let subscription = raw.header("aeg-subscription-name");
    let mut out = vec![];
    let mut handshakes = 0;
    for (i, e) in items.iter().enumerate() {
        let i = i as u32;
        if !e.is_object() {
            out.push(Err(NormalizeError::new(
                DlqReason::UnrecognizedPayload,
                "array element is not an event object",
            )
            .at(i)));
            continue;
        }
        let eg_type = str_field(e, "eventType");
        if eg_type == Some(VALIDATION_EVENT) || eg_type == Some(DELETION_EVENT) {
            handshakes += 1;
            continue;
        }
        let mut d = if e.get("specversion").is_some() {
            cloudevent_draft(e)
        } else {
            eventgrid_draft(e)
        };
        d.meta("azure_subscription", subscription);
        out.push(d.finish(Source::Azure, raw, i));
    }
    if out.is_empty() && handshakes > 0 {
        return Normalized::Handshake;
    }
    if out.is_empty() {
        return Normalized::Failed(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            "Event Grid body holds no events",
        ));
    }
    Normalized::Events {
        events: out,
        handshakes,
    }
}
