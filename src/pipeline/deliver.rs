//! Delivering a planned batch to its sinks, and the one truth across them: an event is in
//! PostgreSQL if and only if it is (at least once) on its `helios.events.<Type>` topic; every
//! other unit of the batch is in the DLQ.
//!
//! Order, per batch: (1) PostgreSQL, (2) the fan-out of exactly the events PostgreSQL accepted,
//! (3) one DLQ record per raw record with refused units, (4) the release of the dedup marks of
//! events a sink refused, then the offsets. A [`Delivery`] survives retries: after a transient
//! failure only what was not acknowledged is done again, so no batch is fanned out twice because
//! another sink failed.
//!
//! Errors are classified (see [`crate::model::fault`]). A *transient* one returns
//! [`Unavailable`] and the caller retries. One *caused by the data* is never retried: PostgreSQL's
//! refusals are isolated by splitting the batch in halves (at most O(log n) extra statements per
//! bad event), a fan-out refusal takes the event's row back out of PostgreSQL, and the refused
//! events join the DLQ with reason `sink_rejected` (or `too_large`), the SQLSTATE or Kafka error
//! code in `helios-dlq-sink-code`.
//!
//! The only way to commit a batch's offsets is the [`Delivered`] value that a completed delivery
//! returns.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};

use super::avro::AvroFanOut;
use super::dead_letter::{self, DlqItem};
use super::dedup::{DedupKey, DedupStore, MarkOwner};
use super::plan::{BatchPlan, DedupPolicy, ReplaySpec};
use super::{fanout, Unavailable};
use crate::db::EventStore;
use crate::kafka::produce_fault;
use crate::limits::SizeLimits;
use crate::model::{CanonicalEvent, DlqReason, DlqStage, Fault, RawRecord, Refusal, Sink};
use crate::topology::Topology;

/// How fan-out, DLQ and offsets reach Kafka.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeliveryMode {
    /// Records first, offsets after: a crash may fan an event out twice, never lose it.
    AtLeastOnce,
    /// Fan-out, DLQ and offsets in one Kafka transaction (`read_committed` consumers see each
    /// event once). The id is stable per instance, so a restart fences its predecessor.
    Transactional { transactional_id: String },
}

/// The batch's claim on its partitions: the consumer generation it was polled in, against the
/// current one. Once a rebalance bumped it, the batch's offsets must not be committed.
#[derive(Clone)]
pub struct Fence {
    current: Arc<AtomicU64>,
    batch: u64,
}

impl Fence {
    pub fn new(current: Arc<AtomicU64>, batch: u64) -> Self {
        Fence { current, batch }
    }

    /// True while no rebalance happened since the batch was polled.
    pub fn holds(&self) -> bool {
        self.current.load(Ordering::SeqCst) == self.batch
    }
}

/// What a delivery writes to.
pub struct Outputs<'a, S, D> {
    pub store: &'a S,
    pub dedup: &'a D,
    pub producer: &'a FutureProducer,
    pub topology: &'a Topology,
    pub avro: Option<&'a AvroFanOut>,
    pub replay: Option<&'a ReplaySpec>,
    pub limits: &'a SizeLimits,
    /// The consumer group's metadata, for the offsets of a transaction.
    pub group: Option<Arc<ConsumerGroupMetadata>>,
    /// The batch's claim on its partitions (live processing).
    pub fence: Option<Fence>,
}

impl<S, D> Outputs<'_, S, D> {
    fn replay_id(&self) -> Option<&str> {
        self.replay.map(|r| r.replay_id.as_str())
    }

    fn upsert(&self) -> bool {
        self.replay.is_some_and(|r| r.policy == DedupPolicy::Bypass)
    }
}

/// A batch on its way to the sinks; keeps what was acknowledged across retries.
pub struct Delivery {
    records: Vec<RawRecord>,
    plan: BatchPlan,
    stored: bool,
    rows_inserted: u64,
    /// Per `plan.events`: the fan-out record was acknowledged.
    fanned: Vec<bool>,
    /// Raw records whose DLQ record was acknowledged.
    dlq_sent: BTreeSet<usize>,
    /// Raw records whose DLQ copy is too large: a reference record is written instead.
    dlq_reference: BTreeMap<usize, String>,
    /// Marks claimed by events a sink refused: released before the offsets are committed.
    to_release: Vec<(DedupKey, MarkOwner)>,
    released: bool,
}

/// A batch whose every write was acknowledged: the only way to its offsets.
pub struct Delivered {
    offsets: TopicPartitionList,
    pub records: Vec<RawRecord>,
    pub plan: BatchPlan,
    pub rows_inserted: u64,
    /// Dedup marks released (their events were refused by a sink).
    pub released: Vec<DedupKey>,
}

impl Delivered {
    /// The offsets to commit: per partition, one past the highest offset of the batch.
    pub fn offsets(&self) -> &TopicPartitionList {
        &self.offsets
    }
}

/// The offsets after a batch: per partition, one past the highest offset.
fn next_offsets(batch: &[RawRecord]) -> TopicPartitionList {
    let mut next: BTreeMap<(&str, i32), i64> = BTreeMap::new();
    for r in batch {
        let e = next.entry((r.topic.as_str(), r.partition)).or_insert(0);
        *e = (*e).max(r.offset + 1);
    }
    let mut tpl = TopicPartitionList::new();
    for ((t, p), o) in next {
        let _ = tpl.add_partition_offset(t, p, Offset::Offset(o));
    }
    tpl
}

/// A unit a sink refused, by its position in `plan.events`.
type Refused = Vec<(usize, Refusal)>;

impl Delivery {
    pub fn new(records: Vec<RawRecord>, mut plan: BatchPlan) -> Self {
        if crate::telemetry::traces_on() {
            for p in &mut plan.events {
                p.trace = super::plan::EventTrace::start(&p.event, records.get(p.record));
            }
        }
        Delivery {
            records,
            plan,
            stored: false,
            rows_inserted: 0,
            fanned: vec![],
            dlq_sent: BTreeSet::new(),
            dlq_reference: BTreeMap::new(),
            to_release: vec![],
            released: false,
        }
    }

    /// The records of the batch.
    pub fn records(&self) -> &[RawRecord] {
        &self.records
    }

    /// Does (or resumes) the delivery; `Err` means a dependency failed: call again later.
    pub async fn run<S: EventStore, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
        mode: &DeliveryMode,
    ) -> Result<(), Unavailable> {
        self.store(out).await?;
        match mode {
            DeliveryMode::AtLeastOnce => {
                let (refused, transient) = self.fanout(out).await?;
                self.take_back(out, refused).await?;
                if let Some(e) = transient {
                    return Err(e);
                }
                self.dead_letter(out, false).await?;
                self.release(out).await
            }
            DeliveryMode::Transactional { .. } => self.transaction(out).await,
        }
    }

    /// The finished batch (call after `run` returned `Ok`).
    pub fn finish(self) -> Delivered {
        for p in &self.plan.events {
            if let Some(t) = &p.trace {
                t.span.record("helios.outcome", "stored");
            }
        }
        Delivered {
            offsets: next_offsets(&self.records),
            records: self.records,
            plan: self.plan,
            rows_inserted: self.rows_inserted,
            released: self.to_release.into_iter().map(|(k, _)| k).collect(),
        }
    }

    /// (1) PostgreSQL, isolating the events it refuses.
    async fn store<S: EventStore, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(), Unavailable> {
        if self.stored {
            return Ok(());
        }
        let events: Vec<&CanonicalEvent> = self.plan.events.iter().map(|p| &p.event).collect();
        let replay_id = out.upsert().then(|| out.replay_id()).flatten();
        let (inserted, refused) = write_isolating(out.store, &events, replay_id).await?;
        self.rows_inserted += inserted;
        self.refuse(refused);
        self.fanned = vec![false; self.plan.events.len()];
        self.stored = true;
        Ok(())
    }

    /// (2) The fan-out of the stored events not yet acknowledged. Returns the events Kafka
    /// refused for their data, and the first transient failure (if any).
    async fn fanout<S, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(Refused, Option<Unavailable>), Unavailable> {
        let content_type = fanout::content_type(out.avro.is_some());
        let avro_values = self.avro_values(out).await?;
        let replay_id = out.replay_id();
        let mut sends = Sends::default();
        for (i, p) in self.plan.events.iter().enumerate() {
            if self.fanned[i] {
                continue;
            }
            let topic = out.topology.event_topic(&p.event.event_type);
            let payload = match avro_values.get(&i) {
                Some(v) => v.as_slice(),
                None => p.payload.as_deref().unwrap_or_default(),
            };
            let rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topic)
                .key(p.event.partition_key().as_bytes())
                .payload(payload)
                .headers(fanout::headers(
                    &p.event,
                    content_type,
                    replay_id,
                    p.trace.as_ref().map(|t| t.traceparent.as_str()),
                ));
            sends.send(out.producer, i, rec).await;
        }
        let (acked, refused, transient) = sends.settle().await;
        for i in acked {
            self.fanned[i] = true;
        }
        let refused = refused
            .into_iter()
            .map(|(i, e, code)| (i, kafka_refusal(&e, code)))
            .collect();
        Ok((refused, transient))
    }

    /// Avro mode: the encoded values of the events not yet fanned out, by position.
    async fn avro_values<S, D>(
        &self,
        out: &Outputs<'_, S, D>,
    ) -> Result<BTreeMap<usize, Vec<u8>>, Unavailable> {
        let mut values = BTreeMap::new();
        let Some(avro) = out.avro else {
            return Ok(values);
        };
        for (i, p) in self.plan.events.iter().enumerate() {
            if !self.fanned[i] {
                let topic = out.topology.event_topic(&p.event.event_type);
                let v = avro
                    .encode(&topic, &p.event)
                    .await
                    .map_err(|e| Unavailable::new(Sink::SchemaRegistry, e.to_string()))?;
                values.insert(i, v);
            }
        }
        Ok(values)
    }

    /// Takes the rows of events Kafka refused back out of PostgreSQL, then moves those events
    /// to the DLQ (in PostgreSQL if and only if on the topic).
    async fn take_back<S: EventStore, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
        refused: Refused,
    ) -> Result<(), Unavailable> {
        if refused.is_empty() {
            return Ok(());
        }
        let events: Vec<&CanonicalEvent> = refused
            .iter()
            .map(|(i, _)| &self.plan.events[*i].event)
            .collect();
        out.store
            .remove_events(&events)
            .await
            .map_err(|e| Unavailable::new(Sink::Postgres, e.message))?;
        self.refuse(refused);
        Ok(())
    }

    /// Moves refused events (by position in `plan.events`) into the DLQ items, remembering
    /// their marks for release.
    fn refuse(&mut self, mut refused: Refused) {
        if refused.is_empty() {
            return;
        }
        refused.sort_by_key(|(i, _)| *i);
        let mut refused = refused.into_iter().peekable();
        let events = std::mem::take(&mut self.plan.events);
        let fanned = std::mem::take(&mut self.fanned);
        for (i, p) in events.into_iter().enumerate() {
            if refused.peek().is_some_and(|(j, _)| *j == i) {
                let (_, refusal) = refused.next().expect("peeked");
                tracing::warn!(event_id = %crate::model::text::bounded(&p.event.event_id, 128), reason = refusal.reason.as_str(),
                    stage = refusal.stage.as_str(), detail = %crate::model::text::bounded(&refusal.detail, 256), "a sink refused an event; it goes to the DLQ");
                if let Some(t) = &p.trace {
                    t.span.record("helios.outcome", "dead_lettered");
                    crate::telemetry::fail(&t.span, refusal.reason.as_str());
                }
                self.to_release
                    .push((DedupKey::of(&p.event), MarkOwner::of(&p.event)));
                self.plan.dlq.push(DlqItem {
                    record: p.record,
                    index: Some(p.event.raw.index),
                    refusal,
                });
            } else {
                if let Some(f) = fanned.get(i) {
                    self.fanned.push(*f);
                }
                self.plan.events.push(p);
            }
        }
    }

    /// (3) One DLQ record per raw record with refused units, not yet acknowledged. A DLQ copy
    /// too large to write is replaced by a reference record. In a transaction (`in_txn`) a
    /// refusal cannot be followed by another send: how many were refused is returned instead.
    async fn dead_letter<S, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
        in_txn: bool,
    ) -> Result<Option<usize>, Unavailable> {
        let topic = out.topology.dlq_topic();
        let mut by_record: BTreeMap<usize, Vec<&DlqItem>> = BTreeMap::new();
        for d in &self.plan.dlq {
            if !self.dlq_sent.contains(&d.record) {
                by_record.entry(d.record).or_default().push(d);
            }
        }
        let mut sends = Sends::default();
        for (record, items) in &mut by_record {
            items.sort_by_key(|d| d.index);
            let reference = self.dlq_reference.get(record).map(String::as_str);
            let rec = dlq_record(&topic, &self.records[*record], items, reference, out.limits);
            sends.send(out.producer, *record, rec).await;
        }
        let (acked, refused, transient) = sends.settle().await;
        self.dlq_sent.extend(acked);
        let mut newly = 0;
        for (record, e, _) in refused {
            // A reference record refused for its data cannot be made smaller: retry it.
            if self.dlq_reference.insert(record, e.to_string()).is_some() {
                return Err(Unavailable::new(Sink::Kafka, e.to_string()));
            }
            newly += 1;
        }
        if let Some(e) = transient {
            return Err(e);
        }
        match (newly, in_txn) {
            (0, _) => Ok(None),
            (n, true) => Ok(Some(n)),
            // Outside a transaction the reference records can follow at once.
            (_, false) => Box::pin(self.dead_letter(out, false)).await,
        }
    }

    /// (4) Releases the marks of events a sink refused.
    async fn release<S, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(), Unavailable> {
        if self.released || self.to_release.is_empty() {
            return Ok(());
        }
        out.dedup
            .release(&self.to_release)
            .await
            .map_err(|e| Unavailable::new(Sink::Redis, e.to_string()))?;
        self.released = true;
        Ok(())
    }

    /// Exactly-once: fan-out, DLQ and offsets in one transaction. A refusal aborts the
    /// transaction, isolates the refused units, and the transaction is done again without them
    /// (each round removes at least one unit, so this ends).
    async fn transaction<S: EventStore, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(), Unavailable> {
        loop {
            let p = out.producer.clone();
            blocking(move || p.begin_transaction()).await?;
            self.fanned = vec![false; self.plan.events.len()];
            self.dlq_sent.clear();
            let attempt = async {
                let (refused, transient) = self.fanout(out).await?;
                if let Some(e) = transient {
                    return Err(e);
                }
                if !refused.is_empty() {
                    return Ok(Some(refused));
                }
                if self.dead_letter(out, true).await?.is_some() {
                    return Ok(Some(vec![]));
                }
                Ok(None)
            }
            .await;
            match attempt {
                Ok(None) => {
                    // Marks are released inside the transaction's window: if it then fails,
                    // reprocessing simply claims them again.
                    if let Err(e) = self.release(out).await {
                        abort(out.producer).await;
                        return Err(e);
                    }
                    if out.fence.as_ref().is_some_and(|f| !f.holds()) {
                        abort(out.producer).await;
                        return Err(Unavailable::new(
                            Sink::Kafka,
                            "partitions were revoked during the transaction",
                        ));
                    }
                    let offsets = next_offsets(&self.records);
                    let group = out.group.clone().ok_or_else(|| {
                        Unavailable::new(Sink::Kafka, "the consumer has no group metadata")
                    })?;
                    let p = out.producer.clone();
                    let done = blocking(move || {
                        p.send_offsets_to_transaction(&offsets, &group, Duration::from_secs(30))?;
                        p.commit_transaction(Duration::from_secs(30))
                    })
                    .await;
                    if done.is_err() {
                        abort(out.producer).await;
                    }
                    return done;
                }
                Ok(Some(refused)) => {
                    abort(out.producer).await;
                    self.take_back(out, refused).await?;
                }
                Err(e) => {
                    abort(out.producer).await;
                    return Err(e);
                }
            }
        }
    }
}

/// Writes `events` to the store; a refusal caused by the data is isolated by writing halves
/// (each bad event costs at most ~2·log2(n) extra statements). Returns rows written and the
/// refused events (by position) with why.
async fn write_isolating<S: EventStore>(
    store: &S,
    events: &[&CanonicalEvent],
    replay_id: Option<&str>,
) -> Result<(u64, Refused), Unavailable> {
    let mut refused = vec![];
    let mut written = 0;
    let mut todo = vec![(0, events.len())];
    while let Some((lo, hi)) = todo.pop() {
        if lo == hi {
            continue;
        }
        match store.write_events(&events[lo..hi], replay_id).await {
            Ok(n) => written += n,
            Err(e) => match e.fault {
                Fault::Transient => return Err(Unavailable::new(Sink::Postgres, e.message)),
                Fault::Data { code } if hi - lo == 1 => refused.push((
                    lo,
                    Refusal::new(DlqReason::SinkRejected, DlqStage::Store, e.message)
                        .sink_code(code),
                )),
                Fault::Data { .. } => {
                    let mid = lo + (hi - lo) / 2;
                    todo.push((mid, hi));
                    todo.push((lo, mid));
                }
            },
        }
    }
    Ok((written, refused))
}

/// The DLQ record of `raw` for its refused `items`: the raw record with DLQ headers, or (when
/// that copy is over the output limit, or was refused before: `reference`) a reference record.
fn dlq_record<'a>(
    topic: &'a str,
    raw: &'a RawRecord,
    items: &[&DlqItem],
    reference: Option<&str>,
    limits: &SizeLimits,
) -> FutureRecord<'a, [u8], [u8]> {
    let full = dead_letter::record_headers(raw, items);
    let size = dead_letter::record_size(raw, &full);
    let limit = limits.output_record_max();
    let over = format!("{size} bytes is over the {limit}-byte limit");
    let why = reference.or((size > limit).then_some(over.as_str()));
    match why {
        Some(why) => FutureRecord::to(topic)
            .payload(&[][..])
            .headers(dead_letter::reference_headers(raw, items, size, why)),
        None => {
            let r = FutureRecord::to(topic)
                .payload(raw.value.as_slice())
                .headers(full);
            match &raw.key {
                Some(k) => r.key(k.as_slice()),
                None => r,
            }
        }
    }
}

/// Records in flight to Kafka, each tagged with what it stands for.
#[derive(Default)]
struct Sends {
    pending: Vec<(usize, DeliveryFuture)>,
    failed: Vec<(usize, KafkaError)>,
}

/// What came back: the acknowledged tags, the tags refused for their data (with the error and
/// its code), and the first transient failure.
type Settled = (
    Vec<usize>,
    Vec<(usize, KafkaError, String)>,
    Option<Unavailable>,
);

impl Sends {
    async fn send(
        &mut self,
        producer: &FutureProducer,
        tag: usize,
        rec: FutureRecord<'_, [u8], [u8]>,
    ) {
        if let Err(e) = enqueue(producer, rec, tag, &mut self.pending).await {
            self.failed.push((tag, e));
        }
    }

    async fn settle(self) -> Settled {
        let mut failed = self.failed;
        let mut acked = vec![];
        let results = join_all(
            self.pending
                .into_iter()
                .map(|(i, f)| async move { (i, f.await) }),
        )
        .await;
        for (i, r) in results {
            match r {
                Ok(Ok(_)) => acked.push(i),
                Ok(Err((e, _))) => failed.push((i, e)),
                Err(_) => failed.push((i, KafkaError::Canceled)),
            }
        }
        let mut refused = vec![];
        let mut transient = None;
        for (i, e) in failed {
            match produce_fault(&e) {
                Fault::Data { code } => refused.push((i, e, code)),
                Fault::Transient => {
                    transient.get_or_insert(Unavailable::new(Sink::Kafka, e.to_string()));
                }
            }
        }
        (acked, refused, transient)
    }
}

/// Enqueues a record; when librdkafka's queue is full, waits for what is in flight first.
async fn enqueue(
    producer: &FutureProducer,
    rec: FutureRecord<'_, [u8], [u8]>,
    tag: usize,
    pending: &mut Vec<(usize, DeliveryFuture)>,
) -> Result<(), KafkaError> {
    let mut rec = rec;
    for _ in 0..50 {
        match producer.send_result(rec) {
            Ok(f) => {
                pending.push((tag, f));
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(100));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
}

fn kafka_refusal(e: &KafkaError, code: String) -> Refusal {
    let too_large = matches!(
        e.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge)
            | Some(RDKafkaErrorCode::InvalidMessageSize)
            | Some(RDKafkaErrorCode::MessageBatchTooLarge)
    );
    let reason = if too_large {
        DlqReason::TooLarge
    } else {
        DlqReason::SinkRejected
    };
    Refusal::new(
        reason,
        DlqStage::Fanout,
        format!("the fan-out topic refused the record: {e}"),
    )
    .sink_code(code)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, Unavailable> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Unavailable::new(Sink::Kafka, e.to_string()))?
        .map_err(|e| Unavailable::new(Sink::Kafka, format!("transaction: {e}")))
}

async fn abort(producer: &FutureProducer) {
    let p = producer.clone();
    if let Err(e) = blocking(move || p.abort_transaction(Duration::from_secs(30))).await {
        tracing::warn!(error = %e, "abort_transaction failed");
    }
}
