//! `helios ingress`: the thin HTTP front door. It authenticates, answers the cloud handshakes,
//! and lands every request body untouched in Kafka; it never judges a payload's business content
//! (that is the processor's job, so a fix can be replayed over history).
//!
//! Each cloud's handlers live with the rest of that cloud's knowledge in `crate::clouds`; this
//! module holds what they share: the state, the request extractor, the response bookkeeping,
//! health, metrics and docs routes, and the server's start and graceful stop.

pub mod docs;
pub mod error;
pub mod landing;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::clouds;
use crate::config::IngressConfig;
use crate::kafka::{KafkaHealth, RawProducer};
use crate::shutdown::Shutdown;
use crate::source::Source;
pub use error::IngressError;
use landing::{Delivery, Landing, RecordKind};

/// Everything a request handler needs, shared by all requests.
pub struct App {
    pub cfg: IngressConfig,
    pub landing: Landing,
    pub kafka_health: KafkaHealth,
    pub sns: clouds::aws::sns::SnsVerifier,
    pub oidc: Option<clouds::gcp::oidc::OidcVerifier>,
    pub metrics: PrometheusHandle,
}

impl App {
    /// Builds the state: the producer, the health probe, the per-cloud verifiers.
    pub fn new(cfg: IngressConfig) -> anyhow::Result<Arc<App>> {
        let metrics = crate::metrics::install();
        let limits = crate::limits::SizeLimits {
            max_body_bytes: cfg.max_body_bytes,
        };
        let producer = RawProducer::new(&cfg.kafka, cfg.produce_timeout, &limits)?;
        let kafka_health = KafkaHealth::start(producer.producer().clone(), Duration::from_secs(2));
        let mut secret_headers = vec![
            cfg.eventbridge.api_key_header.clone(),
            cfg.eventgrid.secret_header.clone(),
            cfg.ingest.header.clone(),
        ];
        secret_headers.retain(|h| !h.is_empty());
        let landing = Landing::new(producer, &cfg.topology, secret_headers);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let sns = clouds::aws::sns::SnsVerifier::new(&cfg.sns, http.clone())?;
        let oidc = match &cfg.pubsub.oidc_audience {
            Some(aud) => Some(clouds::gcp::oidc::OidcVerifier::new(
                aud.clone(),
                cfg.pubsub.oidc_email.clone(),
                cfg.pubsub.jwks_url.clone(),
                cfg.pubsub.jwks_file.clone(),
                http,
            )?),
            None => None,
        };
        Ok(Arc::new(App {
            cfg,
            landing,
            kafka_health,
            sns,
            oidc,
            metrics,
        }))
    }

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
        let d = Delivery {
            source,
            endpoint,
            request_id: &inc.request_id,
            received_at: inc.received_at,
            headers: &inc.headers,
            body,
        };
        self.landing.land(&d, kind, attribute_headers).await
    }

    /// Turns a handler's outcome into the response, recording metrics and the request id.
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
                let status = e.status();
                if status.is_server_error() {
                    tracing::warn!(request_id = %inc.request_id, source = %source, endpoint, status = status.as_u16(), error = %e, "request not accepted");
                } else {
                    tracing::info!(request_id = %inc.request_id, source = %source, endpoint, status = status.as_u16(), error = %e, "request refused");
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
/// not be read: too large, broken connection).
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
            Err(IngressError::TooLarge { limit }) => Err(IngressError::TooLarge { limit: *limit }),
            Err(e) => Err(IngressError::BadRequest(e.to_string())),
        }
    }

    /// A header as text, if present and valid UTF-8.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A query-string parameter (percent-decoded).
    pub fn query_param(&self, name: &str) -> Option<String> {
        let q = self.query.as_deref()?;
        reqwest::Url::parse(&format!("http://x/?{q}"))
            .ok()?
            .query_pairs()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.into_owned())
    }
}

impl FromRequest<Arc<App>> for Incoming {
    type Rejection = std::convert::Infallible;

    async fn from_request(req: Request, state: &Arc<App>) -> Result<Self, Self::Rejection> {
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
            .unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let limit = state.cfg.max_body_bytes;
        let body = match Bytes::from_request(req, state).await {
            Ok(b) => Ok(b),
            Err(rej) if rej.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(IngressError::TooLarge { limit })
            }
            Err(rej) => Err(IngressError::BadRequest(format!(
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
    (
        status,
        Json(serde_json::json!({"status": "accepted", "request_id": inc.request_id})),
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

/// The full router: every endpoint of the contract.
pub fn router(app: Arc<App>) -> Router {
    let limit = app.cfg.max_body_bytes;
    Router::new()
        .route(
            "/api/v1/webhooks/aws/eventbridge",
            post(clouds::aws::eventbridge::handle),
        )
        .route("/api/v1/webhooks/aws/sns", post(clouds::aws::sns::handle))
        .route(
            "/api/v1/webhooks/gcp/pubsub",
            post(clouds::gcp::pubsub::handle),
        )
        .route(
            "/api/v1/webhooks/azure/eventgrid",
            post(clouds::azure::eventgrid::handle_post)
                .options(clouds::azure::eventgrid::handle_options),
        )
        .route("/api/v1/events/ingest", post(clouds::direct::handle))
        .route("/api/v1/health", get(health))
        .route("/api/v1/health/live", get(live))
        .route("/api/v1/webhooks/aws/health", get(cloud_health_aws))
        .route("/api/v1/webhooks/gcp/health", get(cloud_health_gcp))
        .route("/api/v1/webhooks/azure/health", get(cloud_health_azure))
        .route("/metrics", get(metrics_route))
        .route("/openapi.json", get(docs::openapi))
        .route("/docs", get(docs::page))
        .layer(DefaultBodyLimit::max(limit))
        .with_state(app)
}

async fn live() -> Response {
    Json(serde_json::json!({"status": "alive", "version": env!("CARGO_PKG_VERSION")}))
        .into_response()
}

fn readiness(app: &App, extra: serde_json::Value) -> Response {
    let ready = app.kafka_health.is_reachable();
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "version": env!("CARGO_PKG_VERSION"),
        "kafka": app.kafka_health.detail(),
        "checks": extra,
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

async fn health(State(app): State<Arc<App>>) -> Response {
    readiness(
        &app,
        serde_json::json!({"open_endpoints": app.cfg.open_endpoints()}),
    )
}

async fn cloud_health_aws(State(app): State<Arc<App>>) -> Response {
    let c = &app.cfg;
    readiness(
        &app,
        serde_json::json!({
            "eventbridge_auth": if c.eventbridge.api_key.is_some() || c.eventbridge.basic.is_some() { "configured" } else { "open" },
            "sns_signature_verification": c.sns.verify_signatures,
            "sns_topic_allow_list": c.sns.topic_arns.len(),
            "sns_auto_confirm": c.sns.auto_confirm,
        }),
    )
}

async fn cloud_health_gcp(State(app): State<Arc<App>>) -> Response {
    let c = &app.cfg;
    readiness(
        &app,
        serde_json::json!({
            "oidc_verification": app.oidc.is_some(),
            "oidc_audience": c.pubsub.oidc_audience,
            "query_token": c.pubsub.token.is_some(),
        }),
    )
}

async fn cloud_health_azure(State(app): State<Arc<App>>) -> Response {
    readiness(
        &app,
        serde_json::json!({"shared_secret": app.cfg.eventgrid.secret.is_some()}),
    )
}

async fn metrics_route(State(app): State<Arc<App>>) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        app.metrics.render(),
    )
        .into_response()
}

/// A started ingress: its address, and a handle to wait for its graceful end.
pub struct RunningIngress {
    pub addr: SocketAddr,
    pub app: Arc<App>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningIngress {
    /// Waits until the server stopped (after shutdown) and the producer flushed.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await?
    }
}

/// Binds, starts serving, and returns at once. On shutdown the server stops accepting,
/// drains in-flight requests, then flushes the producer.
pub async fn start(cfg: IngressConfig, shutdown: Shutdown) -> anyhow::Result<RunningIngress> {
    let bind = format!("{}:{}", cfg.host, cfg.port);
    for warning in cfg.open_endpoints() {
        tracing::warn!(%warning, "endpoint accepts unauthenticated requests");
    }
    let app = App::new(cfg)?;
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the ingress to {bind}: {e}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "ingress listening");
    let router = router(app.clone());
    let landing = app.landing.clone();
    let task = tokio::spawn(async move {
        axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.wait())
            .await?;
        tracing::info!("ingress drained; flushing the producer");
        tokio::task::spawn_blocking(move || landing.flush(Duration::from_secs(10))).await?;
        Ok(())
    });
    Ok(RunningIngress { addr, app, task })
}
