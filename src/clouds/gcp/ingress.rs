//! The Pub/Sub push endpoint. Pub/Sub retries every non-ack, even a 400, until retention: the
//! ingress refuses only what can never succeed and leaves payload judgement to the processor.
//! Pushes are authenticated by the OIDC token Pub/Sub attaches (audience *and* the subscription's
//! service account, see `oidc`) or by a shared `?token=`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;

use super::config::PubSubConfig;
use super::oidc::{OidcVerifier, TokenError};
use crate::http::landing::RecordKind;
use crate::http::overload;
use crate::http::{accepted, secret_matches, Front, HasFront, Incoming, IngressError};
use crate::source::Source;

const ENDPOINT: &str = "pubsub";

/// What the Pub/Sub handler shares.
pub struct GcpState {
    pub front: Arc<Front>,
    pub cfg: PubSubConfig,
    pub oidc: Option<OidcVerifier>,
}

impl HasFront for GcpState {
    fn front(&self) -> &Front {
        &self.front
    }
}

/// The GCP routes: the push endpoint (behind the overload guard) and `/gcp/health`.
pub fn routes(
    front: &Arc<Front>,
    cfg: PubSubConfig,
    http: reqwest::Client,
) -> anyhow::Result<Router> {
    let oidc = match &cfg.oidc_audience {
        Some(aud) => Some(
            OidcVerifier::new(
                aud.clone(),
                cfg.oidc_email.clone(),
                cfg.jwks_url.clone(),
                cfg.jwks_file.clone(),
                http,
            )?
            .with_refresh_interval(cfg.jwks_refresh),
        ),
        None => None,
    };
    let st = Arc::new(GcpState {
        front: front.clone(),
        cfg,
        oidc,
    });
    let f = front.clone();
    Ok(Router::new()
        .route(
            "/api/v1/webhooks/gcp/pubsub",
            post(handle).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    overload::guard(
                        f.clone(),
                        Source::Gcp,
                        ENDPOINT,
                        overload::too_many_requests,
                        req,
                        next,
                    )
                },
            )),
        )
        .route("/api/v1/webhooks/gcp/health", get(health))
        .with_state(st))
}

/// Readiness plus which GCP checks are in force (no configured value is disclosed).
async fn health(State(st): State<Arc<GcpState>>) -> Response {
    st.front.readiness(serde_json::json!({
        "oidc_verification": st.oidc.is_some(),
        "oidc_service_account_check": st.cfg.oidc_email.is_some(),
        "query_token": st.cfg.token.is_some(),
        "authenticated": st.cfg.authenticated(),
    }))
}

/// `POST /api/v1/webhooks/gcp/pubsub`
async fn handle(State(st): State<Arc<GcpState>>, inc: Incoming) -> Response {
    let result = process(&st, &inc).await;
    st.front.finish(Source::Gcp, ENDPOINT, &inc, result)
}

async fn process(st: &GcpState, inc: &Incoming) -> Result<Response, IngressError> {
    authenticate(st, inc).await?;
    let body = inc.body()?;
    let unwrapped = inc.headers.contains_key("x-goog-pubsub-message-id")
        || inc.headers.contains_key("x-goog-pubsub-subscription-name");
    // A wrapped message's trace context travels as its `googclient_traceparent` attribute.
    let mut trace_hint = None;
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
                trace_hint = v
                    .pointer("/message/attributes/googclient_traceparent")
                    .and_then(|t| t.as_str())
                    .map(str::to_string);
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
    st.front
        .land_traced(
            Source::Gcp,
            ENDPOINT,
            inc,
            body,
            RecordKind::Event,
            unwrapped,
            trace_hint.as_deref(),
        )
        .await?;
    Ok(accepted(inc, StatusCode::OK))
}

async fn authenticate(st: &GcpState, inc: &Incoming) -> Result<(), IngressError> {
    if let Some(expected) = &st.cfg.token {
        let presented = inc.query_param("token").unwrap_or_default();
        if !secret_matches(presented.as_bytes(), expected.as_bytes()) {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "gcp", "reason" => "pubsub_token")
                .increment(1);
            return Err(IngressError::Unauthorized(
                "missing or wrong `token` query parameter (HELIOS_PUBSUB_TOKEN)".into(),
            ));
        }
    }
    if let Some(oidc) = &st.oidc {
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
