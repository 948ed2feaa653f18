//! The processor's pipeline, one module per stage: raw records are consumed in batches
//! ([`consume`]), planned ([`plan`]: [`normalize`], [`validate`], [`guard`], [`dedup`]),
//! delivered by [`deliver`] to its [`sinks`] (PostgreSQL, the fan-out topics, the DLQ), and
//! committed as the [`commit`] sequencer allows; [`processor`] builds the processor and runs
//! its loop, [`retry`] is its one retry loop, [`stats`] counts what happened, [`config`] holds
//! its settings.

pub mod avro;
pub mod breaker;
pub mod commit;
pub mod config;
pub mod consume;
pub mod dedup;
pub mod deliver;
pub mod guard;
pub mod normalize;
pub mod plan;
pub mod processor;
pub mod retry;
pub mod schema;
pub mod sinks;
pub mod stats;
pub mod txn_id;
pub mod validate;

pub use retry::Unavailable;
pub use sinks::fanout;

use std::time::Duration;

use crate::config::KafkaArgs;
use crate::shutdown::Shutdown;
pub use config::ProcessArgs;
/// Builds a processor from flags/environment (Redis dedup, PostgreSQL store) and runs it until
/// shutdown.
pub async fn run_processor(
    kafka: &KafkaArgs,
    args: &ProcessArgs,
    shutdown: Shutdown,
) -> anyhow::Result<()> {
    args.check()?;
    let (topology, settings) = kafka.resolve()?;
    let pool = crate::db::connect(&args.database_url, args.db_schema.as_deref()).await?;
    if args.migrate {
        let applied = crate::db::migrate(&pool).await?;
        tracing::info!(?applied, "migrations applied");
    }
    let partitioning = topology.events_partitioning();
    if let Some(m) =
        crate::db::partitions::prepare(&pool, partitioning.as_ref(), args.migrate).await?
    {
        tracing::info!("events partitions: {m}");
    }
    if let Some(p) = partitioning {
        tokio::spawn(crate::db::partitions::maintain_every(
            pool.clone(),
            p,
            Duration::from_secs(args.partition_maintenance_secs),
            shutdown.clone(),
        ));
    }
    let dedup = dedup::RedisDedup::connect(
        &args.redis_url,
        &args.dedup_prefix,
        Duration::from_secs(args.dedup_ttl_secs),
    )
    .await?;
    let limits = kafka.limits()?;
    crate::kafka::check_topic_sizes(
        &settings,
        &topology,
        &limits,
        &[
            crate::limits::TopicKind::Raw,
            crate::limits::TopicKind::Output,
        ],
    )
    .await?;
    // Held for the life of the process: the lock on this instance's transactional-id slot.
    let mut _slot = None;
    let mode = if args.exactly_once {
        let transactional_id = match args
            .transactional_id
            .clone()
            .filter(|t| !t.trim().is_empty())
        {
            Some(id) => id,
            None => {
                let slot = txn_id::claim(&topology.consumer_group)?;
                let id = slot.id.clone();
                _slot = Some(slot);
                id
            }
        };
        config::DeliveryMode::Transactional { transactional_id }
    } else {
        config::DeliveryMode::AtLeastOnce
    };
    let mut cfg = config::ProcessorConfig::new(settings, topology);
    cfg.batch = config::BatchLimits {
        records: args.batch_size,
        bytes: args.batch_max_bytes,
        linger: Duration::from_millis(args.batch_linger_ms),
    };
    cfg.mode = mode;
    cfg.deliveries_in_flight = args.deliveries_in_flight;
    cfg.schema_registry_url = args.schema_registry_url.clone();
    cfg.limits = limits;
    processor::Processor::new(cfg, dedup, crate::db::PgStore::new(pool))?
        .run(shutdown)
        .await
}

/// 200 while the process's loop waits for work or makes progress; 503 when it is stuck
/// ([`crate::liveness`]).
async fn live() -> axum::response::Response {
    use axum::response::IntoResponse;
    match crate::liveness::check(crate::liveness::stale_limit()) {
        Ok(()) => "alive".into_response(),
        Err(since) => {
            tracing::error!(
                since_progress_s = since.as_secs(),
                "no progress and not waiting for work: reporting not alive (a supervisor restarts the process; nothing past the stuck batch was committed)"
            );
            (
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "stuck: no progress for {} s while not waiting for work",
                    since.as_secs()
                ),
            )
                .into_response()
        }
    }
}

/// Serves `/metrics` and a liveness route for a processor without an ingress.
pub async fn serve_metrics(addr: &str, shutdown: Shutdown) -> anyhow::Result<std::net::SocketAddr> {
    let handle = crate::metrics::install();
    let router = axum::Router::new()
        .route(
            "/metrics",
            axum::routing::get(move || {
                let h = handle.clone();
                async move { h.render() }
            }),
        )
        .route("/api/v1/health/live", axum::routing::get(live))
        .route("/status", axum::routing::get(crate::metrics::status_page));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("cannot bind the metrics endpoint to {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.wait())
            .await;
    });
    Ok(bound)
}
