//! The `helios` command line: one subcommand per job, each parsing its options (flags, then
//! environment, then defaults), doing its work through the library, and reporting clearly.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::KafkaArgs;
use crate::ingress::{IngressArgs, IngressConfig};
use crate::kafka::TopicAction;
use crate::pipeline::ProcessArgs;
use crate::shutdown::Shutdown;
use crate::topology::Topology;

#[derive(Debug, Parser)]
#[command(
    name = "helios",
    version,
    about = "Multi-cloud events into one trustworthy Kafka stream"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP ingress: land every cloud push untouched in helios.raw.<source>.
    Ingress {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        ingress: Box<IngressArgs>,
    },
    /// Run one processor instance (a member of the consumer group): raw topics → events.
    Process {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        process: ProcessArgs,
        /// Address of the processor's /metrics and health endpoints.
        #[arg(long, env = "HELIOS_METRICS_ADDR", default_value = "0.0.0.0:9100")]
        metrics_addr: String,
    },
    /// Run the ingress and a processor in one process.
    Run {
        #[command(flatten)]
        kafka: KafkaArgs,
        #[command(flatten)]
        ingress: Box<IngressArgs>,
        #[command(flatten)]
        process: ProcessArgs,
    },
    /// Everything on embedded defaults: an in-process Kafka cluster, in-memory dedup, a SQLite store.
    Demo(crate::demo::DemoArgs),
    /// Re-process a range of raw topics (by time or offsets) through the processor's pipeline.
    Replay(Box<crate::replay::ReplayArgs>),
    /// One screen: lag and rates per raw partition, dependencies, recent DLQ records,
    /// subscription handshakes, events of the last hour, last replays (exit 1 when unhealthy).
    Status(Box<crate::status::StatusArgs>),
    /// Print the records of the raw topics, the fan-out topics or the DLQ as they flow.
    Tap(Box<crate::tap::TapArgs>),
    /// Follow each order through the flows of topology.yaml across event types and clouds;
    /// report what completed, is missing, late, out of order, duplicated or orphaned
    /// (`report` and `show <key>` read the results).
    Reconcile(Box<crate::reconcile::ReconcileCommand>),
    /// Inspect and redrive the dead-letter topic.
    Dlq {
        #[command(subcommand)]
        action: crate::dlq::DlqCommand,
    },
    /// Publish a test event through a cloud (production) or as that cloud's push into an ingress (demo).
    Publish(Box<crate::publish::PublishArgs>),
    /// Check the payload schemas (schemas/) against the schema registry, or register them.
    Schemas {
        #[command(subcommand)]
        action: crate::schemas::SchemasCommand,
    },
    /// Apply the SQL migrations (migrations/, embedded in the binary).
    Migrate {
        /// PostgreSQL URL.
        #[arg(long, env = "DATABASE_URL")]
        database_url: String,
        /// PostgreSQL schema for HELIOS's tables (created if missing).
        #[arg(long, env = "HELIOS_DB_SCHEMA")]
        db_schema: Option<String>,
        /// The topology file: its `events_table:` section lays `events` out (partitioned by
        /// `occurred_at`, retention). Default: ./topology.yaml when there is one.
        #[arg(long, env = "HELIOS_TOPOLOGY")]
        topology: Option<std::path::PathBuf>,
    },
    /// Check or create the topics that topology.yaml declares.
    Topology {
        #[command(subcommand)]
        action: TopologyAction,
    },
}

#[derive(Debug, Subcommand)]
enum TopologyAction {
    /// Check the file (syntax, names, rules) without a broker.
    Validate {
        /// The topology file.
        #[arg(long, env = "HELIOS_TOPOLOGY", default_value = "topology.yaml")]
        topology: std::path::PathBuf,
    },
    /// Create every declared topic that is missing (idempotent) and report what was done.
    Apply {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Only report what would be created.
        #[arg(long)]
        dry_run: bool,
    },
}

/// Entry point of the binary.
pub fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a closed pipe turns every println! into a panic; a CLI should
    // simply stop, as other Unix tools do.
    #[cfg(unix)]
    // SAFETY: setting a signal disposition to its default before any thread is started.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A .env in the working directory is read first; real environment variables win.
    let dotenv_result = dotenvy::dotenv();
    let cli = Cli::parse();
    // Held until the end of main: dropping it exports the spans still buffered.
    let _telemetry = match &cli.command {
        Command::Demo(_) => crate::telemetry::init_for_people("helios-demo"),
        Command::Ingress { .. } => crate::telemetry::init("helios-ingress"),
        Command::Process { .. } => crate::telemetry::init("helios-processor"),
        Command::Reconcile(_) => crate::telemetry::init("helios-reconciler"),
        _ => crate::telemetry::init("helios"),
    };
    if let Err(e) = &dotenv_result {
        if !e.not_found() {
            tracing::warn!(error = %e, ".env could not be read");
        }
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    drop(rt);
    code
}

/// The ingress refuses to start when a raw topic cannot hold the bodies it would accept.
async fn check_raw_topic_sizes(cfg: &IngressConfig, kafka: &KafkaArgs) -> anyhow::Result<()> {
    crate::kafka::check_topic_sizes(
        &cfg.kafka,
        &cfg.topology,
        &kafka.limits()?,
        &[crate::limits::TopicKind::Raw],
    )
    .await?;
    if cfg.mode == crate::config::DeploymentMode::Production {
        crate::kafka::warn_min_insync(&cfg.kafka, &cfg.topology).await;
    }
    Ok(())
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Ingress { kafka, ingress } => {
            let cfg = IngressConfig::from_args(&kafka, &ingress)?;
            check_raw_topic_sizes(&cfg, &kafka).await?;
            let running = crate::ingress::start(cfg, Shutdown::on_signals()).await?;
            println!(
                "HELIOS ingress listening on http://{} (docs: /docs, metrics: /metrics)",
                running.addr
            );
            running.wait().await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Process {
            kafka,
            process,
            metrics_addr,
        } => {
            let shutdown = Shutdown::on_signals();
            let metrics = crate::pipeline::serve_metrics(&metrics_addr, shutdown.clone()).await?;
            println!("HELIOS processor: metrics on http://{metrics}/metrics");
            crate::pipeline::run_processor(&kafka, &process, shutdown).await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Run {
            kafka,
            ingress,
            process,
        } => {
            let cfg = IngressConfig::from_args(&kafka, &ingress)?;
            check_raw_topic_sizes(&cfg, &kafka).await?;
            let shutdown = Shutdown::on_signals();
            let running = crate::ingress::start(cfg, shutdown.clone()).await?;
            println!(
                "HELIOS ingress + processor: http://{} (docs: /docs, metrics: /metrics)",
                running.addr
            );
            let processed = crate::pipeline::run_processor(&kafka, &process, shutdown).await;
            running.wait().await?;
            processed?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo(args) => crate::demo::run(args).await,
        Command::Replay(args) => crate::replay::run(*args).await,
        Command::Reconcile(cmd) => crate::reconcile::run(*cmd).await,
        Command::Publish(args) => crate::publish::run(*args).await,
        Command::Dlq { action } => crate::dlq::run(action).await,
        Command::Schemas { action } => crate::schemas::run(action).await,
        Command::Status(args) => crate::status::run(*args).await,
        Command::Tap(args) => crate::tap::run(*args).await,
        Command::Migrate {
            database_url,
            db_schema,
            topology,
        } => {
            let topology = match topology {
                Some(path) => Some(Topology::load(&path)?),
                None => {
                    let default = std::path::Path::new("topology.yaml");
                    default
                        .exists()
                        .then(|| Topology::load(default))
                        .transpose()?
                }
            };
            let pool = crate::db::connect(&database_url, db_schema.as_deref()).await?;
            let applied = crate::db::migrate(&pool).await?;
            if applied.is_empty() {
                println!("database is up to date");
            } else {
                println!("applied migrations: {applied:?}");
            }
            let partitioning = topology.as_ref().and_then(|t| t.events_partitioning());
            match crate::db::partitions::prepare(&pool, partitioning.as_ref(), true).await? {
                Some(m) => println!(
                    "events: partitioned {}{}: {m}",
                    partitioning.map(|p| p.period_name()).unwrap_or_default(),
                    partitioning
                        .and_then(|p| p.retention)
                        .map(|r| format!(", retention {}d", r.as_secs() / 86_400))
                        .unwrap_or_default()
                ),
                None => println!("events: one unpartitioned table"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Topology { action } => match action {
            TopologyAction::Validate { topology } => {
                let t = Topology::load(&topology)?;
                println!("{} is valid:", topology.display());
                for p in t.planned_topics() {
                    println!(
                        "  {:<40} {:>3} partitions  {}",
                        p.name, p.partitions, p.role
                    );
                }
                println!("  consumer group: {}", t.consumer_group);
                for (name, spec) in &t.event_types {
                    println!("  rule {name}: requires {}", spec.required.join(", "));
                }
                println!("  reconciler group: {}", t.reconciler_group);
                for f in t.flows()? {
                    println!(
                        "  flow {} (key {}, lateness {}s): {}",
                        f.name,
                        f.key,
                        f.allowed_lateness.as_secs(),
                        f.describe()
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            TopologyAction::Apply { kafka, dry_run } => {
                let (topology, settings) = kafka.resolve()?;
                let reports = crate::kafka::apply_topology(&settings, &topology, dry_run).await?;
                let mut created = 0;
                for r in &reports {
                    let what = match &r.action {
                        TopicAction::Created => {
                            created += 1;
                            "created".to_string()
                        }
                        TopicAction::WouldCreate => {
                            created += 1;
                            "would create".to_string()
                        }
                        TopicAction::Exists { partitions } => {
                            format!("exists ({partitions} partitions)")
                        }
                    };
                    println!("  {:<40} {:<24} {}", r.topic.name, what, r.topic.role);
                    if let Some(w) = &r.warning {
                        println!("    warning: {w}");
                    }
                }
                println!(
                    "{} {created} topic(s), {} already present, on {}",
                    if dry_run { "would create" } else { "created" },
                    reports.len() - created,
                    settings.bootstrap_servers
                );
                Ok(ExitCode::SUCCESS)
            }
        },
    }
}
