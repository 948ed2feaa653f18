//! The Event Grid endpoint. Event Grid schema bodies are always arrays; CloudEvents-schema bodies
//! are one object (an array when output batching is on). Two handshakes:
//! - `Microsoft.EventGrid.SubscriptionValidationEvent` (Event Grid schema), told by
//!   `aeg-event-type: SubscriptionValidation` alone: answer **200** (202 is not accepted) with
//!   `{"validationResponse": "<validationCode>"}`; a delivery that also carries business events
//!   is landed as events (the validation element counts as a handshake). A validation-looking
//!   element under `aeg-event-type: Notification` is just an element: landed with the rest;
//! - CloudEvents abuse protection: `OPTIONS` with `WebHook-Request-Origin`, answered by echoing
//!   it in `WebHook-Allowed-Origin` (never hard-coded: sovereign clouds use other hosts) and the
//!   configured rate limit in `WebHook-Allowed-Rate`.
//!
//! Both handshakes are also landed raw for the audit trail.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use super::config::EventGridConfig;
use super::normalize::{DELETION_EVENT, VALIDATION_EVENT};
use crate::http::landing::RecordKind;
use crate::http::overload::{self, Backpressure, Gate, Lane};
use crate::http::shape::Shape;
use crate::http::{accepted, secret_matches, Front, HasFront, Incoming, IngressError};
use crate::model::text::{echo, label};
use crate::source::Source;

/// What the Event Grid handlers share.
pub struct AzureState {
    pub front: Arc<Front>,
    pub cfg: EventGridConfig,
}

impl HasFront for AzureState {
    fn front(&self) -> &Front {
        &self.front
    }
}

/// The Azure routes: the delivery endpoint (POST and OPTIONS, behind the overload guard) and
/// `/azure/health`.
pub fn routes(front: &Arc<Front>, cfg: EventGridConfig) -> Router {
    let st = Arc::new(AzureState {
        front: front.clone(),
        cfg,
    });
    let s2 = st.clone();
    Router::new()
        .route(
            "/api/v1/webhooks/azure/eventgrid",
            post(handle_post)
                .options(handle_options)
                .route_layer(axum::middleware::from_fn(
                    move |req: Request, next: Next| {
                        let st = s2.clone();
                        async move {
                            let credentials = check_secret(&st, req.headers(), req.uri().query());
                            if credentials.is_err() {
                                let kind = if req.method() == axum::http::Method::OPTIONS {
                                    "cloudevents_webhook_validation"
                                } else {
                                    "eventgrid_subscription_validation"
                                };
                                let validation = req.method() == axum::http::Method::OPTIONS
                                    || req.headers().get("aeg-event-type").is_some_and(|v| {
                                        v.as_bytes().eq_ignore_ascii_case(b"SubscriptionValidation")
                                    });
                                if validation {
                                    let sub = label(
                                        req.headers()
                                            .get("aeg-subscription-name")
                                            .and_then(|v| v.to_str().ok()),
                                        &st.cfg.subscriptions,
                                    );
                                    handshake_metric(kind, sub, "refused");
                                }
                            }
                            let gate = Gate {
                                lane: Lane::EventGrid,
                                endpoint: ENDPOINT,
                                backpressure: Backpressure::TooManyRequests,
                                unconfigured: st.cfg.secret.is_none().then_some(OPEN_HINT),
                                credentials,
                            };
                            overload::guard(st.front.clone(), gate, req, next).await
                        }
                    },
                )),
        )
        .route("/api/v1/webhooks/azure/health", get(health))
        .with_state(st)
}

/// Readiness plus which Azure checks are in force (no configured value is disclosed).
async fn health(State(st): State<Arc<AzureState>>) -> Response {
    st.front
        .readiness(serde_json::json!({"shared_secret": st.cfg.secret.is_some()}))
}

const ENDPOINT: &str = "eventgrid";

/// `POST /api/v1/webhooks/azure/eventgrid`
async fn handle_post(State(st): State<Arc<AzureState>>, inc: Incoming) -> Response {
    let result = process_post(&st, &inc).await;
    st.front.finish(Source::Azure, ENDPOINT, &inc, result)
}

/// `OPTIONS /api/v1/webhooks/azure/eventgrid` (CloudEvents webhook validation)
async fn handle_options(State(st): State<Arc<AzureState>>, inc: Incoming) -> Response {
    let result = process_options(&st, &inc).await;
    st.front.finish(Source::Azure, ENDPOINT, &inc, result)
}

/// The subscription as a metric label: its name when configured (HELIOS_EVENTGRID_SUBSCRIPTIONS),
/// else `other`.
fn subscription_label(st: &AzureState, inc: &Incoming) -> String {
    label(inc.header("aeg-subscription-name"), &st.cfg.subscriptions)
}

fn handshake_metric(kind: &'static str, subscription: String, outcome: &'static str) {
    metrics::counter!("helios_ingress_handshakes_total",
        "source" => "azure", "kind" => kind, "subscription" => subscription, "outcome" => outcome)
    .increment(1);
}

const OPEN_HINT: &str = "set HELIOS_EVENTGRID_SECRET";

/// The shared secret (query parameter or header), checked at the door.
fn check_secret(
    st: &AzureState,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Result<(), IngressError> {
    let cfg = &st.cfg;
    let Some(expected) = &cfg.secret else {
        return Ok(());
    };
    let from_query = crate::http::query_param(query, &cfg.secret_param);
    let from_header = headers
        .get(cfg.secret_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
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

async fn process_options(st: &AzureState, inc: &Incoming) -> Result<Response, IngressError> {
    let kind = "cloudevents_webhook_validation";
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
    st.front
        .land(
            Source::Azure,
            ENDPOINT,
            inc,
            &[],
            RecordKind::Handshake("cloudevents-webhook-validation"),
            false,
        )
        .await
        .inspect_err(|_| handshake_metric(kind, subscription_label(st, inc), "failed"))?;
    handshake_metric(kind, subscription_label(st, inc), "validated");
    tracing::info!(origin = %echo(origin.to_str().unwrap_or("(not text)")), "CloudEvents webhook validation answered");
    let mut resp = StatusCode::OK.into_response();
    let h = resp.headers_mut();
    h.insert("webhook-allowed-origin", origin);
    // The configured rate limit, per minute, so a sender that honours it stays under it.
    let rate = match st.front.overload.rate(Lane::EventGrid) {
        Some(l) => HeaderValue::from(u64::from(l.per_second) * 60),
        None => HeaderValue::from_static("*"),
    };
    h.insert("webhook-allowed-rate", rate);
    h.insert("allow", HeaderValue::from_static("POST, OPTIONS"));
    Ok(resp)
}

async fn process_post(st: &AzureState, inc: &Incoming) -> Result<Response, IngressError> {
    let validation_header = inc
        .header("aeg-event-type")
        .is_some_and(|v| v.eq_ignore_ascii_case("SubscriptionValidation"));
    let body = inc.body()?;
    // The body's shape, read without building it (a body's memory is its bytes).
    match crate::http::shape::shape(body) {
        Err(e) => {
            return Err(IngressError::BadRequest(format!(
                "body is not valid JSON: {e}"
            )))
        }
        Ok(Shape::Scalar) => return Err(IngressError::BadRequest(
            "Event Grid body must be an array of events (Event Grid schema) or a CloudEvent object"
                .into(),
        )),
        Ok(Shape::Array { len: 0, .. }) => {
            return Err(IngressError::BadRequest(
                "Event Grid body is an empty array".into(),
            ))
        }
        Ok(Shape::Array {
            first_non_object: Some(_),
            ..
        }) => {
            return Err(IngressError::BadRequest(
                "every element of an Event Grid array must be an event object".into(),
            ))
        }
        Ok(_) => {}
    }
    // The handshake is what `aeg-event-type` says it is. A validation-looking element in a
    // Notification is landed like any other (the processor counts it as a handshake and keeps
    // the rest): answering 400 for it would lose the whole delivery (Event Grid never retries
    // a 400).
    if validation_header {
        let metric_kind = "eventgrid_subscription_validation";
        let refused = |msg: &str| {
            handshake_metric(metric_kind, subscription_label(st, inc), "refused");
            IngressError::BadRequest(msg.to_string())
        };
        // A validation delivery is one small event: read it whole only then, and bounded.
        if body.len() > 64 * 1024 {
            return Err(refused("SubscriptionValidation body over 64 KiB"));
        }
        let v: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| refused("SubscriptionValidation body is not readable JSON"))?;
        let events: Vec<&serde_json::Value> = match &v {
            serde_json::Value::Array(a) => a.iter().collect(),
            other => vec![other],
        };
        let code = events
            .iter()
            .find(|e| e.get("eventType").and_then(|t| t.as_str()) == Some(VALIDATION_EVENT))
            .and_then(|e| e.get("data"))
            .and_then(|d| d.get("validationCode"))
            .and_then(|c| c.as_str())
            .ok_or_else(|| refused("SubscriptionValidation without data.validationCode"))?
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
        st.front
            .land(Source::Azure, ENDPOINT, inc, body, kind, false)
            .await
            .inspect_err(|_| {
                handshake_metric(metric_kind, subscription_label(st, inc), "failed")
            })?;
        handshake_metric(metric_kind, subscription_label(st, inc), "validated");
        tracing::info!(subscription = %subscription_label(st, inc), business_events = business, "Event Grid subscription validation answered");
        return Ok((
            StatusCode::OK,
            Json(serde_json::json!({ "validationResponse": code })),
        )
            .into_response());
    }
    st.front
        .land(Source::Azure, ENDPOINT, inc, body, RecordKind::Event, false)
        .await?;
    Ok(accepted(inc, StatusCode::OK))
}
