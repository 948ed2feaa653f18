//! `helios process`: a member of the consumer group that turns raw records into canonical events.
//!
//! Batch by batch: consume ([`consume`](super::consume)) → plan ([`plan`](super::plan):
//! normalize, validate, guard, dedup) → deliver ([`deliver`](super::deliver): PostgreSQL, then
//! the fan-out of what it stored, then the DLQ, then mark releases) → commit the offsets that
//! the delivery returned.
//!
//! Pipelined: while batch N is being delivered (a task of its own), batch N+1 is polled and
//! planned. Batch N+1's delivery starts only once N's has finished and N's offsets are committed,
//! so commits stay in order and at most two batches are in flight. A dependency failure pauses
//! the delivery, which retries only what was not acknowledged ([`retry`](super::retry)), while
//! the consumer keeps polling with its partitions paused; a record the sinks refuse for its data
//! goes to the DLQ and never stalls the batch. A rebalance bumps the consumer's generation: a
//! batch polled before it is neither delivered nor committed by this instance (the new owner
//! processes it again from the committed offset; PostgreSQL stays exactly once, the fan-out is
//! at least once).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use super::avro::AvroFanOut;
use super::consume::{Batch, BatchLimits, RawConsumer};
use super::dedup::{DedupKey, DedupStore};
use super::deliver::{Delivered, Delivery, DeliveryMode, Fence, Outputs};
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
pub const DEFAULT_BATCH_RECORDS: usize = 2000;
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
                linger: Duration::ZERO,
            },
            mode: DeliveryMode::AtLeastOnce,
            schema_registry_url: None,
            limits: SizeLimits::default(),
        }
    }
}

/// What deliveries write to, shared with the delivery tasks.
pub struct Sinks<D, S> {
    pub store: S,
    pub dedup: D,
    pub producer: FutureProducer,
    pub topology: Topology,
    pub avro: Option<AvroFanOut>,
    pub replay: Option<ReplaySpec>,
    pub limits: SizeLimits,
    pub mode: DeliveryMode,
    pub stats: Arc<ProcessorStats>,
}

/// A delivery running apart from the consumer.
struct InFlight {
    handle: tokio::task::JoinHandle<Option<Delivered>>,
    generation: u64,
    started: Instant,
}

/// A running processor's parts.
pub struct Processor<D: DedupStore, S: EventStore> {
    cfg: ProcessorConfig,
    consumer: RawConsumer,
    sinks: Arc<Sinks<D, S>>,
    validator: Validator,
    known_topics: HashSet<String>,
    topics_refreshed: Option<Instant>,
    stats: Arc<ProcessorStats>,
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
        crate::metrics::install();
        crate::metrics::zero_processor_series();
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
        let sinks = Arc::new(Sinks {
            store,
            dedup,
            producer,
            topology: cfg.topology.clone(),
            avro,
            replay,
            limits: cfg.limits,
            mode: cfg.mode.clone(),
            stats: stats.clone(),
        });
        Ok(Processor {
            validator: Validator::with_schemas(&cfg.topology, schemas),
            cfg,
            consumer,
            sinks,
            known_topics: HashSet::new(),
            topics_refreshed: None,
            stats,
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

    async fn init_transactions(&self) -> anyhow::Result<()> {
        if let DeliveryMode::Transactional { transactional_id } = &self.cfg.mode {
            let p = self.sinks.producer.clone();
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
        Ok(())
    }

    /// Runs until shutdown: the batch being delivered is finished and committed first.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        self.init_transactions().await?;
        self.refresh_topics(true).await;
        self.report_missing_topics();
        let mut in_flight: Option<InFlight> = None;
        'batches: loop {
            // Until records are waiting, a delivery in flight is committed as soon as it is done
            // (a quiet stream must not leave its last batch uncommitted).
            while let Some(f) = in_flight.as_mut() {
                tokio::select! {
                    r = &mut f.handle => {
                        let f = in_flight.take().expect("in flight");
                        self.commit_delivered(f, r).await;
                    }
                    w = self.consumer.wait_for_record() => {
                        if let Err(e) = w {
                            tracing::warn!(error = %e, "consumer error; polling again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        break;
                    }
                    _ = shutdown.clone().wait() => break 'batches,
                }
            }
            let batch = tokio::select! {
                b = self.consumer.next_batch() => b,
                _ = shutdown.clone().wait() => break,
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    // Broker hiccups surface here; librdkafka reconnects by itself.
                    tracing::warn!(error = %e, "consumer error; polling again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            let started = Instant::now();
            if in_flight.is_some() {
                self.stats.overlapped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("helios_processor_batches_overlapped_total").increment(1);
            }
            let plan = self.plan(&batch.records, &shutdown).await;
            // The previous delivery finishes (and is committed) before this one starts.
            let released = match in_flight.take() {
                Some(f) => self.finish(f).await,
                None => vec![],
            };
            let Some(plan) = plan else {
                break;
            };
            if batch.generation != self.consumer.generation() {
                tracing::info!(records = batch.records.len(), "partitions were revoked: a planned batch is dropped (fetched again from the committed offsets)");
                continue;
            }
            let Some(plan) = self.reclaim(plan, &released, &shutdown).await else {
                break;
            };
            in_flight = Some(self.spawn_delivery(batch, plan, started, &shutdown));
        }
        if let Some(f) = in_flight.take() {
            self.finish(f).await;
        }
        tracing::info!("processor stopping");
        Ok(())
    }

    fn spawn_delivery(
        &self,
        batch: Batch,
        plan: BatchPlan,
        started: Instant,
        shutdown: &Shutdown,
    ) -> InFlight {
        let fence = Fence::new(self.consumer.generation_handle(), batch.generation);
        let group = self.consumer.group_metadata().map(Arc::new);
        let handle = tokio::spawn(deliver(
            self.sinks.clone(),
            batch.records,
            plan,
            group,
            Some(fence),
            shutdown.clone(),
        ));
        InFlight {
            handle,
            generation: batch.generation,
            started,
        }
    }

    /// Waits for a delivery (keeping the group membership alive while it is slow), commits its
    /// offsets if the partitions are still ours, and returns the marks it released.
    async fn finish(&mut self, mut f: InFlight) -> Vec<DedupKey> {
        let result = loop {
            tokio::select! {
                r = &mut f.handle => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    // A slow or retrying delivery: partitions paused, polling on.
                    self.consumer.idle(Duration::from_millis(500)).await;
                }
            }
        };
        self.commit_delivered(f, result).await
    }

    /// Commits a finished delivery (unless its partitions were revoked meanwhile) and counts
    /// it; returns the marks it released.
    async fn commit_delivered(
        &mut self,
        f: InFlight,
        result: Result<Option<Delivered>, tokio::task::JoinError>,
    ) -> Vec<DedupKey> {
        let delivered = match result {
            Ok(Some(d)) => d,
            Ok(None) => return vec![],
            Err(e) => {
                tracing::error!(error = %e, "a delivery task failed; its batch is not committed");
                return vec![];
            }
        };
        if f.generation == self.consumer.generation() {
            // In exactly-once mode the offsets already committed with the transaction;
            // committing the same offsets through the consumer too is harmless there, and is
            // what brokers that drop transactional offset commits (librdkafka's mock cluster)
            // need to resume.
            self.consumer.commit(&delivered).await;
        } else {
            tracing::info!(records = delivered.records.len(), "partitions were revoked while a batch was delivered: not committed (the new owner processes it again)");
        }
        finish_batch(&self.stats, &delivered, f.started);
        delivered.released
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
        let sinks = self.sinks.clone();
        loop {
            match plan::claim(&mut plan, &sinks.dedup, &sinks.store, sinks.replay.as_ref()).await {
                Ok(()) => break,
                Err(e) => {
                    self.stats.retries.fetch_add(1, Ordering::Relaxed);
                    if !retry.after_polling(&e, &mut self.consumer, shutdown).await {
                        return None;
                    }
                }
            }
        }
        tracing::debug!(plan_ms = t0.elapsed().as_millis() as u64, "batch planned");
        Some(plan)
    }

    /// Claims again the held duplicates whose first occurrence the previous batch dead-lettered
    /// (its mark was released meanwhile).
    async fn reclaim(
        &mut self,
        mut plan: BatchPlan,
        released: &[DedupKey],
        shutdown: &Shutdown,
    ) -> Option<BatchPlan> {
        if released.is_empty() || plan.held.is_empty() {
            return Some(plan);
        }
        let released: HashSet<DedupKey> = released.iter().cloned().collect();
        let mut retry = Retry::new("plan");
        let sinks = self.sinks.clone();
        loop {
            match plan::reclaim(&mut plan, &released, &sinks.dedup).await {
                Ok(()) => return Some(plan),
                Err(e) => {
                    if !retry.after_polling(&e, &mut self.consumer, shutdown).await {
                        return None;
                    }
                }
            }
        }
    }

    fn prepare(&self, records: &[RawRecord]) -> BatchPlan {
        plan::prepare(
            records,
            &PlanContext {
                validator: &self.validator,
                existing_topics: &self.known_topics,
                topology: &self.cfg.topology,
                replay: self.sinks.replay.as_ref(),
                limits: &self.cfg.limits,
                avro: self.sinks.avro.is_some(),
            },
        )
    }

    /// Processes `ranges` (topic, partition, start offset, end offset exclusive) once, then
    /// returns: `Ok(true)` when every range was processed, `Ok(false)` when interrupted.
    /// `progress(done, total)` is called after each batch; `max_rate` caps records per second.
    /// Serial: a replay has no group to stay alive in and no commits to order.
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
        let dry_run = self.sinks.replay.as_ref().is_some_and(|r| r.dry_run);
        while !remaining.is_empty() {
            let batch = tokio::select! {
                b = tokio::time::timeout(Duration::from_secs(60), self.consumer.next_batch()) => match b {
                    Ok(b) => b?.records,
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
                let Some(d) = deliver(
                    self.sinks.clone(),
                    batch,
                    plan,
                    None,
                    None,
                    shutdown.clone(),
                )
                .await
                else {
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

/// Delivers a planned batch, retrying (only what was not acknowledged) while a dependency is
/// unavailable. `None`: shutdown came first, or the partitions were revoked meanwhile (`fence`);
/// nothing is committed then.
async fn deliver<D: DedupStore, S: EventStore>(
    sinks: Arc<Sinks<D, S>>,
    records: Vec<RawRecord>,
    plan: BatchPlan,
    group: Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>>,
    fence: Option<Fence>,
    shutdown: Shutdown,
) -> Option<Delivered> {
    let outputs = Outputs {
        store: &sinks.store,
        dedup: &sinks.dedup,
        producer: &sinks.producer,
        topology: &sinks.topology,
        avro: sinks.avro.as_ref(),
        replay: sinks.replay.as_ref(),
        limits: &sinks.limits,
        group,
        fence: fence.clone(),
    };
    let mut delivery = Delivery::new(records, plan);
    let mut retry = Retry::new("deliver");
    loop {
        match delivery.run(&outputs, &sinks.mode).await {
            Ok(()) => return Some(delivery.finish()),
            Err(e) => {
                if fence.as_ref().is_some_and(|f| !f.holds()) {
                    tracing::info!("partitions were revoked while a batch was retried: it is left to the new owner");
                    return None;
                }
                sinks.stats.retries.fetch_add(1, Ordering::Relaxed);
                if !retry.after(&e, &shutdown).await {
                    return None;
                }
            }
        }
    }
}

/// Metrics, totals and a debug line for a committed batch.
fn finish_batch(stats: &ProcessorStats, d: &Delivered, started: Instant) {
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
