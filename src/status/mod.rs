//! `helios status`: one screen that answers an operator's daily questions: is the processor
//! keeping up (lag and rates per raw partition), are the dependencies healthy (with latency),
//! what was dead-lettered recently (by reason and source, from the DLQ topic's headers), which
//! cloud subscriptions shook hands (from the handshake records in the raw topics), what was
//! stored in the last hour, and the last replays. `--json` for scripts, `--watch` to refresh;
//! the exit code is 1 when a dependency is unhealthy, so it can serve as a probe.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::process::ExitCode;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::config::KafkaArgs;
use crate::model::text::bounded;
use crate::source::Source;

mod deps;
mod kafka;
mod render;
pub use render::render;

/// `helios status` options.
#[derive(Debug, Clone, clap::Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema of HELIOS's tables.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Redis URL of the dedup marks.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Schema registry, checked when set.
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Print JSON instead of the screen.
    #[arg(long)]
    pub json: bool,
    /// Refresh every this many seconds until interrupted.
    #[arg(long, value_name = "SECONDS")]
    pub watch: Option<u64>,
    /// Most records read from the end of each DLQ and raw partition for the recent counts.
    #[arg(long, default_value_t = 50_000)]
    pub scan_limit: i64,
    /// A processor's metrics endpoint (`host:9100`; repeatable, or comma-separated in the
    /// variable): its circuit breakers are shown, and one that is open makes the status
    /// unhealthy.
    #[arg(
        long = "processor-metrics",
        env = "HELIOS_STATUS_PROCESSORS",
        value_delimiter = ','
    )]
    pub processor_metrics: Vec<String>,
}

/// One circuit breaker of one processor (`helios_breaker_state` of its `/metrics`).
#[derive(Debug, Clone, Serialize)]
pub struct BreakerStatus {
    /// The processor's metrics endpoint, as given.
    pub processor: String,
    pub dependency: String,
    /// `closed`, `half_open`, `open`, or `unreachable` (its metrics could not be read).
    pub state: String,
}

/// One raw partition.
#[derive(Debug, Clone, Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub end_offset: i64,
    /// The consumer group's committed offset (`None`: nothing committed yet).
    pub committed: Option<i64>,
    pub lag: i64,
    /// Records/s arriving and committed since the previous look (`None` on the first).
    pub in_per_s: Option<f64>,
    pub committed_per_s: Option<f64>,
}

/// One dependency.
#[derive(Debug, Clone, Serialize)]
pub struct Dependency {
    pub name: &'static str,
    pub healthy: bool,
    pub latency_ms: f64,
    pub error: Option<String>,
}

/// Recent DLQ records of one reason and source.
#[derive(Debug, Clone, Serialize)]
pub struct DlqCount {
    pub reason: String,
    pub source: String,
    pub last_hour: u64,
    pub last_24h: u64,
}

/// The handshakes seen for one subscription.
#[derive(Debug, Clone, Serialize)]
pub struct Subscription {
    pub source: String,
    pub handshake: String,
    pub subscription: String,
    pub count: u64,
    pub last_seen: Option<DateTime<Utc>>,
}

/// A recent replay.
#[derive(Debug, Clone, Serialize)]
pub struct ReplayRow {
    pub replay_id: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub outcome: String,
    pub dedup_policy: String,
}

/// Everything `helios status` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub at: DateTime<Utc>,
    pub consumer_group: String,
    pub healthy: bool,
    pub dependencies: Vec<Dependency>,
    pub partitions: Vec<PartitionStatus>,
    pub total_lag: i64,
    pub dlq: Vec<DlqCount>,
    /// DLQ records read for the counts (capped by `--scan-limit` per partition).
    pub dlq_scanned: u64,
    pub subscriptions: Vec<Subscription>,
    /// Events stored whose `occurred_at` is within the last hour, by type.
    pub events_last_hour: BTreeMap<String, i64>,
    pub replays: Vec<ReplayRow>,
    /// The reconciler group and its partitions of the flows' fan-out topics (none without flows).
    pub reconciler_group: String,
    pub reconciler_partitions: Vec<PartitionStatus>,
    pub reconciler_lag: i64,
    /// Reconciliation outcomes detected in the last hour / 24 h, by flow and outcome.
    pub reconciliation: Vec<ReconCount>,
    /// Flow instances with a deadline still pending.
    pub reconciliation_open: Option<i64>,
    /// Per flow and partition: the reconciler group's watermark and what holds it.
    pub event_time: Vec<EventTimeStatus>,
    /// The circuit breakers of the processors named by `--processor-metrics`.
    pub breakers: Vec<BreakerStatus>,
}

/// One flow-partition's event time, as the reconciler last wrote it.
#[derive(Debug, Clone, Serialize)]
pub struct EventTimeStatus {
    pub flow: String,
    pub partition: i32,
    pub watermark: DateTime<Utc>,
    /// Wall clock minus the watermark, as of this look.
    pub behind_s: f64,
    pub held_by: String,
    pub updated_at: DateTime<Utc>,
}

/// Reconciliation outcomes of one flow and kind.
#[derive(Debug, Clone, Serialize)]
pub struct ReconCount {
    pub flow: String,
    pub outcome: String,
    pub last_hour: i64,
    pub last_24h: i64,
    /// `missing`/`orphan` not resolved since.
    pub unresolved: i64,
}

pub(super) fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0 * 10.0).round() / 10.0
}

/// Takes one look (`pool`: the PostgreSQL connections kept between looks).
pub async fn collect(args: &StatusArgs, pool: &mut Option<sqlx::PgPool>) -> anyhow::Result<Status> {
    let (topology, settings) = args.kafka.resolve()?;
    let now = Utc::now();
    let kafka = {
        let (s, t) = (settings.clone(), topology.clone());
        let limit = args.scan_limit;
        tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let raw: Vec<String> = Source::ALL.iter().map(|x| t.raw_topic(*x)).collect();
            let (parts, probe) = kafka::partitions(&s, &t.consumer_group, &raw)?;
            let mut flow_topics: Vec<String> = t
                .flows()
                .unwrap_or_default()
                .iter()
                .flat_map(|f| f.steps.iter().map(|st| t.event_topic(&st.event_type)))
                .collect();
            flow_topics.sort();
            flow_topics.dedup();
            let recon = if flow_topics.is_empty() {
                vec![]
            } else {
                kafka::partitions(&s, &t.reconciler_group, &flow_topics)?.0
            };
            let (dlq, scanned) = kafka::dlq_counts(&s, &t, now, limit)?;
            let subs = kafka::subscriptions(&s, &t, now, limit)?;
            Ok((parts, probe, dlq, scanned, subs, recon))
        })
    };
    let (pg, events_last_hour, replays) = deps::postgres(args, pool).await;
    let (reconciliation, reconciliation_open) = reconciliation(pool.as_ref()).await;
    let event_time = event_time(pool.as_ref(), &topology.reconciler_group, now).await;
    let mut dependencies = vec![];
    let (partitions, dlq, dlq_scanned, subscriptions, reconciler_partitions) = match kafka.await? {
        Ok((parts, probe, dlq, scanned, subs, recon)) => {
            dependencies.push(Dependency {
                name: "kafka",
                healthy: true,
                latency_ms: ms(probe),
                error: None,
            });
            (parts, dlq, scanned, subs, recon)
        }
        Err(e) => {
            dependencies.push(Dependency {
                name: "kafka",
                healthy: false,
                latency_ms: 0.0,
                error: Some(bounded(&format!("{e:#}"), 300).into_owned()),
            });
            (vec![], vec![], 0, vec![], vec![])
        }
    };
    dependencies.push(pg);
    dependencies.push(deps::redis(&args.redis_url).await);
    if let Some(url) = args
        .schema_registry_url
        .as_deref()
        .filter(|u| !u.is_empty())
    {
        dependencies.push(deps::schema_registry(url).await);
    }
    let breakers = deps::breakers(&args.processor_metrics).await;
    Ok(Status {
        at: now,
        consumer_group: topology.consumer_group.clone(),
        healthy: dependencies.iter().all(|d| d.healthy)
            && breakers
                .iter()
                .all(|b| b.state != "open" && b.state != "unreachable"),
        breakers,
        total_lag: partitions.iter().map(|p| p.lag).sum(),
        dependencies,
        partitions,
        dlq,
        dlq_scanned,
        subscriptions,
        events_last_hour,
        replays,
        reconciler_group: topology.reconciler_group.clone(),
        reconciler_lag: reconciler_partitions.iter().map(|p| p.lag).sum(),
        reconciler_partitions,
        reconciliation,
        reconciliation_open,
        event_time,
    })
}

/// The reconciler group's watermarks (none when the table is not there).
async fn event_time(
    pool: Option<&sqlx::PgPool>,
    group: &str,
    now: DateTime<Utc>,
) -> Vec<EventTimeStatus> {
    let Some(pool) = pool else {
        return vec![];
    };
    type Row = (String, i32, DateTime<Utc>, String, DateTime<Utc>);
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT flow, part, watermark, held_by, updated_at FROM reconcile_watermarks
         WHERE consumer_group = $1 ORDER BY flow, part LIMIT 1000",
    )
    .bind(group)
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    rows.into_iter()
        .map(
            |(flow, partition, watermark, held_by, updated_at)| EventTimeStatus {
                flow,
                partition,
                watermark,
                behind_s: ((now - watermark).num_milliseconds() as f64 / 1000.0).max(0.0),
                held_by,
                updated_at,
            },
        )
        .collect()
}

/// Reconciliation outcomes of the last 24 h and the instances still open (nothing when the
/// tables are not there: reconciliation was never migrated).
async fn reconciliation(pool: Option<&sqlx::PgPool>) -> (Vec<ReconCount>, Option<i64>) {
    let Some(pool) = pool else {
        return (vec![], None);
    };
    let rows: Vec<(String, String, i64, i64, i64)> = sqlx::query_as(
        "SELECT flow, outcome, count(*) FILTER (WHERE detected_at > now() - interval '1 hour'), count(*),
                count(*) FILTER (WHERE resolved_at IS NULL AND outcome IN ('missing', 'orphan'))
         FROM reconciliation_results WHERE detected_at > now() - interval '24 hours'
         GROUP BY flow, outcome ORDER BY flow, outcome LIMIT 200",
    )
    .fetch_all(pool)
    .await
    .unwrap_or_default();
    let open: Option<i64> =
        sqlx::query_scalar("SELECT count(*) FROM flow_state WHERE next_due IS NOT NULL")
            .fetch_one(pool)
            .await
            .ok();
    (
        rows.into_iter()
            .map(
                |(flow, outcome, last_hour, last_24h, unresolved)| ReconCount {
                    flow,
                    outcome,
                    last_hour,
                    last_24h,
                    unresolved,
                },
            )
            .collect(),
        open,
    )
}

/// Fills in the rates from the previous look.
fn add_rates(now: &mut Status, before: &Status) {
    let secs = (now.at - before.at).num_milliseconds() as f64 / 1000.0;
    if secs <= 0.0 {
        return;
    }
    for p in &mut now.partitions {
        if let Some(b) = before
            .partitions
            .iter()
            .find(|b| b.topic == p.topic && b.partition == p.partition)
        {
            p.in_per_s = Some((p.end_offset - b.end_offset) as f64 / secs);
            p.committed_per_s = match (p.committed, b.committed) {
                (Some(n), Some(o)) => Some((n - o) as f64 / secs),
                _ => None,
            };
        }
    }
}

/// Runs `helios status`.
pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let mut before: Option<Status> = None;
    let mut pool = None;
    loop {
        let mut s = collect(&args, &mut pool).await?;
        if let Some(b) = &before {
            add_rates(&mut s, b);
        }
        if args.json {
            println!("{}", serde_json::to_string(&s)?);
        } else {
            if args.watch.is_some() && std::io::stdout().is_terminal() {
                print!("\x1b[2J\x1b[H");
            }
            print!("{}", render(&s));
        }
        let Some(every) = args.watch else {
            return Ok(if s.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        };
        before = Some(s);
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(every.max(1))) => {}
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        }
    }
}
