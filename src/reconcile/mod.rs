//! Reconciliation: `helios reconcile` follows each order through the flows declared in
//! topology.yaml (e.g. OrderPlaced → PaymentProcessed within 15m → InventoryReserved within
//! 30m), across event types and clouds, and reports per order `completed`, `missing`, `late`,
//! `arrived_late`, `out_of_order`, `duplicate_step`, `orphan`, `ended` and `mismatch` — each
//! once, as a row of `reconciliation_results`, then published from that row to
//! `helios.reconciliation` (an outbox: the topic never says what the table does not).
//!
//! [`engine`] is the state machine of one instance, [`clock`] the watermarks (and which
//! partitions are read to their end), [`backlog`] the processor group's raw backlog that holds
//! them back, [`intake`] the consumer side, [`input`] reads
//! fan-out records, [`store`] keeps `flow_state` and the results, [`run`] is the consumer-group
//! loop, [`report`] reads the results back.

pub mod absorb;
pub mod backlog;
pub mod clock;
pub mod dlq_hint;
pub mod engine;
pub mod input;
pub mod intake;
pub mod known;
pub mod pending;
pub mod recent;
pub mod report;
pub mod run;
pub mod store;
pub mod write;

use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;

use crate::config::KafkaArgs;
use crate::shutdown::Shutdown;
pub use run::{
    ReconcileStats, Reconciler, ReconcilerConfig, DEFAULT_BACKLOG_EVERY, DEFAULT_REJOIN_AFTER,
};
pub use store::ReconStore;

/// `helios reconcile [report|show]`.
#[derive(Debug, clap::Args)]
pub struct ReconcileCommand {
    #[command(subcommand)]
    pub action: Option<ReconcileAction>,
    #[command(flatten)]
    pub run: ReconcileArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum ReconcileAction {
    /// Counts by flow and outcome, completion times, and the latest incidents.
    Report {
        #[command(flatten)]
        db: DbArgs,
        /// Only this flow.
        #[arg(long)]
        flow: Option<String>,
        /// How far back: 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only this outcome (completed, missing, late, out_of_order, duplicate_step, orphan).
        #[arg(long)]
        outcome: Option<String>,
        /// Most incidents listed.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One key's timeline: each step, its cloud, its raw record, the gaps, the outcomes.
    Show {
        /// The flow key (an order id).
        key: String,
        #[command(flatten)]
        db: DbArgs,
        /// Only this flow.
        #[arg(long)]
        flow: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Where the DLQ is (searched for the key when a step is missing).
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Do not search the DLQ.
        #[arg(long)]
        no_dlq: bool,
    },
}

/// Where the results are.
#[derive(Debug, Clone, clap::Args)]
pub struct DbArgs {
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema of HELIOS's tables.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
}

/// Options of the reconciler itself.
#[derive(Debug, Clone, clap::Args)]
pub struct ReconcileArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// PostgreSQL URL.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: Option<String>,
    /// PostgreSQL schema of HELIOS's tables (created if missing).
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Apply the migrations at start-up.
    #[arg(long, env = "HELIOS_MIGRATE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub migrate: bool,
    /// Consumer group of the reconcilers (overrides `reconciler_group` in the topology file).
    #[arg(long, env = "HELIOS_RECONCILER_GROUP")]
    pub reconciler_group: Option<String>,
    /// Most fan-out records per batch.
    #[arg(long, env = "HELIOS_RECONCILE_BATCH_SIZE", default_value_t = run::DEFAULT_BATCH)]
    pub batch_size: usize,
    /// A partition with nothing new for this long advances on wall-clock time (so a missing
    /// step is reported when traffic stops).
    #[arg(long, env = "HELIOS_RECONCILE_IDLE_AFTER", default_value = "30s")]
    pub idle_after: String,
    /// Instances unchanged for this long are deleted; keep it at least the raw topics'
    /// retention, so a replay finds what it re-emits already counted.
    #[arg(long, env = "HELIOS_RECONCILE_STATE_RETENTION", default_value = "8d")]
    pub state_retention: String,
    /// Address of the reconciler's /metrics and health endpoints.
    #[arg(
        long,
        env = "HELIOS_RECONCILE_METRICS_ADDR",
        default_value = "0.0.0.0:9102"
    )]
    pub metrics_addr: String,
}

impl ReconcileArgs {
    /// The configuration these options describe.
    pub fn config(&self) -> anyhow::Result<ReconcilerConfig> {
        let (mut topology, settings) = self.kafka.resolve()?;
        if let Some(g) = self
            .reconciler_group
            .as_ref()
            .filter(|g| !g.trim().is_empty())
        {
            topology.reconciler_group = g.clone();
        }
        if self.batch_size == 0 {
            anyhow::bail!("HELIOS_RECONCILE_BATCH_SIZE / --batch-size must be at least 1");
        }
        let dur = |name: &str, v: &str| -> anyhow::Result<Duration> {
            crate::topology::flows::parse_duration(v).map_err(|e| anyhow::anyhow!("{name}: {e}"))
        };
        Ok(ReconcilerConfig {
            group: topology.reconciler_group.clone(),
            kafka: settings,
            topology,
            batch_size: self.batch_size,
            idle_after: dur(
                "HELIOS_RECONCILE_IDLE_AFTER / --idle-after",
                &self.idle_after,
            )?,
            state_retention: dur(
                "HELIOS_RECONCILE_STATE_RETENTION / --state-retention",
                &self.state_retention,
            )?,
            rejoin_after: run::DEFAULT_REJOIN_AFTER,
            backlog_every: run::DEFAULT_BACKLOG_EVERY,
        })
    }
}

/// Runs the command.
pub async fn run(cmd: ReconcileCommand) -> anyhow::Result<ExitCode> {
    match cmd.action {
        None => {
            let args = cmd.run;
            let cfg = args.config()?;
            let url = args.database_url.as_deref().context(
                "DATABASE_URL / --database-url is needed: the reconciler keeps its state in PostgreSQL",
            )?;
            let pool = crate::db::connect(url, args.db_schema.as_deref()).await?;
            if args.migrate {
                crate::db::migrate(&pool).await?;
            }
            let shutdown = Shutdown::on_signals();
            let metrics =
                crate::pipeline::serve_metrics(&args.metrics_addr, shutdown.clone()).await?;
            println!("HELIOS reconciler: metrics on http://{metrics}/metrics");
            Reconciler::new(cfg, ReconStore::Pg(pool))?
                .run(shutdown)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        Some(ReconcileAction::Report {
            db,
            flow,
            since,
            outcome,
            limit,
            json,
        }) => {
            let outcome = match outcome {
                None => None,
                Some(o) => Some(engine::OutcomeKind::parse(&o).with_context(|| {
                    format!(
                        "--outcome `{o}`: use one of {}",
                        engine::OutcomeKind::ALL.map(|k| k.as_str()).join(", ")
                    )
                })?),
            };
            let back = crate::topology::flows::parse_duration(&since)
                .map_err(|e| anyhow::anyhow!("--since: {e}"))?;
            let since = chrono::Utc::now() - chrono::Duration::from_std(back)?;
            let pool = crate::db::connect(&db.database_url, db.db_schema.as_deref()).await?;
            let r = report::report(&pool, flow.as_deref(), since, outcome, limit.max(0)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&r)?);
            } else {
                print!("{}", report::report_text(&r));
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(ReconcileAction::Show {
            key,
            db,
            flow,
            json,
            kafka,
            no_dlq,
        }) => {
            let pool = crate::db::connect(&db.database_url, db.db_schema.as_deref()).await?;
            let mut v = report::show(&pool, &key, flow.as_deref()).await?;
            // A step missing: is it in the DLQ? (Best effort: the timeline stands without it.)
            let missing = v["flows"].as_array().is_some_and(|f| {
                f.iter().any(|x| {
                    x["outcomes"].as_array().is_some_and(|o| {
                        o.iter().any(|o| {
                            matches!(o["outcome"].as_str(), Some("missing" | "orphan"))
                                && o["resolved_at"].is_null()
                        })
                    })
                })
            });
            if missing && !no_dlq {
                let k = key.clone();
                let searched = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
                    let (topology, settings) = kafka.resolve()?;
                    dlq_hint::search(&settings, &topology.dlq_topic(), &k)
                })
                .await?;
                v["dlq"] = match searched {
                    Ok(found) => serde_json::json!(found),
                    Err(e) => serde_json::json!({"error": e.to_string()}),
                };
            }
            let found = v["flows"].as_array().is_some_and(|f| !f.is_empty());
            if json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print!("{}", report::show_text(&v));
            }
            Ok(if found {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}
