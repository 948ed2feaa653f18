//! `helios process`: a member of the consumer group that turns raw records into canonical events.
//!
//! Batch by batch: consume → normalize → dedup (in the batch, then the store) → validate →
//! {PostgreSQL insert, fan-out records, DLQ records} concurrently → all acknowledged →
//! commit the batch's offsets. A failure of Redis, PostgreSQL or Kafka retries the *same* batch
//! with backoff; nothing is committed past a record that was not fully processed, so a crash at
//! any instant loses nothing (PostgreSQL is idempotent on `(source, event_id)`; fan-out is at
//! least once). Rebalances happen between batches: a batch is finished and committed before the
//! consumer polls again, which is when librdkafka hands partitions over.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::SecondsFormat;
use futures::future::join_all;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::dedup::{Claim, DedupStore};
use super::event::CanonicalEvent;
use super::normalize::{normalize, DlqReason, Normalized, RawRecord};
use super::validate::{Rejection, Validator};
use crate::config::KafkaSettings;
use crate::db::EventStore;
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::topology::Topology;

/// Processor settings.
#[derive(Debug, Clone)]
pub struct ProcessorConfig {
    pub kafka: KafkaSettings,
    pub topology: Topology,
    /// Most records per batch.
    pub batch_size: usize,
    /// How long a batch waits to fill after its first record.
    pub linger: Duration,
    /// Exactly-once mode: the transactional id of this instance (stable across restarts, so a
    /// restarted instance fences its crashed predecessor). `None`: at-least-once fan-out.
    pub transactional_id: Option<String>,
    /// Avro fan-out through this Confluent-compatible schema registry; `None`: JSON values.
    pub schema_registry_url: Option<String>,
}

/// DLQ header names.
pub mod dlq_headers {
    pub const REASON: &str = "helios-dlq-reason";
    pub const DETAIL: &str = "helios-dlq-detail";
    pub const STAGE: &str = "helios-dlq-stage";
    pub const FIELD: &str = "helios-dlq-field";
    pub const EVENT_INDEX: &str = "helios-dlq-event-index";
    pub const RAW_TOPIC: &str = "helios-dlq-raw-topic";
    pub const RAW_PARTITION: &str = "helios-dlq-raw-partition";
    pub const RAW_OFFSET: &str = "helios-dlq-raw-offset";
    pub const FAILED_AT: &str = "helios-dlq-failed-at";
    pub const SCHEMA_SUBJECT: &str = "helios-dlq-schema-subject";
    pub const SCHEMA_VERSION: &str = "helios-dlq-schema-version";
}

/// One DLQ record to write: the raw record unchanged, plus why.
#[derive(Debug, Clone)]
pub struct DlqItem {
    pub record: usize,
    pub reason: DlqReason,
    pub stage: &'static str,
    pub detail: String,
    pub field: Option<String>,
    pub index: Option<u32>,
    /// For schema violations: (subject, version).
    pub schema: Option<(String, String)>,
}

/// What a batch produced (before any write).
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub events: Vec<CanonicalEvent>,
    pub dlq: Vec<DlqItem>,
    pub duplicates: Vec<Source>,
    pub handshakes: Vec<Source>,
    /// Units that entered the pipeline per source: events parsed + unreadable records.
    pub units_in: Vec<Source>,
    /// Records or events left out by a replay's filters.
    pub filtered: u64,
}

/// Consumer context: logs rebalances, exports consumer lag from librdkafka's statistics.
pub struct ProcessorContext;

impl ClientContext for ProcessorContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("helios_processor_consumer_lag", "topic" => topic.clone(), "partition" => p.to_string())
                    .set(part.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Revoke(tpl) => tracing::info!(
                partitions = tpl.count(),
                "partitions revoked (the batch in hand was committed)"
            ),
            Rebalance::Assign(tpl) => {
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Running totals of one processor instance (the metrics' per-instance twin, for tests and
/// the benchmark). The invariant: `units_in == events_out + duplicates + dlq`.
#[derive(Debug, Default)]
pub struct ProcessorStats {
    pub raw_records: AtomicU64,
    pub units_in: AtomicU64,
    pub events_out: AtomicU64,
    pub duplicates: AtomicU64,
    pub dlq: AtomicU64,
    pub handshakes: AtomicU64,
    pub batches: AtomicU64,
    pub filtered: AtomicU64,
    /// Events out by type, DLQ by reason (for reports).
    pub by_type: std::sync::Mutex<BTreeMap<String, u64>>,
    pub dlq_by_reason: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl ProcessorStats {
    fn add(&self, batch: &[RawRecord], plan: &BatchPlan) {
        self.raw_records
            .fetch_add(batch.len() as u64, Ordering::Relaxed);
        self.units_in
            .fetch_add(plan.units_in.len() as u64, Ordering::Relaxed);
        self.events_out
            .fetch_add(plan.events.len() as u64, Ordering::Relaxed);
        self.duplicates
            .fetch_add(plan.duplicates.len() as u64, Ordering::Relaxed);
        self.dlq.fetch_add(plan.dlq.len() as u64, Ordering::Relaxed);
        self.handshakes
            .fetch_add(plan.handshakes.len() as u64, Ordering::Relaxed);
        self.batches.fetch_add(1, Ordering::Relaxed);
        self.filtered.fetch_add(plan.filtered, Ordering::Relaxed);
        let mut t = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        for (k, n) in tally(plan.events.iter().map(|e| e.event_type.as_str())) {
            *t.entry(k.to_string()).or_default() += n;
        }
        let mut d = self.dlq_by_reason.lock().unwrap_or_else(|p| p.into_inner());
        for (k, n) in tally(plan.dlq.iter().map(|x| x.reason.as_str())) {
            *d.entry(k.to_string()).or_default() += n;
        }
    }

    /// (raw records, units in, events out, duplicates, dlq)
    pub fn snapshot(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.raw_records.load(Ordering::Relaxed),
            self.units_in.load(Ordering::Relaxed),
            self.events_out.load(Ordering::Relaxed),
            self.duplicates.load(Ordering::Relaxed),
            self.dlq.load(Ordering::Relaxed),
        )
    }
}

/// A running processor's parts.
pub struct Processor<D: DedupStore, S: EventStore> {
    cfg: ProcessorConfig,
    consumer: Arc<StreamConsumer<ProcessorContext>>,
    producer: FutureProducer,
    dedup: D,
    store: S,
    validator: Validator,
    known_topics: HashSet<String>,
    topics_refreshed: Option<Instant>,
    stats: Arc<ProcessorStats>,
    avro: Option<super::avro::AvroFanOut>,
    replay: Option<ReplaySpec>,
}

fn to_raw(m: &BorrowedMessage<'_>) -> RawRecord {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    RawRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().unwrap_or_default().to_vec(),
        headers,
    }
}

/// Turns a batch of raw records into the plan of writes (pure apart from the dedup store).
/// How a replay treats events already processed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupPolicy {
    /// Events already processed (a row exists, or another raw record owns the mark) are skipped
    /// and counted as duplicates; the rest is processed as live processing would.
    Respect,
    /// Everything is processed again: rows are replaced with the new normalization, fan-out
    /// records are emitted again (marked with `helios-replay-id`).
    Bypass,
}

/// What makes a replay run different from live processing.
#[derive(Debug, Clone)]
pub struct ReplaySpec {
    pub replay_id: String,
    pub policy: DedupPolicy,
    pub dry_run: bool,
    /// Only these sources (empty: all).
    pub sources: Vec<Source>,
    /// Only these event types (empty: all).
    pub event_types: Vec<String>,
}

/// Everything planning a batch reads.
pub struct PlanContext<'a, D, S> {
    pub dedup: &'a D,
    pub store: &'a S,
    pub validator: &'a Validator,
    pub existing_topics: &'a HashSet<String>,
    pub topology: &'a Topology,
    pub replay: Option<&'a ReplaySpec>,
}

/// The owner a raw record claims dedup marks with: its own position, or for a record redriven
/// from the DLQ, the position of the raw record it copies (so it takes over that record's marks).
fn mark_owner(raw: &RawRecord, e: &CanonicalEvent) -> String {
    match raw.header(REDRIVE_OF) {
        Some(orig) => format!("{orig}/{}", e.raw.index),
        None => e.raw.owner(),
    }
}

/// Header set on records redriven from the DLQ: `topic/partition/offset` of the original raw record.
pub const REDRIVE_OF: &str = "helios-redrive-of";
/// Header counting how many times a record was redriven.
pub const REDRIVE_COUNT: &str = "helios-redrive-count";

/// Turns a batch of raw records into the plan of writes (pure apart from the dedup store and,
/// for replays, the event store's existence check).
pub async fn plan_batch<D: DedupStore, S: EventStore>(
    records: &[RawRecord],
    ctx: &PlanContext<'_, D, S>,
) -> Result<BatchPlan, BatchError> {
    let mut plan = BatchPlan::default();
    let mut candidates: Vec<(usize, CanonicalEvent)> = vec![];
    for (i, raw) in records.iter().enumerate() {
        let source = raw
            .header(crate::ingress::landing::headers::SOURCE)
            .and_then(Source::parse)
            .unwrap_or(Source::Direct);
        if let Some(r) = ctx.replay {
            if !r.sources.is_empty() && !r.sources.contains(&source) {
                plan.filtered += 1;
                continue;
            }
        }
        match normalize(raw) {
            Normalized::Handshake => plan.handshakes.push(source),
            Normalized::Failed(e) => {
                plan.units_in.push(source);
                plan.dlq.push(DlqItem {
                    record: i,
                    reason: e.reason,
                    stage: if e.reason == DlqReason::InvalidJson {
                        "parse"
                    } else {
                        "normalize"
                    },
                    detail: e.detail,
                    field: None,
                    index: e.index,
                    schema: None,
                });
            }
            Normalized::Events(results) => {
                for r in results {
                    if let (Some(spec), Ok(ev)) = (ctx.replay, &r) {
                        if !spec.event_types.is_empty()
                            && !spec.event_types.contains(&ev.event_type)
                        {
                            plan.filtered += 1;
                            continue;
                        }
                    }
                    plan.units_in.push(source);
                    match r {
                        Ok(ev) => candidates.push((i, ev)),
                        Err(e) => plan.dlq.push(DlqItem {
                            record: i,
                            reason: e.reason,
                            stage: "normalize",
                            detail: e.detail,
                            field: None,
                            index: e.index,
                            schema: None,
                        }),
                    }
                }
            }
        }
    }
    // Duplicates inside the batch never reach the store; the first occurrence claims.
    // Each key is computed once: it is both the in-batch check and the Redis claim.
    let mut seen = HashSet::new();
    let mut firsts = vec![];
    let mut claims_in: Vec<(String, String)> = vec![];
    for (i, ev) in candidates {
        let key = ev.dedup_key();
        if seen.insert(key.clone()) {
            claims_in.push((key, mark_owner(&records[i], &ev)));
            firsts.push((i, ev));
        } else {
            plan.duplicates.push(ev.source);
        }
    }
    let is_dup: Vec<bool> = match ctx.replay {
        None => ctx
            .dedup
            .claim(&claims_in)
            .await?
            .into_iter()
            .map(|c| matches!(c, Claim::Duplicate { .. }))
            .collect(),
        Some(spec) if spec.policy == DedupPolicy::Bypass => vec![false; firsts.len()],
        Some(spec) => {
            // Respect: already processed = a row exists, or another raw record owns the mark.
            // (A replayed record meets its own mark: that alone does not make it a duplicate,
            // so events that were DLQ'd before a fix are processed again.)
            let keys: Vec<(String, String)> = firsts
                .iter()
                .map(|(_, e)| (e.source.as_str().to_string(), e.event_id.clone()))
                .collect();
            let stored = ctx.store.existing(&keys).await?;
            let foreign: Vec<bool> = if spec.dry_run {
                let k: Vec<String> = claims_in.iter().map(|(k, _)| k.clone()).collect();
                ctx.dedup
                    .peek(&k)
                    .await?
                    .into_iter()
                    .zip(&claims_in)
                    .map(|(o, (_, own))| o.is_some_and(|o| &o != own))
                    .collect()
            } else {
                ctx.dedup
                    .claim(&claims_in)
                    .await?
                    .into_iter()
                    .map(|c| matches!(c, Claim::Duplicate { .. }))
                    .collect()
            };
            keys.iter()
                .zip(foreign)
                .map(|(k, f)| f || stored.contains(k))
                .collect()
        }
    };
    for ((i, ev), dup) in firsts.into_iter().zip(is_dup) {
        if dup {
            plan.duplicates.push(ev.source);
            continue;
        }
        match ctx
            .validator
            .check(&ev, ctx.existing_topics, |t| ctx.topology.event_topic(t))
        {
            Ok(()) => plan.events.push(ev),
            Err(Rejection {
                reason,
                stage,
                detail,
                field,
                schema,
            }) => plan.dlq.push(DlqItem {
                record: i,
                reason,
                stage,
                detail,
                field,
                index: Some(ev.raw.index),
                schema,
            }),
        }
    }
    Ok(plan)
}

/// The fan-out record's headers: CloudEvents binary mode plus lineage.
fn event_headers(e: &CanonicalEvent, content_type: &str, replay_id: Option<&str>) -> OwnedHeaders {
    let time = e.occurred_at.to_rfc3339_opts(SecondsFormat::Millis, true);
    let source = format!("/helios/{}", e.source.as_str());
    let partition = e.raw.partition.to_string();
    let offset = e.raw.offset.to_string();
    let index = e.raw.index.to_string();
    let pairs: [(&str, &str); 11] = [
        ("ce_specversion", "1.0"),
        ("ce_id", &e.event_id),
        ("ce_source", &source),
        ("ce_type", &e.event_type),
        ("ce_time", &time),
        ("content-type", content_type),
        ("helios-source", e.source.as_str()),
        ("helios-raw-topic", &e.raw.topic),
        ("helios-raw-partition", &partition),
        ("helios-raw-offset", &offset),
        ("helios-raw-index", &index),
    ];
    let mut h = OwnedHeaders::new_with_capacity(pairs.len());
    for (k, v) in pairs {
        h = h.insert(Header {
            key: k,
            value: Some(v),
        });
    }
    if let Some(id) = replay_id {
        h = h.insert(Header {
            key: REPLAY_ID,
            value: Some(id),
        });
    }
    h
}

/// Header on records (re-)emitted by `helios replay`.
pub const REPLAY_ID: &str = "helios-replay-id";

fn dlq_record_headers(raw: &RawRecord, item: &DlqItem) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(raw.headers.len() + 9);
    for (k, v) in &raw.headers {
        if !k.starts_with("helios-dlq-") {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
    }
    let partition = raw.partition.to_string();
    let offset = raw.offset.to_string();
    let now = chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut pairs: Vec<(&str, String)> = vec![
        (dlq_headers::REASON, item.reason.as_str().to_string()),
        (dlq_headers::STAGE, item.stage.to_string()),
        (dlq_headers::DETAIL, item.detail.clone()),
        (dlq_headers::RAW_TOPIC, raw.topic.clone()),
        (dlq_headers::RAW_PARTITION, partition),
        (dlq_headers::RAW_OFFSET, offset),
        (dlq_headers::FAILED_AT, now),
    ];
    if let Some(f) = &item.field {
        pairs.push((dlq_headers::FIELD, f.clone()));
    }
    if let Some(i) = item.index {
        pairs.push((dlq_headers::EVENT_INDEX, i.to_string()));
    }
    if let Some((subject, version)) = &item.schema {
        pairs.push((dlq_headers::SCHEMA_SUBJECT, subject.clone()));
        pairs.push((dlq_headers::SCHEMA_VERSION, version.clone()));
    }
    for (k, v) in &pairs {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_str()),
        });
    }
    h
}

/// Why a batch must be retried.
#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Dedup(#[from] super::dedup::DedupError),
    #[error(transparent)]
    Store(#[from] crate::db::StoreError),
    #[error(transparent)]
    Registry(#[from] super::avro::RegistryError),
    #[error("Kafka did not acknowledge {failed} of {total} fan-out/DLQ records: {first}")]
    Produce {
        failed: usize,
        total: usize,
        first: String,
    },
}

impl BatchError {
    fn stage(&self) -> &'static str {
        match self {
            BatchError::Dedup(_) => "dedup",
            BatchError::Store(_) => "postgres",
            BatchError::Produce { .. } => "kafka",
            BatchError::Registry(_) => "schema_registry",
        }
    }
}

/// Creates the fan-out/DLQ producer.
pub fn output_producer(
    kafka: &KafkaSettings,
) -> Result<FutureProducer, rdkafka::error::KafkaError> {
    output_producer_with(kafka, None)
}

/// Creates the fan-out/DLQ producer, transactional when `transactional_id` is given.
pub fn output_producer_with(
    kafka: &KafkaSettings,
    transactional_id: Option<&str>,
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
    if let Some(id) = transactional_id {
        cfg.set("transactional.id", id);
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
    cfg.set("acks", "all");
    cfg.create()
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
            cfg.transactional_id = None;
        }
        let mut c = cfg.kafka.client_config();
        for (k, v) in [
            ("client.id", "helios-processor"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("session.timeout.ms", "15000"),
            // Bound the prefetch queue so memory stays flat whatever the backlog
            // (librdkafka's defaults allow ~1 GB of prefetched records).
            ("queued.max.messages.kbytes", "16384"),
            ("queued.min.messages", "10000"),
        ] {
            if !cfg.kafka.properties.contains_key(k) {
                c.set(k, v);
            }
        }
        c.set("group.id", &cfg.topology.consumer_group);
        c.set("enable.auto.commit", "false");
        if cfg.transactional_id.is_some() {
            c.set("isolation.level", "read_committed");
        }
        c.set("enable.auto.offset.store", "false");
        let consumer: StreamConsumer<ProcessorContext> = c.create_with_context(ProcessorContext)?;
        if replay.is_none() {
            let topics: Vec<String> = Source::ALL
                .iter()
                .map(|s| cfg.topology.raw_topic(*s))
                .collect();
            let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
            consumer.subscribe(&refs)?;
            tracing::info!(group = %cfg.topology.consumer_group, topics = ?topics, "processor subscribed");
        }
        let producer = output_producer_with(&cfg.kafka, cfg.transactional_id.as_deref())?;
        let schemas = super::schema::SchemaSet::load(&cfg.topology)?;
        let cfg_registry = cfg
            .schema_registry_url
            .clone()
            .filter(|u| !u.trim().is_empty());
        Ok(Processor {
            validator: Validator::with_schemas(&cfg.topology, schemas),
            cfg,
            consumer: Arc::new(consumer),
            producer,
            dedup,
            store,
            known_topics: HashSet::new(),
            topics_refreshed: None,
            stats: Arc::new(ProcessorStats::default()),
            avro: match &cfg_registry {
                Some(url) => Some(super::avro::AvroFanOut::new(url)?),
                None => None,
            },
            replay,
        })
    }

    async fn plan(&self, batch: &[RawRecord]) -> Result<BatchPlan, BatchError> {
        let ctx = PlanContext {
            dedup: &self.dedup,
            store: &self.store,
            validator: &self.validator,
            existing_topics: &self.known_topics,
            topology: &self.cfg.topology,
            replay: self.replay.as_ref(),
        };
        plan_batch(batch, &ctx).await
    }

    /// This instance's running totals.
    pub fn stats(&self) -> Arc<ProcessorStats> {
        self.stats.clone()
    }

    async fn refresh_topics(&mut self, force: bool) {
        let stale = self
            .topics_refreshed
            .is_none_or(|t| t.elapsed() > Duration::from_secs(if force { 5 } else { 60 }));
        if !stale {
            return;
        }
        let c = self.consumer.clone();
        let r = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(None, Duration::from_secs(5)).map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect::<HashSet<_>>()
            })
        })
        .await;
        if let Ok(Ok(t)) = r {
            self.known_topics = t;
            self.topics_refreshed = Some(Instant::now());
        }
    }

    /// Runs until shutdown: the batch in hand is finished and committed first.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        if let Some(id) = &self.cfg.transactional_id {
            let p = self.producer.clone();
            // Fences a crashed predecessor with the same id and aborts its open transaction.
            tokio::task::spawn_blocking(move || p.init_transactions(Duration::from_secs(30)))
                .await?
                .map_err(|e| {
                    anyhow::anyhow!("exactly-once: init_transactions for `{id}` failed: {e}")
                })?;
            tracing::info!(transactional_id = %id, "exactly-once mode: fan-out, DLQ and offsets commit atomically");
        }
        self.refresh_topics(true).await;
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
        loop {
            let batch = tokio::select! {
                b = self.next_batch() => match b {
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
            if batch.is_empty() {
                continue;
            }
            let started = Instant::now();
            let mut backoff = Duration::from_millis(200);
            let done = loop {
                match self.process(&batch).await {
                    Ok(()) => break true,
                    Err(e) => {
                        metrics::counter!("helios_processor_retries_total", "stage" => e.stage())
                            .increment(1);
                        tracing::warn!(error = %e, records = batch.len(), retry_in_ms = backoff.as_millis() as u64,
                            "batch not processed; retrying the same batch (nothing is committed)");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {},
                            _ = shutdown.clone().wait() => break false,
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            };
            if !done {
                break;
            }
            // In exactly-once mode the offsets already committed with the transaction
            // (send_offsets_to_transaction); committing the same offsets through the consumer
            // too is harmless there, and is what brokers that drop transactional offset
            // commits (librdkafka's mock cluster) need to resume.
            let processed = started.elapsed();
            self.commit(&batch).await;
            tracing::debug!(
                records = batch.len(),
                process_ms = processed.as_millis() as u64,
                commit_ms = (started.elapsed() - processed).as_millis() as u64,
                "batch done"
            );
            metrics::histogram!("helios_processor_batch_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!("helios_processor_batch_records").record(batch.len() as f64);
        }
        tracing::info!("processor stopping");
        Ok(())
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
        while !remaining.is_empty() {
            let batch = tokio::select! {
                b = tokio::time::timeout(Duration::from_secs(60), self.next_batch()) => match b {
                    Ok(b) => b?,
                    Err(_) => anyhow::bail!("no records arrived for 60 s with {} partition(s) unfinished", remaining.len()),
                },
                _ = shutdown.clone().wait() => return Ok(false),
            };
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
                if remaining
                    .get(&(r.topic.clone(), r.partition))
                    .is_some_and(|end| r.offset + 1 >= *end)
                {
                    remaining.remove(&(r.topic.clone(), r.partition));
                    let _ = self.consumer.incremental_unassign(&{
                        let mut t = TopicPartitionList::new();
                        let _ = t.add_partition(&r.topic, r.partition);
                        t
                    });
                }
            }
            if batch.is_empty() {
                continue;
            }
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.process(&batch).await {
                    Ok(()) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "replay batch not processed; retrying");
                        tokio::select! {
                            _ = tokio::time::sleep(backoff) => {},
                            _ = shutdown.clone().wait() => return Ok(false),
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            done += batch.len() as u64;
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

    async fn next_batch(&self) -> anyhow::Result<Vec<RawRecord>> {
        let first = self.consumer.recv().await?;
        let mut batch = vec![to_raw(&first)];
        drop(first);
        let deadline = tokio::time::Instant::now() + self.cfg.linger;
        while batch.len() < self.cfg.batch_size {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Ok(Ok(m)) => batch.push(to_raw(&m)),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Err(_) => break,
            }
        }
        Ok(batch)
    }

    async fn process(&mut self, batch: &[RawRecord]) -> Result<(), BatchError> {
        let t0 = Instant::now();
        let mut plan = self.plan(batch).await?;
        tracing::debug!(plan_ms = t0.elapsed().as_millis() as u64, "batch planned");
        if plan
            .dlq
            .iter()
            .any(|d| d.reason == DlqReason::UnknownEventType)
        {
            // A topic may have been created since the last look: check once more before DLQ'ing.
            self.refresh_topics(true).await;
            plan = self.plan(batch).await?;
        }
        if self.replay.as_ref().is_some_and(|r| r.dry_run) {
            self.stats.add(batch, &plan);
            return Ok(());
        }
        self.write(batch, &plan).await?;
        record_metrics(batch, &plan);
        self.stats.add(batch, &plan);
        Ok(())
    }

    async fn write(&self, batch: &[RawRecord], plan: &BatchPlan) -> Result<(), BatchError> {
        if self.cfg.transactional_id.is_none() {
            return self.write_records(batch, plan).await;
        }
        let txn_err = |what: &str, e: String| BatchError::Produce {
            failed: 1,
            total: 1,
            first: format!("{what}: {e}"),
        };
        let p = self.producer.clone();
        tokio::task::spawn_blocking(move || p.begin_transaction())
            .await
            .map_err(|e| txn_err("begin_transaction", e.to_string()))?
            .map_err(|e| txn_err("begin_transaction", e.to_string()))?;
        let result = match self.write_records(batch, plan).await {
            Ok(()) => {
                let offsets = next_offsets(batch);
                let p = self.producer.clone();
                let c = self.consumer.clone();
                tokio::task::spawn_blocking(move || {
                    let cgm = c
                        .group_metadata()
                        .ok_or_else(|| "the consumer has no group metadata".to_string())?;
                    p.send_offsets_to_transaction(&offsets, &cgm, Duration::from_secs(30))
                        .map_err(|e| format!("send_offsets_to_transaction: {e}"))?;
                    p.commit_transaction(Duration::from_secs(30))
                        .map_err(|e| format!("commit_transaction: {e}"))
                })
                .await
                .map_err(|e| txn_err("transaction", e.to_string()))?
                .map_err(|e| txn_err("transaction", e))
            }
            Err(e) => Err(e),
        };
        if result.is_err() {
            let p = self.producer.clone();
            let aborted =
                tokio::task::spawn_blocking(move || p.abort_transaction(Duration::from_secs(30)))
                    .await;
            if let Ok(Err(e)) = aborted {
                tracing::warn!(error = %e, "abort_transaction failed");
            }
        }
        result
    }

    async fn write_records(&self, batch: &[RawRecord], plan: &BatchPlan) -> Result<(), BatchError> {
        let topology = &self.cfg.topology;
        let mut sends = Vec::with_capacity(plan.events.len() + plan.dlq.len());
        let mut outgoing = Vec::with_capacity(plan.events.len());
        for e in &plan.events {
            let topic = topology.event_topic(&e.event_type);
            let payload = match &self.avro {
                Some(avro) => avro.encode(&topic, e).await?,
                None => serde_json::to_vec(e).unwrap_or_default(),
            };
            outgoing.push((topic, payload));
        }
        let replay_id = self.replay.as_ref().map(|r| r.replay_id.as_str());
        let content_type = if self.avro.is_some() {
            "application/avro"
        } else {
            "application/json"
        };
        let mut enqueue_errors = vec![];
        let mut push = |rec: FutureRecord<'_, [u8], [u8]>| match self.producer.send_result(rec) {
            Ok(f) => sends.push(f),
            Err((e, _)) => enqueue_errors.push(e.to_string()),
        };
        for (e, (topic, payload)) in plan.events.iter().zip(&outgoing) {
            push(
                FutureRecord::to(topic)
                    .key(e.partition_key().as_bytes())
                    .payload(payload.as_slice())
                    .headers(event_headers(e, content_type, replay_id)),
            );
        }
        let dlq_topic = topology.dlq_topic();
        for d in &plan.dlq {
            let raw = &batch[d.record];
            let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&dlq_topic)
                .payload(raw.value.as_slice())
                .headers(dlq_record_headers(raw, d));
            if let Some(k) = &raw.key {
                rec = rec.key(k.as_slice());
            }
            push(rec);
        }
        let db_write = async {
            match &self.replay {
                Some(r) if r.policy == DedupPolicy::Bypass => {
                    self.store.upsert_events(&plan.events, &r.replay_id).await
                }
                _ => self.store.insert_events(&plan.events).await,
            }
        };
        let (db, produced) = tokio::join!(db_write, join_all(sends));
        let total = produced.len() + enqueue_errors.len();
        let mut failures: Vec<String> = produced
            .into_iter()
            .filter_map(|r| match r {
                Ok(Ok(_)) => None,
                Ok(Err((e, _))) => Some(e.to_string()),
                Err(_) => Some("delivery canceled".to_string()),
            })
            .collect();
        failures.extend(enqueue_errors);
        if let Some(first) = failures.first() {
            return Err(BatchError::Produce {
                failed: failures.len(),
                total,
                first: first.clone(),
            });
        }
        let inserted = db?;
        metrics::counter!("helios_processor_rows_inserted_total").increment(inserted);
        Ok(())
    }

    async fn commit(&self, batch: &[RawRecord]) {
        let tpl = next_offsets(batch);
        let c = self.consumer.clone();
        match tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => {}
            // After a rebalance the new owner re-processes from the last commit: duplicates on
            // the fan-out topics at worst, never a loss; PostgreSQL stays exactly once.
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "offset commit failed; the records will be processed again")
            }
            Err(e) => tracing::warn!(error = %e, "offset commit task failed"),
        }
    }
}

/// The offsets to commit after a batch: per partition, one past the highest offset.
fn next_offsets(batch: &[RawRecord]) -> TopicPartitionList {
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for r in batch {
        let e = next.entry((r.topic.clone(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in &next {
        let _ = tpl.add_partition_offset(t, *p, Offset::Offset(*o));
    }
    tpl
}

/// Counts with the same labels added up first: one registry lookup per label set and batch,
/// not per event.
fn tally<K: Ord>(items: impl IntoIterator<Item = K>) -> BTreeMap<K, u64> {
    let mut m = BTreeMap::new();
    for k in items {
        *m.entry(k).or_default() += 1;
    }
    m
}

fn record_metrics(batch: &[RawRecord], plan: &BatchPlan) {
    for (t, n) in tally(batch.iter().map(|r| r.topic.as_str())) {
        metrics::counter!("helios_processor_raw_records_total", "topic" => t.to_string())
            .increment(n);
    }
    for (s, n) in tally(plan.units_in.iter()) {
        metrics::counter!("helios_processor_events_in_total", "source" => s.as_str()).increment(n);
    }
    for ((t, s), n) in tally(
        plan.events
            .iter()
            .map(|e| (e.event_type.as_str(), e.source)),
    ) {
        metrics::counter!("helios_processor_events_out_total", "event_type" => t.to_string(), "source" => s.as_str())
            .increment(n);
    }
    for (s, n) in tally(plan.duplicates.iter()) {
        metrics::counter!("helios_processor_duplicates_total", "source" => s.as_str()).increment(n);
    }
    for ((r, st), n) in tally(plan.dlq.iter().map(|d| (d.reason, d.stage))) {
        metrics::counter!("helios_processor_dlq_total", "reason" => r.as_str(), "stage" => st)
            .increment(n);
    }
    for (s, n) in tally(plan.handshakes.iter()) {
        metrics::counter!("helios_processor_handshakes_total", "source" => s.as_str()).increment(n);
    }
}
