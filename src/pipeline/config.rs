//! The processor's configuration, apart from its runtime: the command-line/environment options
//! ([`ProcessArgs`]: PostgreSQL, Redis, batching, delivery mode) and the settings a processor is
//! built from ([`ProcessorConfig`]).

use std::time::Duration;

use anyhow::bail;

use crate::config::KafkaSettings;
use crate::limits::SizeLimits;
use crate::topology::Topology;

/// Default most raw records per batch.
pub const DEFAULT_BATCH_RECORDS: usize = 2000;
/// Default most bytes per batch (`HELIOS_BATCH_MAX_BYTES`).
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024 * 1024;
/// Default deliveries running at once (`HELIOS_DELIVERIES_IN_FLIGHT`): batch N+1 writes
/// PostgreSQL while batch N fans out.
pub const DEFAULT_DELIVERIES_IN_FLIGHT: usize = 2;
/// Most deliveries running at once.
pub const MAX_DELIVERIES_IN_FLIGHT: usize = 8;

/// How batches are cut.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records per batch.
    pub records: usize,
    /// Most bytes (values, keys, headers) per batch; a single larger record is a batch alone.
    pub bytes: usize,
    /// How long a batch waits to fill after its first record; zero: it closes as soon as
    /// nothing more is waiting.
    pub linger: Duration,
}

/// How fan-out, DLQ and offsets reach Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Records first, offsets after: a crash may fan an event out twice, never lose it.
    AtLeastOnce,
    /// Fan-out, DLQ and offsets in one Kafka transaction (`read_committed` consumers see each
    /// event once). The id is unique per running instance and reused by its restart, so a
    /// restart fences its predecessor (see [`super::txn_id`]).
    Transactional { transactional_id: String },
}

/// Processor settings.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub kafka: KafkaSettings,
    pub topology: Topology,
    /// How batches are cut (records, bytes, linger).
    pub batch: BatchLimits,
    /// Deliveries running at once, each batch's fan-out after the one before's (at least once;
    /// exactly-once runs one at a time: one transaction per producer).
    pub deliveries_in_flight: usize,
    /// At least once, or Kafka transactions around fan-out, DLQ and offsets.
    pub mode: DeliveryMode,
    /// Avro fan-out through this Confluent-compatible schema registry; `None`: JSON values.
    pub schema_registry_url: Option<String>,
    /// Record sizes (from `HELIOS_MAX_BODY_BYTES`).
    pub limits: SizeLimits,
}

impl ProcessorConfig {
    /// The defaults, for a broker and a topology.
    pub fn new(kafka: KafkaSettings, topology: Topology) -> Self {
        ProcessorConfig {
            kafka,
            topology,
            batch: BatchLimits {
                records: DEFAULT_BATCH_RECORDS,
                bytes: DEFAULT_BATCH_BYTES,
                linger: Duration::ZERO,
            },
            deliveries_in_flight: DEFAULT_DELIVERIES_IN_FLIGHT,
            mode: DeliveryMode::AtLeastOnce,
            schema_registry_url: None,
            limits: SizeLimits::default(),
        }
    }
}

/// Processor options (PostgreSQL, Redis, batching).
#[derive(Debug, Clone, clap::Args)]
pub struct ProcessArgs {
    /// PostgreSQL URL, e.g. postgres://helios@db:5432/helios.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// PostgreSQL schema for HELIOS's tables (created if missing); default: the URL's search_path.
    #[arg(long, env = "HELIOS_DB_SCHEMA")]
    pub db_schema: Option<String>,
    /// Apply the migrations at start-up.
    #[arg(long, env = "HELIOS_MIGRATE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub migrate: bool,
    /// Redis URL for dedup marks.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// How long a dedup mark lives.
    #[arg(long, env = "HELIOS_DEDUP_TTL_SECS", default_value_t = 86_400)]
    pub dedup_ttl_secs: u64,
    /// How often the partitions of a partitioned `events` table are maintained (topology.yaml
    /// `events_table`): created ahead, dropped past retention.
    #[arg(long, env = "HELIOS_PARTITION_MAINTENANCE_SECS", default_value_t = 600)]
    pub partition_maintenance_secs: u64,
    /// Prefix of dedup keys in Redis.
    #[arg(long, env = "HELIOS_DEDUP_PREFIX", default_value = "helios:dedup:")]
    pub dedup_prefix: String,
    /// Most raw records per batch.
    #[arg(long, env = "HELIOS_BATCH_SIZE", default_value_t = DEFAULT_BATCH_RECORDS)]
    pub batch_size: usize,
    /// Most bytes (values, keys, headers) per batch, and of the deliveries in flight together;
    /// a single larger record is a batch alone.
    #[arg(long, env = "HELIOS_BATCH_MAX_BYTES", default_value_t = DEFAULT_BATCH_BYTES)]
    pub batch_max_bytes: usize,
    /// How long a batch waits to fill after its first record; 0: it closes as soon as nothing
    /// more is waiting (a quiet stream is written at once, a busy one in large batches).
    #[arg(long, env = "HELIOS_BATCH_LINGER_MS", default_value_t = 0)]
    pub batch_linger_ms: u64,
    /// Batches delivered at once (1–8): batch N+1 is written to PostgreSQL while batch N fans
    /// out, and fans out only after it (per key order and in-order commits kept); 1 delivers one
    /// batch at a time. Exactly-once mode always runs one.
    #[arg(long, env = "HELIOS_DELIVERIES_IN_FLIGHT", default_value_t = DEFAULT_DELIVERIES_IN_FLIGHT)]
    pub deliveries_in_flight: usize,
    /// Exactly-once fan-out: Kafka transactions around fan-out, DLQ and offsets (needs a broker
    /// with transactions; Tansu 0.6.0 has none).
    #[arg(long, env = "HELIOS_EXACTLY_ONCE", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub exactly_once: bool,
    /// Confluent-compatible schema registry: fan-out values become Avro (Confluent wire format).
    #[arg(long, env = "SCHEMA_REGISTRY_URL")]
    pub schema_registry_url: Option<String>,
    /// Transactional id of this instance in exactly-once mode (default: helios-<consumer
    /// group>-<host name>-<slot>, the slot being the lowest one free on this host: unique per
    /// running instance, and taken again by a restarted one, which so fences its predecessor).
    /// Set it only when each instance gets its own stable value (e.g. a StatefulSet pod name).
    #[arg(long, env = "HELIOS_TRANSACTIONAL_ID")]
    pub transactional_id: Option<String>,
}

impl ProcessArgs {
    /// Checks the values that clap cannot.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 {
            bail!("HELIOS_BATCH_SIZE / --batch-size must be at least 1");
        }
        if !(1..=MAX_DELIVERIES_IN_FLIGHT).contains(&self.deliveries_in_flight) {
            bail!(
                "HELIOS_DELIVERIES_IN_FLIGHT / --deliveries-in-flight must be 1 to {MAX_DELIVERIES_IN_FLIGHT}, not {}",
                self.deliveries_in_flight
            );
        }
        if self.batch_max_bytes == 0 {
            bail!("HELIOS_BATCH_MAX_BYTES / --batch-max-bytes must be at least 1");
        }
        if self.dedup_ttl_secs == 0 {
            bail!("HELIOS_DEDUP_TTL_SECS / --dedup-ttl-secs must be at least 1");
        }
        if self.partition_maintenance_secs == 0 {
            bail!("HELIOS_PARTITION_MAINTENANCE_SECS / --partition-maintenance-secs must be at least 1");
        }
        Ok(())
    }
}
