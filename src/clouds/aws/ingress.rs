//! AWS endpoints. EventBridge API destinations deliver the event JSON (or an input
//! transformer's output) with no signature: authenticity rests on the connection's API-key
//! header or Basic credentials. SNS HTTP(S) subscriptions deliver `SubscriptionConfirmation`,
//! `Notification` and `UnsubscribeConfirmation` envelopes (or raw message delivery), checked by
//! signature, topic allow-list and age (see `signature`), read as bytes whatever the
//! Content-Type (a JSON-only extractor would answer 415, which SNS treats as permanent).
//! The EventBridge endpoint takes SNS envelopes too, but only with the EventBridge credentials
//! or a topic allow-list.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine;

use super::config::{EventBridgeAuth, SnsConfig};
use super::signature::{SnsEnvelope, SnsMessageType, SnsVerifier};
use crate::http::landing::RecordKind;
use crate::http::overload::{self, Backpressure, Gate, Lane};
use crate::http::{accepted, secret_matches, Front, HasFront, Incoming, IngressError};
use crate::model::text::{echo, label};
use crate::source::Source;

const EVENTBRIDGE: &str = "eventbridge";
const SNS: &str = "sns";

/// What the AWS handlers share.
pub struct AwsState {
    pub front: Arc<Front>,
    pub eventbridge: EventBridgeAuth,
    pub sns: SnsConfig,
    pub verifier: SnsVerifier,
}

impl HasFront for AwsState {
    fn front(&self) -> &Front {
        &self.front
    }
}

/// The AWS routes: both delivery endpoints (behind the overload guard) and `/aws/health`.
pub fn routes(
    front: &Arc<Front>,
    eventbridge: EventBridgeAuth,
    sns: SnsConfig,
    http: reqwest::Client,
) -> anyhow::Result<Router> {
    let st = Arc::new(AwsState {
        front: front.clone(),
        verifier: SnsVerifier::new(&sns, http)?,
        eventbridge,
        sns,
    });
    let (s1, s2) = (st.clone(), st.clone());
    Ok(Router::new()
        .route(
            "/api/v1/webhooks/aws/eventbridge",
            post(handle_eventbridge).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let st = s1.clone();
                    async move {
                        // An SNS envelope at the EventBridge endpoint is SNS's: its lane, its
                        // status (503), its checks (in the body: the handler's).
                        let gate = if is_sns(
                            req.headers()
                                .get("x-amz-sns-message-type")
                                .and_then(|v| v.to_str().ok()),
                        ) {
                            Gate {
                                lane: Lane::Sns,
                                endpoint: EVENTBRIDGE,
                                backpressure: Backpressure::Unavailable,
                                unconfigured: sns_open_hint(&st.sns, &st.eventbridge),
                                credentials: Ok(()),
                            }
                        } else {
                            Gate {
                                lane: Lane::EventBridge,
                                endpoint: EVENTBRIDGE,
                                backpressure: Backpressure::TooManyRequests,
                                unconfigured: (!st.eventbridge.configured())
                                    .then_some(EVENTBRIDGE_OPEN_HINT),
                                credentials: check_auth(&st.eventbridge, req.headers()),
                            }
                        };
                        overload::guard(st.front.clone(), gate, req, next).await
                    }
                },
            )),
        )
        .route(
            "/api/v1/webhooks/aws/sns",
            post(handle_sns).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let st = s2.clone();
                    async move {
                        let gate = Gate {
                            lane: Lane::Sns,
                            endpoint: SNS,
                            backpressure: Backpressure::Unavailable,
                            unconfigured: sns_open_hint(&st.sns, &EventBridgeAuth::default()),
                            credentials: Ok(()),
                        };
                        overload::guard(st.front.clone(), gate, req, next).await
                    }
                },
            )),
        )
        .route("/api/v1/webhooks/aws/health", get(health))
        .with_state(st))
}

const EVENTBRIDGE_OPEN_HINT: &str =
    "set HELIOS_EVENTBRIDGE_API_KEY or HELIOS_EVENTBRIDGE_BASIC_USER/PASSWORD";

/// What SNS deliveries still need before anyone may send them: a topic allow-list with
/// signature verification (or, at the EventBridge endpoint, the EventBridge credentials).
fn sns_open_hint(sns: &SnsConfig, eventbridge: &EventBridgeAuth) -> Option<&'static str> {
    if !sns.verify_signatures {
        Some("SNS signature verification is off: set HELIOS_SNS_VERIFY_SIGNATURES=true and HELIOS_SNS_TOPIC_ARNS")
    } else if sns.topic_arns.is_empty() && !eventbridge.configured() {
        Some("set HELIOS_SNS_TOPIC_ARNS (the topics allowed to deliver)")
    } else {
        None
    }
}

/// Readiness plus which AWS checks are in force (no configured value is disclosed).
async fn health(State(st): State<Arc<AwsState>>) -> Response {
    st.front.readiness(serde_json::json!({
        "eventbridge_auth": st.eventbridge.configured(),
        "sns_signature_verification": st.sns.verify_signatures,
        "sns_topic_allow_list": !st.sns.topic_arns.is_empty(),
        "sns_auto_confirm": st.sns.auto_confirm,
    }))
}

/// `POST /api/v1/webhooks/aws/eventbridge`
async fn handle_eventbridge(State(st): State<Arc<AwsState>>, inc: Incoming) -> Response {
    let result = if is_sns(inc.header("x-amz-sns-message-type")) {
        sns_on_eventbridge(&st, &inc).await
    } else {
        async {
            // Credentials were checked at the door. Whatever an input transformer made of the event (EventBridge never retries a
            // 400): landed untouched, judged by the processor.
            let body = inc.body()?;
            st.front
                .land(
                    Source::Aws,
                    EVENTBRIDGE,
                    &inc,
                    body,
                    RecordKind::Event,
                    false,
                )
                .await?;
            Ok(accepted(&inc, StatusCode::OK))
        }
        .await
    };
    st.front.finish(Source::Aws, EVENTBRIDGE, &inc, result)
}

fn is_sns(message_type: Option<&str>) -> bool {
    message_type.is_some()
}

/// An SNS delivery at the EventBridge endpoint needs the EventBridge credentials or the SNS
/// topic allow-list: otherwise any AWS account's topic could subscribe here and inject events.
async fn sns_on_eventbridge(st: &AwsState, inc: &Incoming) -> Result<Response, IngressError> {
    let credentials =
        st.eventbridge.configured() && check_auth(&st.eventbridge, &inc.headers).is_ok();
    if !credentials && st.sns.topic_arns.is_empty() {
        metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_on_eventbridge")
            .increment(1);
        return Err(if st.eventbridge.configured() {
            IngressError::Unauthorized("SNS deliveries on the EventBridge endpoint need the EventBridge connection credentials (or HELIOS_SNS_TOPIC_ARNS)".into())
        } else {
            IngressError::Forbidden("SNS deliveries on the EventBridge endpoint need HELIOS_SNS_TOPIC_ARNS (or EventBridge credentials); or subscribe /api/v1/webhooks/aws/sns".into())
        });
    }
    process_sns(st, inc, EVENTBRIDGE).await
}

/// Accepts the request when no secret is configured, or when the API key header or the Basic
/// credentials match (compared in constant time).
pub fn check_auth(
    auth: &EventBridgeAuth,
    headers: &axum::http::HeaderMap,
) -> Result<(), IngressError> {
    if auth.api_key.is_none() && auth.basic.is_none() {
        return Ok(());
    }
    if let Some(expected) = &auth.api_key {
        if let Some(presented) = headers.get(auth.api_key_header.as_str()) {
            if secret_matches(presented.as_bytes(), expected.as_bytes()) {
                return Ok(());
            }
        }
    }
    if let Some((user, pass)) = &auth.basic {
        if let Some((u, p)) =
            basic_credentials(headers.get("authorization").and_then(|v| v.to_str().ok()))
        {
            // Evaluate both comparisons so timing does not reveal which one failed.
            let user_ok = secret_matches(u.as_bytes(), user.as_bytes());
            let pass_ok = secret_matches(p.as_bytes(), pass.as_bytes());
            if user_ok & pass_ok {
                return Ok(());
            }
        }
    }
    metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "eventbridge_credentials")
        .increment(1);
    Err(IngressError::Unauthorized(
        "missing or wrong EventBridge connection credentials (API key header or Basic)".into(),
    ))
}

fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let v = header?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

/// `POST /api/v1/webhooks/aws/sns`
async fn handle_sns(State(st): State<Arc<AwsState>>, inc: Incoming) -> Response {
    let result = process_sns(&st, &inc, SNS).await;
    st.front.finish(Source::Aws, SNS, &inc, result)
}

fn check_topic(cfg: &SnsConfig, topic: Option<&str>) -> Result<(), IngressError> {
    if cfg.topic_arns.is_empty() {
        return Ok(());
    }
    match topic {
        Some(t) if cfg.topic_arns.iter().any(|a| a == t) => Ok(()),
        other => {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_topic_not_allowed")
                .increment(1);
            Err(IngressError::Forbidden(format!(
                "SNS topic {} is not in HELIOS_SNS_TOPIC_ARNS",
                echo(other.unwrap_or("(none)"))
            )))
        }
    }
}

/// Counts a handshake; the topic becomes a label only when it is on the allow-list, and then by
/// its name alone (the whole ARN on `/metrics` would hand a stranger the allow-listed topic a
/// forged envelope needs).
fn handshake_metric(cfg: &SnsConfig, kind: &'static str, topic: &str, outcome: &'static str) {
    let l = label(Some(topic), &cfg.topic_arns);
    let name = l.rsplit(':').next().unwrap_or("other").to_string();
    metrics::counter!("helios_ingress_handshakes_total",
        "source" => "aws", "kind" => kind, "subscription" => name, "outcome" => outcome)
    .increment(1);
}

/// Handles an SNS delivery arriving at `endpoint` (the SNS one, or the EventBridge one).
async fn process_sns(
    st: &AwsState,
    inc: &Incoming,
    endpoint: &'static str,
) -> Result<Response, IngressError> {
    let body = inc.body()?;
    let cfg = &st.sns;
    if inc
        .header("x-amz-sns-rawdelivery")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        check_topic(cfg, inc.header("x-amz-sns-topic-arn"))?;
        match &cfg.raw_delivery_token {
            Some(expected) => {
                let presented = inc.query_param("token").unwrap_or_default();
                if !secret_matches(presented.as_bytes(), expected.as_bytes()) {
                    metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_raw_token")
                        .increment(1);
                    return Err(IngressError::Unauthorized(
                        "SNS raw delivery needs the `token` query parameter (HELIOS_SNS_RAW_DELIVERY_TOKEN)".into(),
                    ));
                }
            }
            None if cfg.verify_signatures => {
                return Err(IngressError::Forbidden(
                    "SNS raw message delivery carries no signature: set HELIOS_SNS_RAW_DELIVERY_TOKEN and add ?token=<it> to the subscription endpoint".into(),
                ))
            }
            None => {}
        }
        st.front
            .land(Source::Aws, endpoint, inc, body, RecordKind::Event, false)
            .await?;
        return Ok(accepted(inc, StatusCode::OK));
    }

    let env: SnsEnvelope = serde_json::from_slice(body)
        .map_err(|e| IngressError::BadRequest(format!("body is not an SNS message: {e}")))?;
    let kind = SnsMessageType::parse(&env.kind).ok_or_else(|| {
        IngressError::BadRequest(format!(
            "SNS message Type `{}` is not Notification, SubscriptionConfirmation or UnsubscribeConfirmation",
            env.kind
        ))
    })?;
    if let Some(h) = inc.header("x-amz-sns-message-type") {
        if h != env.kind {
            return Err(IngressError::BadRequest(format!(
                "x-amz-sns-message-type `{}` does not match the body's Type `{}`",
                echo(h),
                echo(&env.kind)
            )));
        }
    }
    let handshake_kind = match kind {
        SnsMessageType::SubscriptionConfirmation => Some("sns-subscription-confirmation"),
        SnsMessageType::UnsubscribeConfirmation => Some("sns-unsubscribe-confirmation"),
        SnsMessageType::Notification => None,
    };
    let metric_kind = match kind {
        SnsMessageType::SubscriptionConfirmation => "sns_subscription_confirmation",
        _ => "sns_unsubscribe_confirmation",
    };
    if let Err(e) = check_topic(cfg, Some(&env.topic_arn)) {
        if handshake_kind.is_some() {
            handshake_metric(cfg, metric_kind, &env.topic_arn, "refused");
        }
        return Err(e);
    }
    if cfg.verify_signatures {
        let verified = match st.verifier.verify(&env).await {
            Ok(()) => SnsVerifier::check_age(&env, cfg.max_age),
            Err(e) => Err(e),
        };
        if let Err(e) = verified {
            if handshake_kind.is_some() {
                handshake_metric(cfg, metric_kind, &env.topic_arn, "refused");
            }
            return Err(e);
        }
    }
    if kind == SnsMessageType::SubscriptionConfirmation && cfg.auto_confirm {
        // Refuse a SubscribeURL off the SNS hosts before anything is landed or fetched.
        let url = env.subscribe_url.as_deref().unwrap_or_default();
        if let Err(e) = st.verifier.checked_sns_url(url, "SubscribeURL") {
            handshake_metric(cfg, metric_kind, &env.topic_arn, "refused");
            return Err(e);
        }
    }
    match handshake_kind {
        None => {
            st.front
                .land(Source::Aws, endpoint, inc, body, RecordKind::Event, false)
                .await?;
            Ok(accepted(inc, StatusCode::OK))
        }
        Some(which) => {
            st.front
                .land(
                    Source::Aws,
                    endpoint,
                    inc,
                    body,
                    RecordKind::Handshake(which),
                    false,
                )
                .await?;
            if kind == SnsMessageType::SubscriptionConfirmation && cfg.auto_confirm {
                if let Err(e) = st.verifier.confirm(&env).await {
                    handshake_metric(cfg, metric_kind, &env.topic_arn, "failed");
                    return Err(e);
                }
                handshake_metric(cfg, metric_kind, &env.topic_arn, "confirmed");
                tracing::info!(topic_arn = %echo(&env.topic_arn), "SNS subscription confirmed");
                return Ok((
                    StatusCode::OK,
                    Json(serde_json::json!({"status": "confirmed", "topic_arn": echo(&env.topic_arn), "request_id": inc.request_id})),
                )
                    .into_response());
            }
            handshake_metric(cfg, metric_kind, &env.topic_arn, "recorded");
            Ok((
                StatusCode::OK,
                Json(serde_json::json!({"status": "recorded", "type": env.kind, "topic_arn": echo(&env.topic_arn), "request_id": inc.request_id})),
            )
                .into_response())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_parsing() {
        let h = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:p:ss")
        );
        assert_eq!(
            basic_credentials(Some(&h)),
            Some(("user".into(), "p:ss".into()))
        );
        assert_eq!(basic_credentials(Some("Bearer abc")), None);
        assert_eq!(basic_credentials(Some("Basic !!!")), None);
        assert_eq!(basic_credentials(None), None);
    }
}
