//! Pub/Sub push: the wrapped JSON (`message.data` base64, attributes, `messageId`/`message_id`,
//! `publishTime`/`publish_time`, top-level `deliveryAttempt` and `subscription`), or the unwrapped
//! body (the published bytes as-is; metadata as `x-goog-pubsub-*` headers and each attribute as a
//! header of its own, which is why unwrapped deliveries keep their non-standard headers).
//!
//! Pub/Sub retries every non-ack, even a 400, until retention: the ingress refuses only what can
//! never succeed and leaves payload judgement to the processor.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;

use super::oidc::TokenError;
use crate::ingress::landing::RecordKind;
use crate::ingress::{accepted, secret_matches, App, Incoming, IngressError};
use crate::source::Source;

const ENDPOINT: &str = "pubsub";

/// `POST /api/v1/webhooks/gcp/pubsub`
pub async fn handle(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    let result = process(&app, &inc).await;
    app.finish(Source::Gcp, ENDPOINT, &inc, result)
}

async fn process(app: &App, inc: &Incoming) -> Result<Response, IngressError> {
    authenticate(app, inc).await?;
    let body = inc.body()?;
    let unwrapped = inc.headers.contains_key("x-goog-pubsub-message-id")
        || inc.headers.contains_key("x-goog-pubsub-subscription-name");
    if !unwrapped {
        let is_json_type = inc
            .header("content-type")
            .map(|c| c.to_ascii_lowercase().contains("json"))
            .unwrap_or(true);
        match serde_json::from_slice::<serde_json::Value>(body) {
            Ok(v) => {
                if let Some(obj) = v.as_object() {
                    if obj.contains_key("message") && !obj["message"].is_object() {
                        return Err(IngressError::BadRequest(
                            "Pub/Sub push body has a `message` that is not an object".into(),
                        ));
                    }
                }
            }
            // An unwrapped push without write-metadata carries arbitrary bytes and no headers to
            // tell it apart; only a body that claims to be JSON and is not is refused.
            Err(e) if is_json_type => {
                return Err(IngressError::BadRequest(format!(
                    "body is not valid JSON: {e} (unwrapped pushes need --push-no-wrapper-write-metadata)"
                )))
            }
            Err(_) => {}
        }
    }
    app.land(
        Source::Gcp,
        ENDPOINT,
        inc,
        body,
        RecordKind::Event,
        unwrapped,
    )
    .await?;
    Ok(accepted(inc, StatusCode::OK))
}

async fn authenticate(app: &App, inc: &Incoming) -> Result<(), IngressError> {
    if let Some(expected) = &app.cfg.pubsub.token {
        let presented = inc.query_param("token").unwrap_or_default();
        if !secret_matches(presented.as_bytes(), expected.as_bytes()) {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "gcp", "reason" => "pubsub_token")
                .increment(1);
            return Err(IngressError::Unauthorized(
                "missing or wrong `token` query parameter (HELIOS_PUBSUB_TOKEN)".into(),
            ));
        }
    }
    if let Some(oidc) = &app.oidc {
        match oidc.verify_header(inc.header("authorization")).await {
            Ok(_) => {}
            Err(TokenError::Invalid(m)) => {
                metrics::counter!("helios_ingress_auth_failures_total", "source" => "gcp", "reason" => "pubsub_oidc")
                    .increment(1);
                return Err(IngressError::Unauthorized(m));
            }
            Err(TokenError::KeysUnavailable(m)) => {
                return Err(IngressError::Unavailable(format!(
                    "cannot verify the OIDC token now: {m}"
                )))
            }
        }
    }
    Ok(())
}
