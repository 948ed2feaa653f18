//! Planning a batch: what each raw record becomes, before anything is written.
//!
//! Two phases. [`prepare`] is pure: normalize each record, validate each event (rules, schemas,
//! the unknown-type policy), apply the sink guards, encode the fan-out value and check its size,
//! and hold duplicates inside the batch (the first valid occurrence goes ahead; a later copy is
//! counted a duplicate and kept aside, so it still goes through if a sink refuses the first:
//! see the delivery). Only then does
//! [`claim`] ask the dedup store, for the events that will really be written: an event refused
//! before the store never claims a mark, so a corrected resend of its id is processed.

use std::collections::HashSet;

use super::dedup::{Claim, DedupKey, DedupStore, MarkOwner};
use super::normalize::normalize;
use super::sinks::dlq::DlqItem;
use super::sinks::fanout;
use super::validate::Validator;
use super::{guard, Unavailable};
use crate::db::EventStore;
use crate::limits::SizeLimits;
use crate::model::headers::raw as rh;
use crate::model::{CanonicalEvent, Normalized, RawRecord, Refusal, Sink};
use crate::source::Source;
use crate::topology::Topology;

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

/// An event that will be written, with what its writes need.
#[derive(Debug, Clone)]
pub struct PlannedEvent {
    pub event: CanonicalEvent,
    /// Position of its raw record in the batch.
    pub record: usize,
    /// The JSON fan-out value (none in Avro mode: encoded at delivery).
    pub payload: Option<Vec<u8>>,
    /// The event's processor span, while traces are exported (set at delivery).
    pub trace: Option<EventTrace>,
}

/// The processor span of one event and its context, written on the fan-out record. The span
/// ends when the batch is done with the event (dropped with the plan).
#[derive(Debug, Clone)]
pub struct EventTrace {
    pub span: tracing::Span,
    pub traceparent: String,
}

impl EventTrace {
    /// The span of `e`, landed as `raw`: a child of the context the raw record carries (the
    /// ingress span's, when the ingress exports traces too), else of the event's own.
    pub fn start(e: &CanonicalEvent, raw: Option<&RawRecord>) -> Option<EventTrace> {
        if !crate::telemetry::traces_on() {
            return None;
        }
        let span = tracing::info_span!(target: crate::telemetry::SPAN_TARGET, "helios.process",
            otel.kind = "consumer", helios.event_id = %crate::model::text::bounded(&e.event_id, 128),
            helios.event_type = e.event_type.as_str(), helios.source = e.source.as_str(),
            messaging.system = "kafka", messaging.source.name = e.raw.topic.as_str(),
            messaging.kafka.partition = e.raw.partition, messaging.kafka.offset = e.raw.offset,
            helios.outcome = tracing::field::Empty);
        let parent = raw
            .and_then(|r| r.header("traceparent"))
            .filter(|t| crate::model::draft::valid_traceparent(t))
            .or(e.metadata.get("traceparent").map(String::as_str));
        let traceparent = crate::telemetry::continue_trace(&span, parent)?;
        Some(EventTrace { span, traceparent })
    }
}

/// What a batch will produce.
#[derive(Debug, Default)]
pub struct BatchPlan {
    pub events: Vec<PlannedEvent>,
    pub dlq: Vec<DlqItem>,
    pub duplicates: Vec<Source>,
    /// Duplicates of an event another raw record claimed: kept aside in case that record's
    /// delivery (still running) dead-letters it and releases the mark (see [`reclaim`]).
    pub held: Vec<PlannedEvent>,
    /// Later copies of an event whose first copy is in this same batch: counted duplicates,
    /// kept aside in case a sink refuses the first (the delivery then claims for them).
    pub held_in_batch: Vec<PlannedEvent>,
    /// Of `duplicates`: events the store already had from another raw record (their dedup mark
    /// had expired or was lost), found at delivery.
    pub store_duplicates: u64,
    pub handshakes: Vec<Source>,
    /// Units that entered the pipeline per source: events parsed + unreadable records.
    pub units_in: Vec<Source>,
    /// Records or events left out by a replay's filters.
    pub filtered: u64,
    /// Writer's schema versions (subject, version) some event needs from the registry: while
    /// any is listed, the plan is incomplete (those events are in no list); fetch them
    /// ([`crate::pipeline::schema::WriterSchemas::fetch`]) and prepare the batch again.
    pub writer_schemas: std::collections::BTreeSet<(String, u32)>,
}

impl BatchPlan {
    /// False while some event waits for its writer's schema (see [`Self::writer_schemas`]).
    pub fn is_complete(&self) -> bool {
        self.writer_schemas.is_empty()
    }

    /// True when some event was refused only because its type's topic is unknown (a topic may
    /// have been created since the topic list was read: worth a second look).
    pub fn has_unknown_types(&self) -> bool {
        self.dlq
            .iter()
            .any(|d| d.refusal.reason == crate::model::DlqReason::UnknownEventType)
    }
}

/// Everything [`prepare`] reads.
pub struct PlanContext<'a> {
    pub validator: &'a Validator,
    pub existing_topics: &'a HashSet<String>,
    pub topology: &'a Topology,
    pub replay: Option<&'a ReplaySpec>,
    pub limits: &'a SizeLimits,
    /// Avro fan-out: the JSON value is only measured, not kept.
    pub avro: bool,
}

/// Phase one (pure): normalize, validate, guard, encode, and drop in-batch duplicates.
pub fn prepare(records: &[RawRecord], ctx: &PlanContext<'_>) -> BatchPlan {
    let mut plan = BatchPlan::default();
    let mut seen: HashSet<DedupKey> = HashSet::new();
    for (i, raw) in records.iter().enumerate() {
        let source = raw
            .header(rh::SOURCE)
            .and_then(Source::parse)
            .unwrap_or(Source::Direct);
        if ctx
            .replay
            .is_some_and(|r| !r.sources.is_empty() && !r.sources.contains(&source))
        {
            plan.filtered += 1;
            continue;
        }
        match normalize(raw) {
            Normalized::Handshake => plan.handshakes.push(source),
            Normalized::Failed(e) => {
                plan.units_in.push(source);
                plan.dlq.push(DlqItem {
                    record: i,
                    index: e.index,
                    refusal: e.into(),
                });
            }
            Normalized::Events { events, handshakes } => {
                plan.handshakes
                    .extend(std::iter::repeat_n(source, handshakes as usize));
                for r in events {
                    if let (Some(spec), Ok(ev)) = (ctx.replay, &r) {
                        if !spec.event_types.is_empty()
                            && !spec.event_types.contains(&ev.event_type)
                        {
                            plan.filtered += 1;
                            continue;
                        }
                    }
                    plan.units_in.push(source);
                    if let Some(need) = r
                        .as_ref()
                        .ok()
                        .and_then(|ev| ctx.validator.pending_schema(ev))
                    {
                        plan.writer_schemas.insert(need);
                        continue;
                    }
                    match r.map_err(|e| (e.index, Refusal::from(e))).and_then(|ev| {
                        let index = Some(ev.raw.index);
                        check(ev, ctx).map_err(|r| (index, r))
                    }) {
                        Ok((ev, payload)) => {
                            let first = seen.insert(DedupKey::of(&ev));
                            let p = PlannedEvent {
                                event: ev,
                                record: i,
                                payload,
                                trace: None,
                            };
                            if first {
                                plan.events.push(p);
                            } else {
                                plan.duplicates.push(source);
                                plan.held_in_batch.push(p);
                            }
                        }
                        Err((index, refusal)) => plan.dlq.push(DlqItem {
                            record: i,
                            index,
                            refusal,
                        }),
                    }
                }
            }
        }
    }
    plan
}

/// Guards, rules and the fan-out size of one event; its JSON value unless in Avro mode.
fn check(
    ev: CanonicalEvent,
    ctx: &PlanContext<'_>,
) -> Result<(CanonicalEvent, Option<Vec<u8>>), Refusal> {
    guard::check_event(&ev)?;
    ctx.validator
        .check(&ev, ctx.existing_topics, |t| ctx.topology.event_topic(t))?;
    let payload = fanout::json_payload(&ev);
    let replay_id = ctx.replay.map(|r| r.replay_id.as_str());
    guard::check_fanout_size(
        payload.len(),
        fanout::key_and_headers_size(&ev, replay_id),
        ctx.limits,
    )?;
    Ok((ev, (!ctx.avro).then_some(payload)))
}

/// Phase two: the dedup store's verdict on the planned events. Duplicates leave `plan.events`
/// (and are counted); on error the plan is unchanged, so the caller can retry.
pub async fn claim<D: DedupStore, S: EventStore>(
    plan: &mut BatchPlan,
    dedup: &D,
    store: &S,
    replay: Option<&ReplaySpec>,
) -> Result<(), Unavailable> {
    let claims: Vec<(DedupKey, MarkOwner)> = plan
        .events
        .iter()
        .map(|p| (DedupKey::of(&p.event), MarkOwner::of(&p.event)))
        .collect();
    let redis = |e: super::dedup::DedupError| Unavailable::new(Sink::Redis, e.to_string());
    let is_dup: Vec<bool> = match replay {
        None => dedup
            .claim(&claims)
            .await
            .map_err(redis)?
            .into_iter()
            .map(|c| matches!(c, Claim::Duplicate { .. }))
            .collect(),
        Some(spec) if spec.policy == DedupPolicy::Bypass => vec![false; claims.len()],
        Some(spec) => {
            // Respect: already processed = a row exists, or another raw record owns the mark.
            // (A replayed record meets its own mark: that alone does not make it a duplicate.)
            let keys: Vec<(String, String)> = plan
                .events
                .iter()
                .map(|p| {
                    (
                        p.event.source.as_str().to_string(),
                        p.event.event_id.clone(),
                    )
                })
                .collect();
            let stored = store
                .existing(&keys)
                .await
                .map_err(|e| Unavailable::new(Sink::Postgres, e.to_string()))?;
            let foreign: Vec<bool> = if spec.dry_run {
                let k: Vec<DedupKey> = claims.iter().map(|(k, _)| k.clone()).collect();
                dedup
                    .peek(&k)
                    .await
                    .map_err(redis)?
                    .into_iter()
                    .zip(&claims)
                    .map(|(o, (_, own))| o.is_some_and(|o| o != own.0))
                    .collect()
            } else {
                dedup
                    .claim(&claims)
                    .await
                    .map_err(redis)?
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
    let events = std::mem::take(&mut plan.events);
    for (p, dup) in events.into_iter().zip(is_dup) {
        if dup {
            plan.duplicates.push(p.event.source);
            plan.held.push(p);
        } else {
            plan.events.push(p);
        }
    }
    Ok(())
}

/// Claims again the held duplicates whose key was `released` (the batch before dead-lettered
/// its first occurrence after this batch was planned): those that now own the mark become
/// events again.
pub async fn reclaim<D: DedupStore>(
    plan: &mut BatchPlan,
    released: &HashSet<DedupKey>,
    dedup: &D,
) -> Result<(), Unavailable> {
    let (again, keep): (Vec<PlannedEvent>, Vec<PlannedEvent>) = std::mem::take(&mut plan.held)
        .into_iter()
        .partition(|p| released.contains(&DedupKey::of(&p.event)));
    plan.held = keep;
    if again.is_empty() {
        return Ok(());
    }
    let claims: Vec<(DedupKey, MarkOwner)> = again
        .iter()
        .map(|p| (DedupKey::of(&p.event), MarkOwner::of(&p.event)))
        .collect();
    let answers = match dedup.claim(&claims).await {
        Ok(a) => a,
        Err(e) => {
            plan.held.extend(again);
            return Err(Unavailable::new(Sink::Redis, e.to_string()));
        }
    };
    for (p, c) in again.into_iter().zip(answers) {
        if matches!(c, Claim::Duplicate { .. }) {
            plan.held.push(p);
        } else {
            if let Some(i) = plan.duplicates.iter().position(|s| *s == p.event.source) {
                plan.duplicates.remove(i);
            }
            plan.events.push(p);
        }
    }
    Ok(())
}
