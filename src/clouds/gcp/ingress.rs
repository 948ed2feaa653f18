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
use crate::http::overload::{self, Backpressure, Gate, Lane};
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
    let s2 = st.clone();
    Ok(Router::new()
        .route(
            "/api/v1/webhooks/gcp/pubsub",
            post(handle).route_layer(axum::middleware::from_fn(
                move |req: Request, next: Next| {
                    let st = s2.clone();
                    async move {
                        let hint = st.cfg.open_endpoints().into_iter().next();
                        let credentials = authenticate(&st, req.headers(), req.uri().query()).await;
                        let gate = Gate {
                            lane: Lane::PubSub,
                            endpoint: ENDPOINT,
                            backpressure: Backpressure::TooManyRequests,
                            unconfigured: hint.as_deref(),
                            credentials,
                        };
                        overload::guard(st.front.clone(), gate, req, next).await
                    }
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
        match wrapped_probe(body) {
            Ok(Probe::Wrapped { trace }) => trace_hint = trace,
            Ok(Probe::MessageNotObject) => {
                return Err(IngressError::BadRequest(
                    "Pub/Sub push body has a `message` that is not an object".into(),
                ))
            }
            Ok(Probe::Other) => {}
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

/// What the door needs of a wrapped push, read without building the body.
enum Probe {
    /// `{"message": {...}}`, with the message's `googclient_traceparent` attribute if any.
    Wrapped { trace: Option<String> },
    /// A `message` that is not an object.
    MessageNotObject,
    /// Other JSON (landed: the processor decides).
    Other,
}

fn wrapped_probe(body: &[u8]) -> Result<Probe, serde_json::Error> {
    use serde_json::value::RawValue;
    use std::collections::BTreeMap;
    crate::http::shape::shape(body)?;
    let Ok(top) = serde_json::from_slice::<BTreeMap<std::borrow::Cow<'_, str>, &RawValue>>(body)
    else {
        return Ok(Probe::Other);
    };
    let Some(message) = top.get("message") else {
        return Ok(Probe::Other);
    };
    let Ok(m) =
        serde_json::from_str::<BTreeMap<std::borrow::Cow<'_, str>, &RawValue>>(message.get())
    else {
        return Ok(Probe::MessageNotObject);
    };
    let trace = m
        .get("attributes")
        .and_then(|a| {
            serde_json::from_str::<BTreeMap<std::borrow::Cow<'_, str>, &RawValue>>(a.get()).ok()
        })
        .and_then(|a| {
            a.get("googclient_traceparent")
                .and_then(|t| serde_json::from_str::<String>(t.get()).ok())
        });
    Ok(Probe::Wrapped { trace })
}

/// The push's token (query) or OIDC bearer token (header), checked at the door.
async fn authenticate(
    st: &GcpState,
    headers: &axum::http::HeaderMap,
    query: Option<&str>,
) -> Result<(), IngressError> {
    if let Some(expected) = &st.cfg.token {
        let presented = crate::http::query_param(query, "token").unwrap_or_default();
        if !secret_matches(presented.as_bytes(), expected.as_bytes()) {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "gcp", "reason" => "pubsub_token")
                .increment(1);
            return Err(IngressError::Unauthorized(
                "missing or wrong `token` query parameter (HELIOS_PUBSUB_TOKEN)".into(),
            ));
        }
    }
    if let Some(oidc) = &st.oidc {
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
        match oidc.verify_header(authorization).await {
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
