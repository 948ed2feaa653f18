//! Delivering a planned batch to its sinks, and the one truth across them: an event is in
//! PostgreSQL if and only if it is (at least once) on its `helios.events.<Type>` topic; every
//! other unit of the batch is in the DLQ or counted a duplicate.
//!
//! Order, per batch: (1) PostgreSQL, (2) the fan-out of exactly the events PostgreSQL took (an
//! event whose row was already there with another raw record's lineage is a duplicate, not fanned
//! out again), in rounds so that no later record of a key overtakes an earlier one, (3) one DLQ
//! record per raw record with refused units, (4) the release of the dedup marks of events a sink
//! refused — and then, if a duplicate held in this same batch was waiting for one of those marks,
//! it goes through (1)–(4) itself. A [`Delivery`] survives retries: after a transient failure only
//! what was not acknowledged is done again, so no batch is fanned out twice because another sink
//! failed.
//!
//! Errors are classified (see [`crate::model::fault`]). A *transient* one stops the delivery with
//! [`Stop::Unavailable`]; the caller retries it. One *caused by the data* is never retried:
//! PostgreSQL's refusals are isolated by halving, a fan-out refusal takes the event's row back
//! out of PostgreSQL, and the refused events join the DLQ with reason `sink_rejected` (or
//! `too_large`) and the SQLSTATE or Kafka error code in `helios-dlq-sink-code`. An
//! *unclassified* one is retried [`UNCLASSIFIED_RETRIES`] times, then isolated the same way
//! (when nothing of the batch gets through, it stays an outage).
//!
//! [`Delivery::run`] takes the delivery and gives back either [`Delivered`] — the only holder of
//! the batch's [`Ticket`] once delivered, and so the only way to its offsets — or the delivery
//! itself with why it stopped.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::avro::AvroFanOut;
use super::commit::{Commit, CommitSequencer, Ownership, Ticket, TicketId};
use super::config::DeliveryMode;
use super::dedup::{Claim, DedupKey, DedupStore, MarkOwner};
use super::plan::{BatchPlan, DedupPolicy, PlannedEvent, ReplaySpec};
use super::sinks::dlq::{self, DlqForm, DlqItem};
use super::sinks::kafka::{self as ks, Sends, TxnError};
use super::sinks::{fanout, store};
use super::Unavailable;
use crate::db::EventStore;
use crate::limits::SizeLimits;
use crate::model::fault::UNCLASSIFIED_RETRIES;
use crate::model::{CanonicalEvent, DlqReason, DlqStage, RawRecord, Refusal, Sink};
use crate::shutdown::Shutdown;
use crate::topology::Topology;

pub mod gate;
mod txn;

use gate::Gate;

/// What a delivery writes to.
pub struct Outputs<'a, S, D> {
    pub store: &'a S,
    pub dedup: &'a D,
    pub producer: FutureProducer,
    pub topology: &'a Topology,
    pub avro: Option<&'a AvroFanOut>,
    pub replay: Option<&'a ReplaySpec>,
    pub limits: &'a SizeLimits,
    pub mode: &'a DeliveryMode,
    /// The consumer group's metadata, for the offsets of a transaction.
    pub group: Option<Arc<ConsumerGroupMetadata>>,
    /// Who owns which partition now (live processing): the fence of a transaction.
    pub ownership: Option<Arc<Ownership>>,
    /// Ends a transaction commit's retries.
    pub shutdown: Shutdown,
    /// How long one transaction commit call waits before it is made again.
    pub commit_timeout: Duration,
}

impl<S, D> Outputs<'_, S, D> {
    fn replay_id(&self) -> Option<&str> {
        self.replay.map(|r| r.replay_id.as_str())
    }

    fn bypass(&self) -> bool {
        self.replay.is_some_and(|r| r.policy == DedupPolicy::Bypass)
    }
}

/// Why a delivery stopped before every record resolved.
#[derive(Debug)]
pub enum Stop {
    /// A dependency failed: retry the same delivery later.
    Unavailable(Unavailable),
    /// Every partition of the batch was revoked or rewound meanwhile (or, in a transaction, any
    /// of them): the work is left to whoever reads those records next.
    Fenced,
    /// The transactional producer is unusable: create a new one; the batch is read again.
    Fatal(String),
    /// The delivery before this one (it overlapped) was given up: this one is given up too, and
    /// both are read again (see [`gate`]).
    PriorGivenUp,
}

impl From<Unavailable> for Stop {
    fn from(e: Unavailable) -> Self {
        Stop::Unavailable(e)
    }
}

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stop::Unavailable(e) => write!(f, "{e}"),
            Stop::Fenced => f.write_str("the batch's partitions were revoked or rewound"),
            Stop::Fatal(e) => write!(f, "the transactional producer failed for good: {e}"),
            Stop::PriorGivenUp => f.write_str("the batch before it was given up"),
        }
    }
}

/// What is done of one planned event.
#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    stored: bool,
    fanned: bool,
}

/// A batch on its way to the sinks; keeps what was acknowledged across retries.
pub struct Delivery {
    /// The batch's claim on its offsets (none for replays, which commit nothing).
    ticket: Option<Ticket>,
    records: Vec<RawRecord>,
    plan: BatchPlan,
    /// Per `plan.events`.
    progress: Vec<Progress>,
    rows_inserted: u64,
    /// Some fan-out record of this delivery was acknowledged (for isolating unclassified errors).
    some_fanned: bool,
    /// Attempts that failed with an unclassified error.
    unclassified_attempts: u32,
    /// Raw records whose DLQ record was acknowledged.
    dlq_sent: BTreeSet<usize>,
    /// Raw records whose DLQ record must be written smaller (over the limit, or refused).
    dlq_form: BTreeMap<usize, DlqForm>,
    /// Marks claimed by events a sink refused: released before the offsets are committed.
    to_release: Vec<(DedupKey, MarkOwner)>,
    /// How many of `to_release` are released.
    released: usize,
    /// How many of `to_release` were looked at for in-batch duplicates.
    reclaim_checked: usize,
    /// The delivery before this one, when it was still running as this one started (see
    /// [`gate`]).
    prior: gate::Before,
}

/// A batch whose every record resolved: the holder of its ticket, so the only way to its offsets.
pub struct Delivered {
    ticket: Option<Ticket>,
    pub records: Vec<RawRecord>,
    pub plan: BatchPlan,
    pub rows_inserted: u64,
    /// Dedup marks released (their events were refused by a sink).
    pub released: Vec<DedupKey>,
}

impl Delivered {
    /// Resolves the batch's ranges in the sequencer: what may be committed now.
    pub fn resolve(&mut self, seq: &mut CommitSequencer) -> Commit {
        match self.ticket.take() {
            Some(t) => seq.resolve(t),
            None => Commit::default(),
        }
    }
}

/// A unit a sink refused, by its position in `plan.events`.
type Refused = Vec<(usize, Refusal)>;

impl Delivery {
    pub fn new(ticket: Option<Ticket>, records: Vec<RawRecord>, mut plan: BatchPlan) -> Self {
        // An incomplete plan leaves events out of every list: delivering it would commit past
        // them. A bug, not an input: stop here (nothing is committed) rather than lose them.
        assert!(
            plan.is_complete(),
            "a batch plan still waiting for writer's schemas {:?} was delivered",
            plan.writer_schemas
        );
        if crate::telemetry::traces_on() {
            for p in &mut plan.events {
                p.trace = super::plan::EventTrace::start(&p.event, records.get(p.record));
            }
        }
        let progress = vec![Progress::default(); plan.events.len()];
        Delivery {
            ticket,
            records,
            plan,
            progress,
            rows_inserted: 0,
            some_fanned: false,
            unclassified_attempts: 0,
            dlq_sent: BTreeSet::new(),
            dlq_form: BTreeMap::new(),
            to_release: vec![],
            released: 0,
            reclaim_checked: 0,
            prior: gate::Before::None,
        }
    }

    /// This delivery overlaps the one `gate` comes from: its fan-out waits for that one's end.
    pub fn after(mut self, gate: Gate) -> Self {
        self.prior = gate::Before::Running(gate);
        self
    }

    /// The records of the batch.
    pub fn records(&self) -> &[RawRecord] {
        &self.records
    }

    /// Gives the delivery up: the id of its ticket, for the sequencer to rewind its partitions.
    pub fn abandon(self) -> Option<TicketId> {
        self.ticket.map(|t| t.id())
    }

    /// The batch's ticket id.
    pub fn ticket_id(&self) -> Option<TicketId> {
        self.ticket.as_ref().map(Ticket::id)
    }

    /// True when none of the batch's partitions is still owned in the epoch it was polled in.
    pub fn fenced_whole(&self, ownership: &Ownership) -> bool {
        self.ticket.as_ref().is_some_and(|t| {
            !t.spans().is_empty() && t.spans().iter().all(|s| !ownership.holds(&s.key, s.epoch))
        })
    }

    fn fenced_any(&self, ownership: &Ownership) -> bool {
        self.ticket
            .as_ref()
            .is_some_and(|t| t.spans().iter().any(|s| !ownership.holds(&s.key, s.epoch)))
    }

    fn isolate(&self) -> bool {
        self.unclassified_attempts >= UNCLASSIFIED_RETRIES
    }

    /// Does (or resumes) the delivery: every record resolved ([`Delivered`]), or the delivery
    /// back with why it stopped.
    pub async fn run<S: EventStore, D: DedupStore>(
        mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<Delivered, (Delivery, Stop)> {
        let r = match out.mode {
            DeliveryMode::AtLeastOnce => self.at_least_once(out).await,
            DeliveryMode::Transactional { .. } => self.transaction(out).await,
        };
        match r {
            Ok(()) => Ok(self.finish()),
            Err(stop) => {
                if let Stop::Unavailable(e) = &stop {
                    if e.unclassified {
                        self.unclassified_attempts += 1;
                    }
                }
                Err((self, stop))
            }
        }
    }

    async fn at_least_once<S: EventStore, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<(), Stop> {
        loop {
            self.store(out).await?;
            crate::failpoint::hit("deliver.after_store");
            crate::failpoint::hang("deliver.after_store").await;
            if self.follow_prior(out).await? {
                // Held duplicates became events: they are written first.
                continue;
            }
            #[cfg(feature = "failpoints")]
            crate::failpoint::held(&format!(
                "deliver.before_fanout:{}",
                out.topology.consumer_group
            ))
            .await;
            let avro = self.avro_values(out).await?;
            let (refused, transient) = self.fanout(out, &avro, true).await?;
            self.take_back(out, refused).await?;
            if let Some(e) = transient {
                return Err(e.into());
            }
            self.dead_letter(out, false).await?;
            self.release(out).await?;
            if !self.reclaim_in_batch(out).await? {
                return Ok(());
            }
        }
    }

    /// The finished batch (every record resolved).
    fn finish(self) -> Delivered {
        for p in &self.plan.events {
            if let Some(t) = &p.trace {
                t.span.record("helios.outcome", "stored");
            }
        }
        Delivered {
            ticket: self.ticket,
            records: self.records,
            plan: self.plan,
            rows_inserted: self.rows_inserted,
            released: self.to_release.into_iter().map(|(k, _)| k).collect(),
        }
    }

    /// (1) PostgreSQL for the events not stored yet, isolating the events it refuses; events
    /// whose row another raw record wrote become duplicates.
    async fn store<S: EventStore, D>(&mut self, out: &Outputs<'_, S, D>) -> Result<(), Stop> {
        let todo: Vec<usize> = (0..self.plan.events.len())
            .filter(|i| !self.progress[*i].stored)
            .collect();
        if todo.is_empty() {
            return Ok(());
        }
        let events: Vec<&CanonicalEvent> =
            todo.iter().map(|i| &self.plan.events[*i].event).collect();
        let replay_id = out.bypass().then(|| out.replay_id()).flatten();
        let w = store::write_isolating(out.store, &events, replay_id, self.isolate()).await?;
        self.rows_inserted += w.rows;
        for i in &todo {
            self.progress[*i].stored = true;
        }
        let refused: Refused = w.refused.into_iter().map(|(j, r)| (todo[j], r)).collect();
        let foreign: Vec<usize> = w.foreign.into_iter().map(|j| todo[j]).collect();
        self.remove(refused, foreign);
        Ok(())
    }

    /// Avro mode: the encoded values of the events not yet fanned out, by position (asked
    /// before any transaction opens: no registry call inside one).
    async fn avro_values<S, D>(
        &self,
        out: &Outputs<'_, S, D>,
    ) -> Result<BTreeMap<usize, Vec<u8>>, Stop> {
        let mut values = BTreeMap::new();
        let Some(avro) = out.avro else {
            return Ok(values);
        };
        for (i, p) in self.plan.events.iter().enumerate() {
            if !self.progress[i].fanned {
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

    /// (2) The fan-out of the stored events not yet acknowledged, in rounds (`ordered`; a
    /// transaction sends everything at once: it commits whole or not at all). Returns the events
    /// Kafka refused for their data, and the first transient failure (later rounds unsent).
    async fn fanout<S, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
        avro: &BTreeMap<usize, Vec<u8>>,
        ordered: bool,
    ) -> Result<(Refused, Option<Unavailable>), Stop> {
        let content_type = fanout::content_type(out.avro.is_some());
        let replay_id = out.replay_id();
        let topics: Vec<String> = self
            .plan
            .events
            .iter()
            .map(|p| out.topology.event_topic(&p.event.event_type))
            .collect();
        let todo = (0..self.plan.events.len()).filter(|i| !self.progress[*i].fanned);
        let rounds = if ordered {
            fanout::rounds(todo.map(|i| {
                (
                    i,
                    (
                        topics[i].as_str(),
                        self.plan.events[i].event.partition_key(),
                    ),
                )
            }))
        } else {
            vec![todo.collect()]
        };
        let mut refused: Refused = vec![];
        for round in rounds {
            let mut sends = Sends::default();
            for i in round {
                let p = &self.plan.events[i];
                let payload = match avro.get(&i) {
                    Some(v) => v.as_slice(),
                    None => p.payload.as_deref().unwrap_or_default(),
                };
                let rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&topics[i])
                    .key(p.event.partition_key().as_bytes())
                    .payload(payload)
                    .headers(fanout::headers(
                        &p.event,
                        content_type,
                        replay_id,
                        p.trace.as_ref().map(|t| t.traceparent.as_str()),
                    ));
                sends.send(&out.producer, i, rec).await;
            }
            let settled = sends.settle().await;
            self.some_fanned |= !settled.acked.is_empty();
            for i in settled.acked {
                self.progress[i].fanned = true;
            }
            refused.extend(
                settled
                    .refused
                    .into_iter()
                    .map(|(i, e, code)| (i, kafka_refusal(&e, code))),
            );
            if let Some(e) = settled.transient {
                return Ok((refused, Some(e)));
            }
            if let Some((_, e, _)) = settled.unclassified.first() {
                if !self.isolate() || !self.some_fanned {
                    let e = Unavailable::unclassified(
                        Sink::Kafka,
                        format!("the fan-out failed with an unclassified error: {e}"),
                    );
                    return Ok((refused, Some(e)));
                }
                refused.extend(
                    settled
                        .unclassified
                        .into_iter()
                        .map(|(i, e, code)| (i, kafka_refusal(&e, code))),
                );
            }
        }
        Ok((refused, None))
    }

    /// Takes the rows of events Kafka refused back out of PostgreSQL, then moves those events
    /// to the DLQ (in PostgreSQL if and only if on the topic).
    async fn take_back<S: EventStore, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
        refused: Refused,
    ) -> Result<(), Stop> {
        if refused.is_empty() {
            return Ok(());
        }
        let events: Vec<&CanonicalEvent> = refused
            .iter()
            .map(|(i, _)| &self.plan.events[*i].event)
            .collect();
        store::take_back(out.store, &events).await?;
        self.refuse(refused);
        Ok(())
    }

    /// Moves refused events (by position in `plan.events`) into the DLQ items, remembering
    /// their marks for release.
    fn refuse(&mut self, refused: Refused) {
        self.remove(refused, vec![]);
    }

    /// Takes events out of the batch's events (by position in `plan.events`): `refused` ones
    /// into the DLQ items (their marks are released later); `foreign` ones — the store had them
    /// from another raw record — into the duplicates, not fanned out (their marks stay: this
    /// record claimed them after the first one's had expired).
    fn remove(&mut self, refused: Refused, foreign: Vec<usize>) {
        if refused.is_empty() && foreign.is_empty() {
            return;
        }
        let mut refused: BTreeMap<usize, Refusal> = refused.into_iter().collect();
        let foreign: HashSet<usize> = foreign.into_iter().collect();
        let events = std::mem::take(&mut self.plan.events);
        let progress = std::mem::take(&mut self.progress);
        for (i, (p, pr)) in events.into_iter().zip(progress).enumerate() {
            if let Some(refusal) = refused.remove(&i) {
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
            } else if foreign.contains(&i) {
                if let Some(t) = &p.trace {
                    t.span.record("helios.outcome", "duplicate");
                }
                tracing::debug!(event_id = %crate::model::text::bounded(&p.event.event_id, 128),
                    "the store has this event from another raw record: a duplicate, not fanned out again");
                self.plan.duplicates.push(p.event.source);
                self.plan.store_duplicates += 1;
            } else {
                self.plan.events.push(p);
                self.progress.push(pr);
            }
        }
    }

    /// (3) One DLQ record per raw record with refused units, not yet acknowledged; one refused for
    /// its data is written smaller (a reference record, then a minimal one). In a transaction
    /// (`in_txn`) a refusal cannot be followed by another send: how many were refused is returned
    /// instead.
    async fn dead_letter<S, D>(
        &mut self,
        out: &Outputs<'_, S, D>,
        in_txn: bool,
    ) -> Result<Option<usize>, Stop> {
        let topic = out.topology.dlq_topic();
        loop {
            let mut by_record: BTreeMap<usize, Vec<&DlqItem>> = BTreeMap::new();
            for d in &self.plan.dlq {
                if !self.dlq_sent.contains(&d.record) {
                    by_record.entry(d.record).or_default().push(d);
                }
            }
            if by_record.is_empty() {
                return Ok(None);
            }
            let mut sends = Sends::default();
            for (record, items) in &mut by_record {
                items.sort_by_key(|d| d.index);
                let form = self.dlq_form.get(record).cloned().unwrap_or(DlqForm::Full);
                let rec = dlq::record(&topic, &self.records[*record], items, &form, out.limits);
                sends.send(&out.producer, *record, rec).await;
            }
            let settled = sends.settle().await;
            self.dlq_sent.extend(settled.acked);
            if let Some(e) = settled.transient {
                return Err(e.into());
            }
            let mut refused: Vec<(usize, KafkaError)> = settled
                .refused
                .into_iter()
                .map(|(i, e, _)| (i, e))
                .collect();
            if !settled.unclassified.is_empty() {
                if !self.isolate() {
                    return Err(Unavailable::unclassified(
                        Sink::Kafka,
                        "the DLQ refused a record with an unclassified error",
                    )
                    .into());
                }
                refused.extend(settled.unclassified.into_iter().map(|(i, e, _)| (i, e)));
            }
            if refused.is_empty() {
                return Ok(None);
            }
            for (record, e) in &refused {
                let current = self.dlq_form.get(record).cloned().unwrap_or(DlqForm::Full);
                match current.smaller(e.to_string()) {
                    Some(f) => {
                        self.dlq_form.insert(*record, f);
                    }
                    None => {
                        // Nothing left to make smaller: the DLQ itself is at fault.
                        return Err(Unavailable::new(
                            Sink::Kafka,
                            format!("the DLQ refused even a minimal record: {e}"),
                        )
                        .into());
                    }
                }
            }
            if in_txn {
                return Ok(Some(refused.len()));
            }
        }
    }

    /// (4) Releases the marks of events a sink refused.
    async fn release<S, D: DedupStore>(&mut self, out: &Outputs<'_, S, D>) -> Result<(), Stop> {
        if self.released >= self.to_release.len() {
            return Ok(());
        }
        out.dedup
            .release(&self.to_release[self.released..])
            .await
            .map_err(|e| Unavailable::new(Sink::Redis, e.to_string()))?;
        self.released = self.to_release.len();
        Ok(())
    }

    /// Duplicates held in this batch whose first occurrence a sink refused (its mark was just
    /// released) claim the mark now; those that get it become events of this delivery. True when
    /// some did (the delivery goes round again for them).
    async fn reclaim_in_batch<S, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<bool, Stop> {
        let released: HashSet<&DedupKey> = self.to_release[self.reclaim_checked..]
            .iter()
            .map(|(k, _)| k)
            .collect();
        if released.is_empty() || self.plan.held_in_batch.is_empty() {
            self.reclaim_checked = self.to_release.len();
            return Ok(false);
        }
        let (again, keep): (Vec<PlannedEvent>, Vec<PlannedEvent>) =
            std::mem::take(&mut self.plan.held_in_batch)
                .into_iter()
                .partition(|p| released.contains(&DedupKey::of(&p.event)));
        self.plan.held_in_batch = keep;
        if again.is_empty() {
            self.reclaim_checked = self.to_release.len();
            return Ok(false);
        }
        let answers: Vec<bool> = if out.bypass() {
            vec![true; again.len()]
        } else {
            let claims: Vec<(DedupKey, MarkOwner)> = again
                .iter()
                .map(|p| (DedupKey::of(&p.event), MarkOwner::of(&p.event)))
                .collect();
            match out.dedup.claim(&claims).await {
                Ok(a) => a
                    .into_iter()
                    .map(|c| !matches!(c, Claim::Duplicate { .. }))
                    .collect(),
                Err(e) => {
                    self.plan.held_in_batch.extend(again);
                    return Err(Unavailable::new(Sink::Redis, e.to_string()).into());
                }
            }
        };
        self.reclaim_checked = self.to_release.len();
        let mut any = false;
        for (p, won) in again.into_iter().zip(answers) {
            if won {
                if let Some(i) = self
                    .plan
                    .duplicates
                    .iter()
                    .position(|s| *s == p.event.source)
                {
                    self.plan.duplicates.remove(i);
                }
                tracing::info!(event_id = %crate::model::text::bounded(&p.event.event_id, 128),
                    "a sink refused an event; its next copy in the same batch goes through instead");
                self.plan.events.push(p);
                self.progress.push(Progress::default());
                any = true;
            } else {
                self.plan.held_in_batch.push(p);
            }
        }
        Ok(any)
    }
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
