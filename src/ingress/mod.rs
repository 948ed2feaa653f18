//! `helios ingress`: the thin HTTP front door, assembled. It authenticates, answers the cloud
//! handshakes, and lands every request body untouched in Kafka; it never judges a payload's
//! business content (that is the processor's job, so a fix can be replayed over history).
//!
//! Each cloud's endpoints live with the rest of that cloud's knowledge in `crate::clouds`, built
//! from the HTTP kit in `crate::http`; this module wires them together with the shared routes
//! (health, metrics, docs), and starts and stops the server.

pub mod config;
pub mod docs;
mod serve;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};

use crate::clouds::{aws, azure, direct, gcp};
use crate::http::landing::Landing;
use crate::http::{Front, Overload};
use crate::kafka::{KafkaHealth, RawProducer};
use crate::limits::SizeLimits;
use crate::shutdown::Shutdown;
pub use config::{IngressArgs, IngressConfig};

/// The state every endpoint shares: the producer, the broker health probe, the overload guard.
pub fn front(cfg: &IngressConfig, shutdown: &Shutdown) -> anyhow::Result<Arc<Front>> {
    let limits = SizeLimits {
        max_body_bytes: cfg.max_body_bytes,
    };
    cfg.check_pinned()?;
    let producer = RawProducer::new(&cfg.kafka, cfg.produce_timeout, &limits)?;
    let kafka_health = KafkaHealth::start(
        producer.producer().clone(),
        Duration::from_secs(2),
        shutdown.clone(),
    );
    Ok(Arc::new(Front {
        landing: Landing::new(producer, &cfg.topology, cfg.secret_headers())
            .with_health(kafka_health.clone()),
        kafka_health,
        overload: Overload::new(
            &cfg.topology.source_rate_limits(),
            crate::http::overload::DoorLimits {
                max_in_flight: cfg.max_in_flight,
                max_body_memory: cfg.max_body_memory,
                max_body_bytes: cfg.max_body_bytes,
                protected: cfg.protected_mode,
            },
        ),
        max_body_bytes: cfg.max_body_bytes,
        body_timeout: cfg.body_timeout,
    }))
}

/// The full router: every cloud's routes and the shared ones.
pub fn router(cfg: &IngressConfig, front: &Arc<Front>) -> anyhow::Result<Router> {
    let metrics = crate::metrics::install();
    crate::metrics::zero_ingress_series();
    // For SNS certificates, subscription confirmations and Google's keys: never redirected.
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .redirect(reqwest::redirect::Policy::none())
        .build()?;
    let f1 = front.clone();
    let side_permits = Arc::new(tokio::sync::Semaphore::new(SIDE_REQUESTS));
    // Health, metrics and docs answer without authentication: a small pool of their own, so
    // polling them costs nothing the deliveries need.
    let side = Router::new()
        .route(
            "/api/v1/health",
            get(move || async move { f1.readiness(serde_json::json!({})) }),
        )
        .route("/api/v1/health/live", get(live))
        .route(
            "/metrics",
            get(move || async move { metrics_text(&metrics) }),
        )
        .route("/status", get(crate::metrics::status_page))
        .route("/openapi.json", get(docs::openapi))
        .route("/docs", get(docs::page))
        .layer(axum::middleware::from_fn(
            move |req: axum::extract::Request, next: axum::middleware::Next| {
                side_limit(side_permits.clone(), req, next)
            },
        ));
    Ok(Router::new()
        .merge(aws::ingress::routes(
            front,
            cfg.eventbridge.clone(),
            cfg.sns.clone(),
            http.clone(),
        )?)
        .merge(gcp::ingress::routes(front, cfg.pubsub.clone(), http)?)
        .merge(azure::ingress::routes(front, cfg.eventgrid.clone()))
        .merge(direct::ingress::routes(front, cfg.ingest.clone()))
        .merge(side)
        .layer(DefaultBodyLimit::max(cfg.max_body_bytes)))
}

/// Requests at once to health, metrics and docs (cloud health checks, Prometheus, a browser).
const SIDE_REQUESTS: usize = 32;

async fn side_limit(
    permits: Arc<tokio::sync::Semaphore>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    match permits.try_acquire() {
        Ok(_permit) => next.run(req).await,
        Err(_) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            [(axum::http::header::RETRY_AFTER, "1")],
            "too many health/metrics requests at once",
        )
            .into_response(),
    }
}

/// 200 while the process serves; 503 when a processor loop in the same process (`helios run`)
/// is stuck ([`crate::liveness`]).
async fn live() -> Response {
    match crate::liveness::check(crate::liveness::stale_limit()) {
        Ok(()) => {
            Json(serde_json::json!({"status": "alive", "version": env!("CARGO_PKG_VERSION")}))
                .into_response()
        }
        Err(since) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(
                serde_json::json!({"status": "stuck", "since_progress_s": since.as_secs(),
                "version": env!("CARGO_PKG_VERSION")}),
            ),
        )
            .into_response(),
    }
}

fn metrics_text(h: &metrics_exporter_prometheus::PrometheusHandle) -> Response {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        h.render(),
    )
        .into_response()
}

/// A started ingress: its address, and a handle to wait for its graceful end.
pub struct RunningIngress {
    pub addr: SocketAddr,
    pub front: Arc<Front>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl RunningIngress {
    /// Waits until the server stopped (after shutdown), the producer flushed and the broker
    /// probe ended: after it, no task of the ingress holds a Kafka client.
    pub async fn wait(self) -> anyhow::Result<()> {
        self.task.await??;
        self.front.kafka_health.stopped().await;
        Ok(())
    }
}

/// Binds, starts serving, and returns at once. On shutdown the server stops accepting,
/// drains in-flight requests, then flushes the producer.
pub async fn start(cfg: IngressConfig, shutdown: Shutdown) -> anyhow::Result<RunningIngress> {
    let bind = format!("{}:{}", cfg.host, cfg.port);
    for open in cfg.open_endpoints() {
        if cfg.protected_mode {
            // Safe as it is: only this host can reach it (the demo, a sidecar, a test).
            tracing::info!(%open, "endpoint without credentials: it serves loopback clients only (protected mode)");
        } else {
            tracing::warn!(%open, "endpoint accepts unauthenticated requests from anyone (HELIOS_PROTECTED_MODE=false)");
        }
    }
    let front = front(&cfg, &shutdown)?;
    let router = router(&cfg, &front)?;
    let listener = tokio::net::TcpListener::bind(&bind)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the ingress to {bind}: {e}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, "ingress listening");
    let limits = serve::ServeLimits {
        header_timeout: cfg.header_timeout,
        max_connections: cfg.max_connections,
        max_requests_per_connection: cfg.max_requests_per_connection,
        max_connection_age: cfg.max_connection_age,
    };
    let landing = front.landing.clone();
    let task = tokio::spawn(async move {
        serve::serve(listener, router, limits, shutdown).await;
        tracing::info!("ingress drained; flushing the producer");
        tokio::task::spawn_blocking(move || landing.flush(Duration::from_secs(10))).await?;
        Ok(())
    });
    Ok(RunningIngress { addr, front, task })
}
