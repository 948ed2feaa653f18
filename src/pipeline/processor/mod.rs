//! `helios process`: a member of the consumer group that turns raw records into canonical events.
//!
//! Batch by batch: consume ([`consume`](super::consume)) → plan ([`plan`](super::plan):
//! normalize, validate, guard, dedup) → deliver ([`deliver`](super::deliver): PostgreSQL, the
//! fan-out of what it took, the DLQ, mark releases) → resolve the batch in the commit sequencer
//! ([`commit`](super::commit)) and commit what it allows.
//!
//! This file builds a processor (start-up: consumer, producer, schemas, the sinks a delivery
//! writes to) and holds what the live loop ([`live`]) and replays ([`replay`]) share: planning
//! and the delivery task with its retries.

mod live;
mod replay;

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::producer::FutureProducer;

use super::avro::AvroFanOut;
use super::commit::Ownership;
use super::consume::RawConsumer;
use super::deliver::gate::{Ended, Prior};
use super::deliver::{Delivered, Delivery, Outputs, Stop};
use super::plan::{self, BatchPlan, PlanContext, ReplaySpec};
use super::retry::{Retry, Unavailable};
use super::sinks::kafka::{output_producer, transactional_producer};
use super::stats::ProcessorStats;
use super::validate::Validator;
use crate::db::EventStore;
use crate::limits::SizeLimits;
use crate::model::{RawRecord, Sink};
use crate::shutdown::Shutdown;
use crate::source::Source;
use crate::topology::Topology;

pub use super::config::{
    BatchLimits, DeliveryMode, ProcessorConfig, DEFAULT_BATCH_BYTES, DEFAULT_BATCH_RECORDS,
    DEFAULT_DELIVERIES_IN_FLIGHT,
};
use super::dedup::{DedupKey, DedupStore};
use crate::config::KafkaSettings;

/// What deliveries write to, shared with the delivery tasks.
pub struct Sinks<D, S> {
    pub store: S,
    pub dedup: D,
    producer: RwLock<FutureProducer>,
    kafka: KafkaSettings,
    pub topology: Topology,
    pub avro: Option<AvroFanOut>,
    pub replay: Option<ReplaySpec>,
    pub limits: SizeLimits,
    pub mode: DeliveryMode,
    pub stats: Arc<ProcessorStats>,
    /// One circuit breaker per dependency, shared by every retry loop of this processor.
    pub breakers: Arc<super::breaker::Breakers>,
}

impl<D, S> Sinks<D, S> {
    /// The fan-out/DLQ producer now.
    pub fn producer(&self) -> FutureProducer {
        self.producer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replaces an at-least-once producer that seems stuck (a fatal error, or Kafka failing
    /// for [`PRODUCER_RENEW_AFTER`]) with a new one, unless another delivery did already;
    /// returns the producer to use now.
    fn renew_output_producer(&self, stuck: &FutureProducer, why: &str) -> FutureProducer {
        use rdkafka::producer::Producer;
        let mut current = self.producer.write().unwrap_or_else(|p| p.into_inner());
        if current.client().native_ptr() != stuck.client().native_ptr() {
            return current.clone();
        }
        match output_producer(&self.kafka, &self.mode, &self.limits) {
            Ok(p) => {
                tracing::warn!(why, "the fan-out producer was created again (its unacknowledged records are sent by the new one, in order)");
                metrics::counter!("helios_processor_producer_renewals_total").increment(1);
                let old = std::mem::replace(&mut *current, p);
                // Destroying a producer waits for its threads: not on the runtime's.
                tokio::task::spawn_blocking(move || drop(old));
                current.clone()
            }
            Err(e) => {
                tracing::warn!(error = %e, "creating the fan-out producer again failed");
                current.clone()
            }
        }
    }

    /// Replaces a transactional producer that failed for good with a new one (which fences the
    /// old one's transactional id); retried while the broker does not answer.
    async fn renew_producer(&self, shutdown: &Shutdown) -> bool {
        let mut backoff = super::retry::Backoff::default();
        loop {
            match transactional_producer(&self.kafka, &self.mode, &self.limits).await {
                Ok(p) => {
                    *self.producer.write().unwrap_or_else(|p| p.into_inner()) = p;
                    metrics::counter!("helios_processor_producer_renewals_total").increment(1);
                    tracing::warn!("exactly-once: the transactional producer was created again; its batch is read again from the committed offsets");
                    return true;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "exactly-once: creating the transactional producer again failed; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = shutdown.clone().wait() => return false,
                    }
                }
            }
        }
    }
}

/// How long the fan-out may keep failing on Kafka before its producer is created again.
const PRODUCER_RENEW_AFTER: Duration = Duration::from_secs(20);

/// How a delivery task ended.
enum Outcome {
    /// Every record of the batch resolved.
    Delivered(Box<Delivered>),
    /// The batch will not resolve here: given up at shutdown, fenced, or its producer failed for
    /// good (`renew`).
    Abandoned { why: String, renew: bool },
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
        check_group_protocol(&cfg.kafka)?;
        check_pinned(&cfg)?;
        let transactional = matches!(cfg.mode, DeliveryMode::Transactional { .. });
        crate::metrics::install();
        crate::metrics::zero_processor_series();
        let stats = Arc::new(ProcessorStats::default());
        let mut consumer = RawConsumer::new(
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
        let producer = output_producer(&cfg.kafka, &cfg.mode, &cfg.limits)?;
        let mut schemas = super::schema::SchemaSet::load(&cfg.topology)?;
        let avro = match cfg
            .schema_registry_url
            .as_deref()
            .filter(|u| !u.trim().is_empty())
        {
            Some(url) => {
                let registry = super::schema::registry::Registry::new(url)?;
                schemas = schemas.with_writers(super::schema::WriterSchemas::new(registry));
                Some(AvroFanOut::new(url)?)
            }
            None => None,
        };
        let sinks = Arc::new(Sinks {
            store,
            dedup,
            producer: RwLock::new(producer),
            kafka: cfg.kafka.clone(),
            topology: cfg.topology.clone(),
            avro,
            replay,
            limits: cfg.limits,
            mode: cfg.mode.clone(),
            stats: stats.clone(),
            breakers: Arc::new(super::breaker::Breakers::new()),
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
            let p = self.sinks.producer();
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
        let sinks = self.sinks.clone();
        while !plan.is_complete() {
            // Some events say they were written with a schema version not fetched yet.
            let needs: Vec<(String, u32)> = plan.writer_schemas.iter().cloned().collect();
            let writers = self.validator.writer_schemas()?.clone();
            let mut retry = Retry::new("schemas", &sinks.breakers);
            loop {
                match writers.fetch(&needs).await {
                    Ok(()) => {
                        retry.succeeded();
                        break;
                    }
                    Err(e) => {
                        // Refusals too (a 401, a 403): the events are fine, the registry is not.
                        let e = Unavailable::new(Sink::SchemaRegistry, e.to_string());
                        self.stats.retries.fetch_add(1, Ordering::Relaxed);
                        if !retry.after_polling(&e, &mut self.consumer, shutdown).await {
                            return None;
                        }
                    }
                }
            }
            plan = self.prepare(records);
        }
        let mut retry = Retry::new("plan", &sinks.breakers);
        loop {
            match plan::claim(&mut plan, &sinks.dedup, &sinks.store, sinks.replay.as_ref()).await {
                Ok(()) => {
                    retry.succeeded();
                    break;
                }
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
        let sinks = self.sinks.clone();
        let mut retry = Retry::new("plan", &sinks.breakers);
        loop {
            match plan::reclaim(&mut plan, &released, &sinks.dedup).await {
                Ok(()) => {
                    retry.succeeded();
                    return Some(plan);
                }
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
}

/// Refuses pass-through properties that would change what the processor pins (start-up error
/// naming each).
fn check_pinned(cfg: &ProcessorConfig) -> anyhow::Result<()> {
    use crate::config::{refuse_overrides, Pinned, ACKS_ALL};
    let output_max = cfg.limits.output_record_max().to_string();
    let mut pinned = vec![
        ACKS_ALL,
        Pinned {
            key: "message.max.bytes",
            value: &output_max,
            why: "it derives from HELIOS_MAX_BODY_BYTES: set that instead",
        },
        Pinned {
            key: "enable.auto.commit",
            value: "false",
            why: "offsets are committed only for records that resolved (the commit sequencer)",
        },
        Pinned {
            key: "enable.auto.offset.store",
            value: "false",
            why: "offsets are committed only for records that resolved (the commit sequencer)",
        },
        Pinned {
            key: "group.id",
            value: &cfg.topology.consumer_group,
            why: "set HELIOS_CONSUMER_GROUP (or consumer_group in topology.yaml) instead",
        },
    ];
    let idempotence_off = cfg
        .kafka
        .properties
        .get("enable.idempotence")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"));
    if idempotence_off {
        pinned.push(Pinned {
            key: "max.in.flight.requests.per.connection",
            value: "1",
            why: "without idempotence, one request in flight is what keeps each key's order on the fan-out topics",
        });
    }
    if let DeliveryMode::Transactional { transactional_id } = &cfg.mode {
        pinned.push(Pinned {
            key: "transactional.id",
            value: transactional_id,
            why: "set HELIOS_TRANSACTIONAL_ID instead (or leave the per-instance default)",
        });
        if idempotence_off {
            anyhow::bail!("KAFKA_ENABLE_IDEMPOTENCE=false cannot go with exactly-once mode (transactions need idempotence)");
        }
    }
    refuse_overrides(&cfg.kafka.properties, &pinned)
}

/// The KIP-848 consumer protocol (`group.protocol=consumer`) needs a broker that serves it; the
/// assignment strategies librdkafka knows are fine (eager and cooperative are both handled per
/// partition). Anything else is refused here with what to change.
fn check_group_protocol(kafka: &KafkaSettings) -> anyhow::Result<()> {
    if let Some(p) = kafka.properties.get("group.protocol") {
        let p = p.trim().to_ascii_lowercase();
        if p != "classic" && p != "consumer" {
            anyhow::bail!("KAFKA_GROUP_PROTOCOL={p}: use `classic` (JoinGroup/SyncGroup, eager or cooperative assignors) or `consumer` (KIP-848, Kafka 4.0 brokers)");
        }
        if p == "consumer"
            && kafka
                .properties
                .contains_key("partition.assignment.strategy")
        {
            anyhow::bail!("KAFKA_PARTITION_ASSIGNMENT_STRATEGY does not apply with KAFKA_GROUP_PROTOCOL=consumer (KIP-848: the broker assigns; set group.remote.assignor instead)");
        }
        if p == "consumer" {
            // librdkafka itself only marks the coordinator dead and asks again, for ever: a
            // member that never gets a partition. Ask the broker what it serves first.
            match crate::kafka::broker_api_keys(kafka, Duration::from_secs(10)) {
                Some(keys) if !keys.contains(&crate::kafka::API_CONSUMER_GROUP_HEARTBEAT) => {
                    anyhow::bail!("KAFKA_GROUP_PROTOCOL=consumer needs a broker that serves the KIP-848 consumer group protocol (ConsumerGroupHeartbeat, Kafka 4.0 or later), and {} does not: remove KAFKA_GROUP_PROTOCOL or set it to `classic` (eager and cooperative assignors are both supported)", kafka.bootstrap_servers);
                }
                Some(_) => {}
                None => tracing::warn!("KAFKA_GROUP_PROTOCOL=consumer: could not ask the broker whether it serves KIP-848 (TLS, or no answer); if this instance never gets a partition, the broker does not"),
            }
        }
    }
    Ok(())
}

/// Delivers a batch, retrying (only what was not acknowledged) while a dependency is
/// unavailable; ends when every record resolved, or when the batch is given up: shutdown came
/// first, every partition of it was revoked or rewound meanwhile, or (exactly-once) the
/// transactional producer failed for good.
///
/// `ended` tells the delivery that follows (it may have started already: see
/// [`super::deliver::gate`]) how this one ended.
async fn deliver_task<D: DedupStore, S: EventStore>(
    sinks: Arc<Sinks<D, S>>,
    delivery: Delivery,
    group: Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>>,
    ownership: Option<Arc<Ownership>>,
    shutdown: Shutdown,
    ended: Option<Ended>,
) -> Outcome {
    let outcome = deliver_retrying(sinks, delivery, group, ownership, shutdown).await;
    if let Some(ended) = ended {
        ended.send(match &outcome {
            Outcome::Delivered(d) => Prior::Delivered {
                released: d.released.clone(),
            },
            Outcome::Abandoned { .. } => Prior::GivenUp,
        });
    }
    outcome
}

async fn deliver_retrying<D: DedupStore, S: EventStore>(
    sinks: Arc<Sinks<D, S>>,
    mut delivery: Delivery,
    group: Option<Arc<rdkafka::consumer::ConsumerGroupMetadata>>,
    ownership: Option<Arc<Ownership>>,
    shutdown: Shutdown,
) -> Outcome {
    let mut out = Outputs {
        store: &sinks.store,
        dedup: &sinks.dedup,
        producer: sinks.producer(),
        topology: &sinks.topology,
        avro: sinks.avro.as_ref(),
        replay: sinks.replay.as_ref(),
        limits: &sinks.limits,
        mode: &sinks.mode,
        group,
        ownership: ownership.clone(),
        shutdown: shutdown.clone(),
        commit_timeout: super::sinks::kafka::commit_timeout(&sinks.kafka),
    };
    // The batch's ticket stays with the delivery: a given-up batch is abandoned by the loop,
    // which knows its ticket id (a panicked task could not hand anything back).
    let mut retry = Retry::new("deliver", &sinks.breakers);
    let mut kafka_failing: Option<Instant> = None;
    loop {
        let stop = match delivery.run(&out).await {
            Ok(d) => {
                retry.succeeded();
                return Outcome::Delivered(Box::new(d));
            }
            Err((d, stop)) => {
                delivery = d;
                stop
            }
        };
        let e = match stop {
            Stop::Unavailable(e) => e,
            Stop::Fenced => {
                return Outcome::Abandoned {
                    why: "its partitions were revoked or rewound during the transaction".into(),
                    renew: false,
                }
            }
            Stop::PriorGivenUp => return Outcome::Abandoned {
                why: "the batch before it, which it overlapped, was given up (both are read again)"
                    .into(),
                renew: false,
            },
            Stop::Fatal(e) => {
                tracing::error!(error = %e, "exactly-once: the transactional producer failed for good");
                return Outcome::Abandoned {
                    why: e,
                    renew: true,
                };
            }
        };
        if e.sink == crate::model::Sink::Kafka && sinks.mode == DeliveryMode::AtLeastOnce {
            // An idempotent producer can fail for good (a fatal error), or get stuck with a
            // broker that lost its state (Tansu 0.6.0 after a restart): a new one gets a new
            // producer id. Kafka being down for a while costs a new producer every 20 s.
            use rdkafka::producer::Producer;
            let since = *kafka_failing.get_or_insert_with(Instant::now);
            let fatal = out.producer.client().fatal_error().map(|(_, why)| why);
            if fatal.is_some() || since.elapsed() >= PRODUCER_RENEW_AFTER {
                let why = fatal.unwrap_or_else(|| {
                    format!("Kafka writes failed for {}s", since.elapsed().as_secs())
                });
                out.producer = sinks.renew_output_producer(&out.producer, &why);
                kafka_failing = None;
            }
        } else {
            kafka_failing = None;
        }
        if ownership.as_ref().is_some_and(|o| delivery.fenced_whole(o)) {
            return Outcome::Abandoned {
                why: "its partitions were revoked while it was retried (the new owner reads it)"
                    .into(),
                renew: false,
            };
        }
        sinks.stats.retries.fetch_add(1, Ordering::Relaxed);
        if !retry.after(&e, &shutdown).await {
            return Outcome::Abandoned {
                why: format!(
                    "shutdown while it was retried ({}s): nothing at or after it is committed",
                    retry.stalled().as_secs()
                ),
                renew: false,
            };
        }
    }
}
