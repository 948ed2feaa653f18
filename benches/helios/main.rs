//! HELIOS's benchmarks, a bench target of their own (`cargo bench --bench helios -- <what>`,
//! or `scripts/bench.sh <what>`, which also starts the broker): nothing of it is in the product.
//!
//! - `process`: one processor on a backlog, beside a librdkafka pass-through and PostgreSQL alone
//!   (the processor's statement, the earlier UNNEST statement, and plain COPY: the ceiling).
//! - `latency`: freshness, from the ingress receiving an event to its row in PostgreSQL, at a
//!   steady request rate through the ingress and a processor in one process (as `helios run`).
//! - `ingress`: requests/s and latency of the ingress against a bare HTTP server.
//! - `reconcile`: one reconciler on a backlog of fan-out events (orders with one to three steps).
//! - `dedup`: dedup claims on one Redis and on a Redis Cluster, side by side.

mod dedup;
mod ingress;
mod latency;
mod process;
mod reconcile;

use clap::{Parser, Subcommand};
use helios::config::KafkaArgs;

// The product's allocator (see Cargo.toml), so CPU and memory are the binary's.
#[cfg(all(target_os = "linux", not(target_env = "musl")))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(name = "helios-bench", about = "HELIOS benchmarks")]
struct Cli {
    #[command(subcommand)]
    what: BenchCommand,
}

/// PostgreSQL and Redis of the process and latency benchmarks.
#[derive(Debug, clap::Args)]
struct Stores {
    /// PostgreSQL URL (a scratch schema is created and dropped).
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    database_url: String,
    /// Redis URL (keys expire after 15 minutes).
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
}

#[derive(Debug, Subcommand)]
enum BenchCommand {
    /// Processor throughput, CPU and memory on a backlog, against a plain consume-and-produce
    /// pass-through on the same broker and PostgreSQL alone on the same rows.
    Process {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Raw records in the backlog (comma-separated for several runs, e.g. 10000,100000).
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        records: Vec<usize>,
        #[command(flatten)]
        stores: Stores,
        /// Records per batch (default: the processor's).
        #[arg(long, default_value_t = helios::pipeline::processor::DEFAULT_BATCH_RECORDS)]
        batch_size: usize,
        /// Deliveries at once (comma-separated to compare, e.g. 1,2: one row each; default:
        /// the processor's).
        #[arg(long, value_delimiter = ',')]
        in_flight: Vec<usize>,
        /// Every column on a partitioned `events` table (daily, 90 days retention: 98
        /// partitions and the default one), as topology.yaml `events_table` lays it out.
        #[arg(long)]
        partitioned: bool,
        /// Also run the batched Python processor (`benches/peer/processor.py`: confluent-kafka,
        /// redis-py, psycopg) on each backlog (`scripts/bench.sh` installs it into a venv).
        #[arg(long)]
        peer: bool,
        /// Leave out the PostgreSQL-alone columns (printed as 0): the processor's own numbers
        /// in a third of the time, e.g. to compare memory settings.
        #[arg(long)]
        no_pg_columns: bool,
    },
    /// Time from the ingress receiving an event to its row in PostgreSQL, at a steady rate.
    Latency {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Requests per second (unique EventBridge events).
        #[arg(long, default_value_t = 5000)]
        rate: u64,
        /// Concurrent connections.
        #[arg(long, default_value_t = 16)]
        connections: usize,
        /// Seconds of measured load (after a 3 s warm-up).
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// Consumer `fetch.wait.max.ms` values to compare (comma-separated); `default` is the
        /// processor's own.
        #[arg(long, value_delimiter = ',', default_value = "default")]
        fetch_wait_ms: Vec<String>,
        #[command(flatten)]
        stores: Stores,
    },
    /// Reconciler throughput, CPU and memory on a backlog of fan-out events.
    Reconcile {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Fan-out events in the backlog (comma-separated for several runs).
        #[arg(long, value_delimiter = ',', default_value = "100000")]
        records: Vec<usize>,
        #[command(flatten)]
        stores: Stores,
        /// Records per batch (default: the reconciler's).
        #[arg(long, default_value_t = helios::reconcile::run::DEFAULT_BATCH)]
        batch_size: usize,
    },
    /// Dedup claims (the processor's pipelined SET NX GET) on one Redis and on a Redis Cluster.
    Dedup {
        /// The single Redis.
        #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
        redis_url: String,
        /// A Redis Cluster's seed nodes (comma separated), measured in the same run.
        #[arg(long)]
        cluster_url: Option<String>,
        /// Marks claimed per pass.
        #[arg(long, default_value_t = 200_000)]
        events: usize,
        /// Marks per claim (the processor's batch).
        #[arg(long, default_value_t = helios::pipeline::processor::DEFAULT_BATCH_RECORDS)]
        batch_size: usize,
    },
    /// Ingress throughput and latency against a bare HTTP server.
    Ingress {
        #[command(flatten)]
        kafka: KafkaArgs,
        /// Concurrent connections; a list runs each (both targets) in turn.
        #[arg(long, value_delimiter = ',', default_value = "64")]
        connections: Vec<usize>,
        /// Seconds of load per target (after a 2 s warm-up).
        #[arg(long, default_value_t = 15)]
        seconds: u64,
    },
}

fn main() -> std::process::ExitCode {
    // `cargo bench` passes `--bench` to every bench target; it is not ours.
    let args = std::env::args().filter(|a| a != "--bench");
    let cli = Cli::parse_from(args);
    let _telemetry = helios::telemetry::init("helios-bench");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match rt.block_on(run(cli.what)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(what: BenchCommand) -> anyhow::Result<()> {
    match what {
        BenchCommand::Process {
            kafka,
            records,
            stores,
            batch_size,
            in_flight,
            partitioned,
            peer,
            no_pg_columns,
        } => {
            let mut rows = vec![];
            let in_flight = if in_flight.is_empty() {
                vec![helios::pipeline::processor::DEFAULT_DELIVERIES_IN_FLIGHT]
            } else {
                in_flight
            };
            for n in records {
                for depth in &in_flight {
                    rows.push(
                        process::run_once(
                            &kafka,
                            n,
                            &stores.database_url,
                            &stores.redis_url,
                            process::RunOptions {
                                batch_size,
                                in_flight: *depth,
                                partitioned,
                                peer,
                                pg_columns: !no_pg_columns,
                            },
                        )
                        .await?,
                    );
                }
            }
            process::print(&rows, partitioned);
            Ok(())
        }
        BenchCommand::Latency {
            kafka,
            rate,
            connections,
            seconds,
            fetch_wait_ms,
            stores,
        } => {
            let mut rows = vec![];
            for fw in fetch_wait_ms {
                let fw = match fw.as_str() {
                    "default" => None,
                    v => Some(v.parse::<u64>().map_err(|_| {
                        anyhow::anyhow!("--fetch-wait-ms: `{v}` is not a number or `default`")
                    })?),
                };
                let opts = latency::Opts {
                    rate,
                    connections,
                    seconds,
                    fetch_wait_ms: fw,
                };
                rows.push(
                    latency::run_once(&kafka, &opts, &stores.database_url, &stores.redis_url)
                        .await?,
                );
            }
            latency::print(rate, connections, &rows);
            Ok(())
        }
        BenchCommand::Ingress {
            kafka,
            connections,
            seconds,
        } => ingress::run(&kafka, &connections, seconds).await,
        BenchCommand::Dedup {
            redis_url,
            cluster_url,
            events,
            batch_size,
        } => {
            let mut rows = dedup::run_once("single", &redis_url, events, batch_size).await?;
            if let Some(c) = cluster_url {
                rows.extend(dedup::run_once("cluster", &c, events, batch_size).await?);
            }
            dedup::print(batch_size, &rows);
            Ok(())
        }
        BenchCommand::Reconcile {
            kafka,
            records,
            stores,
            batch_size,
        } => {
            let mut rows = vec![];
            for n in records {
                rows.push(reconcile::run_once(&kafka, n, &stores.database_url, batch_size).await?);
            }
            reconcile::print(&rows);
            Ok(())
        }
    }
}

/// A run's own topics, consumer group and tag: a benchmark never touches real topics.
fn scratch_topology(
    kafka: &KafkaArgs,
) -> anyhow::Result<(
    helios::topology::Topology,
    helios::config::KafkaSettings,
    String,
)> {
    let (mut topology, settings) = kafka.resolve()?;
    let tag = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    topology.topic_prefix = format!("bench-{tag}.");
    topology.consumer_group = format!("bench-{tag}.helios-processor");
    Ok((topology, settings, tag))
}

/// A run's own PostgreSQL schema (migrated) and Redis key prefix, named by `tag`.
async fn scratch_stores(
    database_url: &str,
    redis_url: &str,
    tag: &str,
) -> anyhow::Result<(String, sqlx::PgPool, helios::pipeline::dedup::RedisDedup)> {
    let schema = format!("bench_{tag}");
    let pool = helios::db::connect(database_url, Some(&schema)).await?;
    helios::db::migrate(&pool).await?;
    let dedup = helios::pipeline::dedup::RedisDedup::connect(
        redis_url,
        &format!("bench:{tag}:"),
        std::time::Duration::from_secs(900),
    )
    .await?;
    Ok((schema, pool, dedup))
}

/// Lays a scratch schema's `events` out partitioned (daily, 90 days retention), as
/// topology.yaml's `events_table: {partition: daily, retention: 90d}` does.
async fn partition_events(pool: &sqlx::PgPool) -> anyhow::Result<()> {
    let p = helios::topology::Partitioning {
        period: helios::topology::Period::Daily,
        retention: Some(std::time::Duration::from_secs(90 * 86_400)),
        create_ahead: 7,
    };
    helios::db::partitions::prepare(pool, Some(&p), true).await?;
    Ok(())
}

/// Drops a benchmark's scratch schema.
async fn drop_schema(pool: &sqlx::PgPool, schema: &str) -> anyhow::Result<()> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA \"{schema}\" CASCADE"
    )))
    .execute(pool)
    .await?;
    Ok(())
}
