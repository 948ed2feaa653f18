//! `helios process`: a member of the consumer group that turns raw records into canonical events.
//!
//! Batch by batch: consume ([`consume`](super::consume)) → plan ([`plan`](super::plan):
//! normalize, validate, guard, dedup) → deliver ([`deliver`](super::deliver): PostgreSQL, then
//! the fan-out of what it stored, then the DLQ, then mark releases) → commit the offsets that
//! the delivery returned. A dependency failure pauses the batch and retries the same work with
//! backoff ([`retry`](super::retry)) while the consumer keeps polling; a record the sinks refuse
//! for its data goes to the DLQ and never stalls the batch. Rebalances happen between batches
//! (or while a batch is paused): a batch is finished and committed before the consumer fetches
//! more.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use super::avro::AvroFanOut;
use super::consume::{BatchLimits, RawConsumer};
use super::dedup::DedupStore;
use super::deliver::{Delivered, Delivery, DeliveryMode, Outputs};
use super::plan::{self, BatchPlan, PlanContext, ReplaySpec};
use super::retry::Retry;
use super::stats::{record_metrics, ProcessorStats};
use super::validate::Validator;
use crate::config::KafkaSettings;
use crate::db::EventStore;
use crate::limits::SizeLimits;
use crate::model::RawRecord;
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::topology::Topology;

/// Processor settings.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub kafka: KafkaSettings,
    pub topology: Topology,
    /// How batches are cut (records, bytes, linger).
    pub batch: BatchLimits,
    /// At least once, or Kafka transactions around fan-out, DLQ and offsets.
    pub mode: DeliveryMode,
    /// Avro fan-out through this Confluent-compatible schema registry; `None`: JSON values.
    pub schema_registry_url: Option<String>,
    /// Record sizes (from `HELIOS_MAX_BODY_BYTES`).
    pub limits: SizeLimits,
}

/// Default most raw records per batch.
pub const DEFAULT_BATCH_RECORDS: usize = 1000;
/// Default most bytes per batch (`HELIOS_BATCH_MAX_BYTES`).
pub const DEFAULT_BATCH_BYTES: usize = 16 * 1024 * 1024;

impl ProcessorConfig {
    /// The defaults, for a broker and a topology.
    pub fn new(kafka: KafkaSettings, topology: Topology) -> Self {
        ProcessorConfig {
            kafka,
            topology,
            batch: BatchLimits {
                records: DEFAULT_BATCH_RECORDS,
                bytes: DEFAULT_BATCH_BYTES,
                linger: Duration::from_millis(50),
            },
            mode: DeliveryMode::AtLeastOnce,
            schema_registry_url: None,
            limits: SizeLimits::default(),
        }
    }
}

/// A running processor's parts.
pub struct Processor<D: DedupStore, S: EventStore> {
    cfg: ProcessorConfig,
    consumer: RawConsumer,
    producer: FutureProducer,
    dedup: D,
    store: S,
    validator: Validator,
    known_topics: HashSet<String>,
    topics_refreshed: Option<Instant>,
    stats: Arc<ProcessorStats>,
    avro: Option<AvroFanOut>,
    replay: Option<ReplaySpec>,
}

impl<D: DedupStore, S: EventStore> Processor<D, S> {
    /// Joins the consumer group and subscribes to the raw topics.
    pub fn new(cfg: ProcessorConfig, dedup: D, store: S) -> anyhow::Result<Self> {
        Self::build(cfg, dedup, store, None)
    }

    /// A replay runner: its own consumer (assigned partitions, never the live group), the same
    /// pipeline. Run it with [`Processor::run_replay`].
    pub fn for_replay(
        cfg: ProcessorConfig,
        dedup: D,
        store: S,
        spec: ReplaySpec,
    ) -> anyhow::Result<Self> {
        Self::build(cfg, dedup, store, Some(spec))
    }

    fn build(
        mut cfg: ProcessorConfig,
        dedup: D,
        store: S,
        replay: Option<ReplaySpec>,
    ) -> anyhow::Result<Self> {
        if let Some(r) = &replay {
            // Never the live group: a replay must not take partitions from the processors.
            cfg.topology.consumer_group =
                format!("{}-replay-{}", cfg.topology.consumer_group, r.replay_id);
            cfg.mode = DeliveryMode::AtLeastOnce;
        }
        let transactional = matches!(cfg.mode, DeliveryMode::Transactional { .. });
        let stats = Arc::new(ProcessorStats::default());
        let consumer = RawConsumer::new(
            &cfg.kafka,
            &cfg.topology.consumer_group,
            transactional,
            cfg.batch,
            stats.rebalances.clone(),
        )?;
        if replay.is_none() {
            let topics: Vec<String> = Source::ALL
                .iter()
                .map(|s| cfg.topology.raw_topic(*s))
                .collect();
            consumer.subscribe(&topics)?;
            tracing::info!(group = %cfg.topology.consumer_group, topics = ?topics, "processor subscribed");
        }
        let producer = output_producer_with(&cfg.kafka, &cfg.mode, &cfg.limits)?;
        let schemas = super::schema::SchemaSet::load(&cfg.topology)?;
        let avro = match cfg
            .schema_registry_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            Some(url) => Some(AvroFanOut::new(url)?),
            None => None,
        };
        Ok(Processor {
            validator: Validator::with_schemas(&cfg.topology, schemas),
            cfg,
            consumer,
            producer,
            dedup,
            store,
            known_topics: HashSet::new(),
            topics_refreshed: None,
            stats,
            avro,
            replay,
        })
    }

    /// This instance's running totals.
    pub fn stats(&self) -> Arc<ProcessorStats> {
        self.stats.clone()
    }

    async fn refresh_topics(&mut self, force: bool) {
        let stale = self
            .topics_refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(if force { 5 } else { 60 }));
        if stale {
            if let Some(t) = self.consumer.topics().await {
                self.known_topics = t;
                self.topics_refreshed = Some(Instant::now());
            }
        }
    }

    /// Runs until shutdown: the batch in hand is finished and committed first.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        if let DeliveryMode::Transactional { transactional_id } = &self.cfg.mode {
            let p = self.producer.clone();
            // Fences a crashed predecessor with the same id and aborts its open transaction.
            tokio::task::spawn_blocking(move || {
                rdkafka::producer::Producer::init_transactions(&p, Duration::from_secs(30))
            })
            .await?
            .map_err(|e| {
                anyhow::anyhow!(
                    "exactly-once: init_transactions for `{transactional_id}` failed: {e}"
                )
            })?;
            tracing::info!(transactional_id = %transactional_id, "exactly-once mode: fan-out, DLQ and offsets commit atomically");
        }
        self.refresh_topics(true).await;
        self.report_missing_topics();
        let mut stats = self.stats.clone();
        loop {
            let records = tokio::select! {
                b = self.consumer.next_batch() => match b {
                    Ok(b) => b,
                    Err(e) => {
                        // Broker hiccups surface here; librdkafka reconnects by itself.
                        tracing::warn!(error = %e, "consumer error; polling again");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        continue;
                    }
                },
                _ = shutdown.clone().wait() => break,
            };
            let started = Instant::now();
            let Some(plan) = self.plan(&records, &shutdown).await else {
                break;
            };
            let Some(delivered) = self.deliver(records, plan, &shutdown).await else {
                break;
            };
            // In exactly-once mode the offsets already committed with the transaction;
            // committing the same offsets through the consumer too is harmless there, and is
            // what brokers that drop transactional offset commits (librdkafka's mock cluster)
            // need to resume.
            self.consumer.commit(&delivered).await;
            finish_batch(&mut stats, &delivered, started);
        }
        tracing::info!("processor stopping");
        Ok(())
    }

    fn report_missing_topics(&self) {
        let missing: Vec<String> = self
            .cfg
            .topology
            .planned_topics()
            .into_iter()
            .map(|t| t.name)
            .filter(|t| !self.known_topics.contains(t))
            .collect();
        if !missing.is_empty() && !self.known_topics.is_empty() {
            // Writes to a missing topic fail and the batch is retried until it exists.
            tracing::error!(
                ?missing,
                "topics of topology.yaml are missing on the broker: run `helios topology apply`"
            );
        }
    }

    /// Plans a batch: prepared purely (again after a topic-list refresh when a type's topic
    /// was unknown), then the dedup claims, retried while the dedup store is unavailable.
    async fn plan(&mut self, records: &[RawRecord], shutdown: &Shutdown) -> Option<BatchPlan> {
        let t0 = Instant::now();
        let mut plan = self.prepare(records);
        if plan.has_unknown_types() {
            // A topic may have been created since the last look: check once more before DLQ'ing.
            self.refresh_topics(true).await;
            plan = self.prepare(records);
        }
        let mut retry = Retry::new("plan");
        loop {
            match plan::claim(&mut plan, &self.dedup, &self.store, self.replay.as_ref()).await {
                Ok(()) => break,
                Err(e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !retry.after(&e, &mut self.consumer, shutdown).await {
                        return None;
                    }
                }
            }
        }
        tracing::debug!(plan_ms = t0.elapsed().as_millis() as u64, "batch planned");
        Some(plan)
    }

    fn prepare(&self, records: &[RawRecord]) -> BatchPlan {
        plan::prepare(
            records,
            &PlanContext {
                validator: &self.validator,
                existing_topics: &self.known_topics,
                topology: &self.cfg.topology,
                replay: self.replay.as_ref(),
                limits: &self.cfg.limits,
                avro: self.avro.is_some(),
            },
        )
    }

    /// Delivers a planned batch, retrying (only what was not acknowledged) while a dependency
    /// is unavailable. `None`: shutdown came first; nothing is committed.
    async fn deliver(
        &mut self,
        records: Vec<RawRecord>,
        plan: BatchPlan,
        shutdown: &Shutdown,
    ) -> Option<Delivered> {
        let outputs = Outputs {
            store: &self.store,
            dedup: &self.dedup,
            producer: &self.producer,
            topology: &self.cfg.topology,
            avro: self.avro.as_ref(),
            replay: self.replay.as_ref(),
            limits: &self.cfg.limits,
            group: self.consumer.group_metadata().map(Arc::new),
        };
        let mut delivery = Delivery::new(records, plan);
        let mut retry = Retry::new("deliver");
        loop {
            match delivery.run(&outputs, &self.cfg.mode).await {
                Ok(()) => return Some(delivery.finish()),
                Err(e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !retry.after(&e, &mut self.consumer, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    /// Processes `ranges` (topic, partition, start offset, end offset exclusive) once, then
    /// returns: `Ok(true)` when every range was processed, `Ok(false)` when interrupted.
    /// `progress(done, total)` is called after each batch; `max_rate` caps records per second.
    pub async fn run_replay(
        mut self,
        ranges: &[(String, i32, i64, i64)],
        shutdown: Shutdown,
        max_rate: Option<u64>,
        mut progress: impl FnMut(u64, u64),
    ) -> anyhow::Result<bool> {
        let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        let mut total = 0u64;
        for (t, p, start, end) in ranges {
            if end > start {
                tpl.add_partition_offset(t, *p, Offset::Offset(*start))?;
                remaining.insert((t.clone(), *p), *end);
                total += (end - start) as u64;
            }
        }
        if remaining.is_empty() {
            return Ok(true);
        }
        self.consumer.assign(&tpl)?;
        self.refresh_topics(true).await;
        let started = Instant::now();
        let mut done = 0u64;
        let dry_run = self.replay.as_ref().is_some_and(|r| r.dry_run);
        while !remaining.is_empty() {
            let batch = tokio::select! {
                b = tokio::time::timeout(Duration::from_secs(60), self.consumer.next_batch()) => match b {
                    Ok(b) => b?,
                    Err(_) => anyhow::bail!("no records arrived for 60 s with {} partition(s) unfinished", remaining.len()),
                },
                _ = shutdown.clone().wait() => return Ok(false),
            };
            let batch = self.within_ranges(batch, &mut remaining);
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            let Some(plan) = self.plan(&batch, &shutdown).await else {
                return Ok(false);
            };
            if dry_run {
                self.stats.add(&batch, &plan);
            } else {
                let Some(d) = self.deliver(batch, plan, &shutdown).await else {
                    return Ok(false);
                };
                record_metrics(&d.records, &d.plan, d.rows_inserted);
                self.stats.add(&d.records, &d.plan);
            }
            done += n;
            progress(done, total);
            if let Some(rate) = max_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::select! {
                        _ = tokio::time::sleep(due - elapsed) => {},
                        _ = shutdown.clone().wait() => return Ok(false),
                    }
                }
            }
        }
        Ok(true)
    }

    /// The records of a replay batch inside their ranges, in order; partitions whose range
    /// is done are unassigned.
    fn within_ranges(
        &self,
        batch: Vec<RawRecord>,
        remaining: &mut HashMap<(String, i32), i64>,
    ) -> Vec<RawRecord> {
        let mut batch: Vec<RawRecord> = batch
            .into_iter()
            .filter(|r| {
                remaining
                    .get(&(r.topic.clone(), r.partition))
                    .is_some_and(|end| r.offset < *end)
            })
            .collect();
        batch.sort_by(|a, b| {
            (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset))
        });
        for r in &batch {
            let key = (r.topic.clone(), r.partition);
            if remaining.get(&key).is_some_and(|end| r.offset + 1 >= *end) {
                remaining.remove(&key);
                self.consumer.unassign(&r.topic, r.partition);
            }
        }
        batch
    }
}

/// Metrics, totals and a debug line for a committed batch.
fn finish_batch(stats: &mut Arc<ProcessorStats>, d: &Delivered, started: Instant) {
    record_metrics(&d.records, &d.plan, d.rows_inserted);
    stats.add(&d.records, &d.plan);
    tracing::debug!(
        records = d.records.len(),
        ms = started.elapsed().as_millis() as u64,
        "batch done"
    );
    metrics::histogram!("helios_processor_batch_duration_seconds")
        .record(started.elapsed().as_secs_f64());
    metrics::histogram!("helios_processor_batch_records").record(d.records.len() as f64);
}

/// Creates the fan-out/DLQ producer (at least once).
pub fn output_producer(
    kafka: &KafkaSettings,
    limits: &SizeLimits,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    output_producer_with(kafka, &DeliveryMode::AtLeastOnce, limits)
}

/// Creates the fan-out/DLQ producer for `mode`, allowing records up to the output limit.
pub fn output_producer_with(
    kafka: &KafkaSettings,
    mode: &DeliveryMode,
    limits: &SizeLimits,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    let mut cfg = kafka.client_config();
    for (k, v) in [
        ("client.id", "helios-processor"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        ("enable.idempotence", "false"),
        ("message.timeout.ms", "30000"),
    ] {
        if !kafka.properties.contains_key(k) {
            cfg.set(k, v);
        }
    }
    if let DeliveryMode::Transactional { transactional_id } = mode {
        cfg.set("transactional.id", transactional_id);
        cfg.set("enable.idempotence", "true");
        let txn_timeout: u64 = kafka
            .properties
            .get("transaction.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60_000);
        cfg.set("transaction.timeout.ms", txn_timeout.to_string());
        // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
        if !kafka.properties.contains_key("message.timeout.ms") {
            cfg.set("message.timeout.ms", txn_timeout.min(30_000).to_string());
        }
    }
    // Every DLQ copy of a raw record fits; fan-out records are checked against the same limit
    // before they are sent (see crate::limits).
    cfg.set("message.max.bytes", limits.output_record_max().to_string());
    cfg.set("acks", "all");
    cfg.create()
}
