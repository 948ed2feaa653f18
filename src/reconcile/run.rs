//! The reconciler loop: a consumer-group member over the flows' fan-out topics, co-partitioned
//! (the range assignor gives one member partition p of every step topic, since they have equal
//! partition counts). Per batch: count the events into their instances' states, fire the
//! deadlines the watermarks passed, send the outcomes to `helios.reconciliation` and wait for
//! the acknowledgements, write states, results and resolutions in one transaction, and only
//! then commit the offsets. A crash before the transaction re-does the batch (its outcome
//! records may be sent twice; the rows are written once); a crash after it finds every event
//! already counted and changes nothing.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::clock::Clock;
use super::engine::{self, Effects, FlowState, OutcomeKind};
use super::input::{self, Seen};
use super::store::{ReconStore, Resolution, ResultRow, StateRow};
use crate::config::KafkaSettings;
use crate::pipeline::retry::Backoff;
use crate::shutdown::Shutdown;
use crate::topology::{Flow, Topology};

/// Default records per batch.
pub const DEFAULT_BATCH: usize = 2000;
/// Instances fetched per flow per look for due deadlines.
const DUE_LIMIT: i64 = 5000;

/// What a reconciler needs.
#[derive(Debug, Clone)]
pub struct ReconcilerConfig {
    pub kafka: KafkaSettings,
    pub topology: Topology,
    pub group: String,
    pub batch_size: usize,
    /// A partition with nothing new for this long advances on wall-clock time.
    pub idle_after: Duration,
    /// Instances unchanged for this long are deleted (keep it ≥ the raw topics' retention, so
    /// a replay always finds the events it re-emits already counted).
    pub state_retention: Duration,
}

/// Counters the tests and `/metrics` read.
#[derive(Debug, Default)]
pub struct ReconcileStats {
    pub events: AtomicU64,
    pub skipped: AtomicU64,
    pub already_counted: AtomicU64,
    pub outcomes: AtomicU64,
    pub batches: AtomicU64,
    /// Topic-partitions assigned now.
    pub assigned: AtomicU64,
}

/// One instance being worked on in a batch.
struct Working {
    part: i32,
    state: FlowState,
    changed: bool,
}

/// A running reconciler.
pub struct Reconciler {
    cfg: ReconcilerConfig,
    flows: Vec<Flow>,
    /// Step topics of each flow (same order as `flows`).
    flow_topics: Vec<Vec<String>>,
    /// Fan-out topic → (flow index) of the flows it is a step of.
    by_topic: HashMap<String, Vec<usize>>,
    store: ReconStore,
    consumer: StreamConsumer,
    producer: FutureProducer,
    clock: Clock,
    /// Messages received while paused for a retry: the next batch starts with them.
    stash: Vec<rdkafka::message::OwnedMessage>,
    pub stats: Arc<ReconcileStats>,
    last_prune: Instant,
}

impl Reconciler {
    pub fn new(cfg: ReconcilerConfig, store: ReconStore) -> anyhow::Result<Self> {
        let flows = cfg.topology.flows()?;
        if flows.is_empty() {
            anyhow::bail!(
                "the topology declares no flows: add one under `flows:` (see topology.yaml) for helios reconcile to follow"
            );
        }
        let flow_topics: Vec<Vec<String>> = flows
            .iter()
            .map(|f| {
                f.steps
                    .iter()
                    .map(|s| cfg.topology.event_topic(&s.event_type))
                    .collect()
            })
            .collect();
        let mut by_topic: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, topics) in flow_topics.iter().enumerate() {
            for t in topics {
                by_topic.entry(t.clone()).or_default().push(i);
            }
        }
        let mut c = cfg.kafka.client_config();
        for (k, v) in [
            ("client.id", "helios-reconciler"),
            ("auto.offset.reset", "earliest"),
            ("session.timeout.ms", "15000"),
            ("queued.max.messages.kbytes", "16384"),
            ("fetch.wait.max.ms", "20"),
        ] {
            if !cfg.kafka.properties.contains_key(k) {
                c.set(k, v);
            }
        }
        // Co-partitioning: the range assignor gives a member the same partition numbers of
        // every topic with the same partition count. Not overridable.
        c.set("partition.assignment.strategy", "range");
        c.set("group.id", &cfg.group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        c.set("isolation.level", "read_committed");
        let consumer: StreamConsumer = c.create()?;
        let mut p = cfg.kafka.client_config();
        for (k, v) in [
            ("client.id", "helios-reconciler"),
            ("acks", "all"),
            ("enable.idempotence", "true"),
            ("linger.ms", "5"),
        ] {
            if !cfg.kafka.properties.contains_key(k) {
                p.set(k, v);
            }
        }
        let producer: FutureProducer = p.create()?;
        for f in &flows {
            for k in OutcomeKind::ALL {
                metrics::counter!("helios_reconcile_outcomes_total", "flow" => f.name.clone(), "outcome" => k.as_str())
                    .increment(0);
            }
            metrics::counter!("helios_reconcile_events_total", "flow" => f.name.clone())
                .increment(0);
        }
        Ok(Reconciler {
            cfg,
            flows,
            flow_topics,
            by_topic,
            store,
            consumer,
            producer,
            clock: Clock::default(),
            stash: vec![],
            stats: Arc::default(),
            last_prune: Instant::now(),
        })
    }

    /// Checks the step topics' partition counts on the broker (equal, or co-partitioning
    /// breaks), then follows the flows until shutdown.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        let topics: Vec<String> = {
            let mut t: Vec<String> = self.by_topic.keys().cloned().collect();
            t.sort();
            t
        };
        self.check_partitions().await?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&names)?;
        tracing::info!(flows = self.flows.len(), topics = ?topics, group = %self.cfg.group, "reconciler started");
        let mut backoff = Backoff::default();
        while !shutdown.is_triggered() {
            let batch = tokio::select! {
                b = self.poll_batch() => b,
                _ = shutdown.clone().wait() => break,
            };
            loop {
                match self.process(&batch).await {
                    Ok(()) => {
                        backoff = Backoff::default();
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "reconciliation batch not written; retrying");
                        metrics::counter!("helios_reconcile_retries_total").increment(1);
                        if !self.wait_polling(backoff.next_wait(), &shutdown).await {
                            return Ok(());
                        }
                    }
                }
            }
        }
        tracing::info!("reconciler stopped");
        Ok(())
    }

    async fn check_partitions(&self) -> anyhow::Result<()> {
        let settings = self.cfg.kafka.clone();
        let flows: Vec<(String, Vec<String>)> = self
            .flows
            .iter()
            .zip(&self.flow_topics)
            .map(|(f, t)| (f.name.clone(), t.clone()))
            .collect();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let c = crate::kafka::reader(&settings, "reconcile-check")?;
            for (flow, topics) in flows {
                let mut counts = vec![];
                for t in &topics {
                    let md = c.fetch_metadata(Some(t), Duration::from_secs(10))?;
                    let n = md
                        .topics()
                        .first()
                        .filter(|m| m.error().is_none())
                        .map(|m| m.partitions().len())
                        .unwrap_or(0);
                    if n == 0 {
                        anyhow::bail!(
                            "flow `{flow}`: topic {t} does not exist; create it with `helios topology apply`"
                        );
                    }
                    counts.push((t.clone(), n));
                }
                if counts.iter().any(|(_, n)| *n != counts[0].1) {
                    anyhow::bail!(
                        "flow `{flow}`: the step topics have different partition counts on the broker ({}); one order's events would not meet in one reconciler",
                        counts
                            .iter()
                            .map(|(t, n)| format!("{t}: {n}"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                }
            }
            Ok(())
        })
        .await?
    }

    /// Up to `batch_size` records: the first waits up to 200 ms, the rest are taken while more
    /// are waiting. An empty or cut-short batch means the consumer has caught up.
    async fn poll_batch(&mut self) -> Vec<rdkafka::message::OwnedMessage> {
        let mut out = std::mem::take(&mut self.stash);
        let mut caught_up = false;
        while out.len() < self.cfg.batch_size {
            let wait = if out.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(2)
            };
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(Ok(m)) => out.push(m.detach()),
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "consumer error");
                    break;
                }
                Err(_) => {
                    caught_up = true;
                    break;
                }
            }
        }
        let assigned: Vec<(String, i32)> = self
            .consumer
            .assignment()
            .map(|tpl| {
                tpl.elements()
                    .iter()
                    .map(|e| (e.topic().to_string(), e.partition()))
                    .collect()
            })
            .unwrap_or_default();
        self.stats
            .assigned
            .store(assigned.len() as u64, Ordering::Relaxed);
        self.clock.assigned(&assigned);
        if caught_up {
            // Records read now are newer than the catch-up point: the clock sees them after.
            self.clock.caught_up();
        }
        out
    }

    /// While a batch waits to be retried: partitions paused, the consumer polled (the group
    /// sees a live member), anything still delivered kept for the next batch. False: shutdown.
    async fn wait_polling(&mut self, d: Duration, shutdown: &Shutdown) -> bool {
        let assignment = self.consumer.assignment().unwrap_or_default();
        let _ = self.consumer.pause(&assignment);
        let until = Instant::now() + d;
        while Instant::now() < until {
            if shutdown.is_triggered() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if let Ok(Ok(m)) =
                tokio::time::timeout(left.min(Duration::from_millis(100)), self.consumer.recv())
                    .await
            {
                self.stash.push(m.detach());
            }
        }
        let _ = self.consumer.resume(&assignment);
        !shutdown.is_triggered()
    }

    /// Counts a batch, fires due deadlines, writes, commits.
    async fn process(&mut self, batch: &[rdkafka::message::OwnedMessage]) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut seen: Vec<(usize, Seen)> = vec![];
        let mut skips: Vec<input::Skip> = vec![];
        for m in batch {
            match input::read(m, now) {
                Ok(s) => {
                    self.clock.record(
                        &s.sighting.topic,
                        s.sighting.partition,
                        s.sighting.occurred_at,
                    );
                    if let Some(flows) = self.by_topic.get(&s.sighting.topic) {
                        for &f in flows {
                            seen.push((f, s.clone()));
                        }
                    }
                }
                Err(skip) => skips.push(skip),
            }
        }
        // The instances this batch touches, as stored.
        let keys: Vec<(String, String)> = {
            let set: HashSet<(String, String)> = seen
                .iter()
                .map(|(f, s)| (self.flows[*f].name.clone(), s.order_id.clone()))
                .collect();
            set.into_iter().collect()
        };
        let stored = self.store.load(&keys).await?;
        let mut work: HashMap<(usize, String), Working> = HashMap::new();
        let flow_index: HashMap<&str, usize> = self
            .flows
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i))
            .collect();
        for ((flow, key), (part, state)) in stored {
            if let Some(&i) = flow_index.get(flow.as_str()) {
                work.insert(
                    (i, key),
                    Working {
                        part,
                        state,
                        changed: false,
                    },
                );
            }
        }
        let mut results: Vec<ResultRow> = vec![];
        let mut resolved: Vec<Resolution> = vec![];
        // Per flow: events counted, events already counted (reported once the batch is written).
        let mut counted = vec![(0u64, 0u64); self.flows.len()];
        for (f, s) in seen {
            let flow = &self.flows[f];
            let w = work.entry((f, s.order_id.clone())).or_insert(Working {
                part: s.sighting.partition,
                state: FlowState::default(),
                changed: false,
            });
            w.part = s.sighting.partition;
            let fx = engine::apply(flow, &mut w.state, s.sighting);
            if fx.already_counted {
                counted[f].1 += 1;
                continue;
            }
            w.changed = true;
            counted[f].0 += 1;
            collect(flow, &s.order_id, fx, &mut results, &mut resolved);
        }
        // Deadlines: the instances due on the owned partitions, and those of this batch.
        for (f, flow) in self.flows.iter().enumerate() {
            let topics = &self.flow_topics[f];
            let wms: BTreeMap<i32, DateTime<Utc>> = self
                .clock
                .partitions(topics)
                .into_iter()
                .filter_map(|p| {
                    self.clock
                        .watermark(flow, topics, p, self.cfg.idle_after, now)
                        .map(|w| (p, w))
                })
                .collect();
            if wms.is_empty() {
                continue;
            }
            let list: Vec<(i32, DateTime<Utc>)> = wms.iter().map(|(p, w)| (*p, *w)).collect();
            for (key, part, state) in self.store.due(&flow.name, &list, DUE_LIMIT).await? {
                work.entry((f, key)).or_insert(Working {
                    part,
                    state,
                    changed: false,
                });
            }
            for ((wf, key), w) in work.iter_mut() {
                if *wf != f {
                    continue;
                }
                let Some(wm) = wms.get(&w.part) else {
                    continue;
                };
                let fx = engine::due(flow, &mut w.state, *wm);
                if !fx.outcomes.is_empty() {
                    w.changed = true;
                    collect(flow, key, fx, &mut results, &mut resolved);
                }
            }
        }
        let states: Vec<StateRow> = work
            .into_iter()
            .filter(|(_, w)| w.changed)
            .map(|((f, key), w)| {
                let flow = &self.flows[f];
                StateRow {
                    flow: flow.name.clone(),
                    key,
                    part: w.part,
                    next_due: engine::next_due(flow, &w.state),
                    completed: w.state.complete(flow),
                    state: w.state,
                }
            })
            .collect();
        if !results.is_empty() {
            self.send(&results).await?;
        }
        if !states.is_empty() || !results.is_empty() || !resolved.is_empty() {
            self.store.save(&states, &results, &resolved).await?;
        }
        for skip in skips {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_skipped_total", "reason" => skip.as_str())
                .increment(1);
        }
        for (flow, (new, again)) in self.flows.iter().zip(&counted) {
            self.stats.events.fetch_add(*new, Ordering::Relaxed);
            self.stats
                .already_counted
                .fetch_add(*again, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_events_total", "flow" => flow.name.clone())
                .increment(*new);
            metrics::counter!("helios_reconcile_already_counted_total", "flow" => flow.name.clone())
                .increment(*again);
        }
        for r in &results {
            self.stats.outcomes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_outcomes_total", "flow" => r.flow.clone(), "outcome" => r.outcome.as_str())
                .increment(1);
            tracing::info!(flow = %r.flow, key = %crate::model::text::bounded(&r.key, 128), outcome = r.outcome.as_str(), step = %r.step, "reconciliation outcome");
        }
        if !batch.is_empty() {
            self.commit(batch)?;
            self.stats.batches.fetch_add(1, Ordering::Relaxed);
        }
        self.prune(now).await;
        Ok(())
    }

    /// One record per outcome on the reconciliation topic, keyed by the flow key; returns when
    /// every one was acknowledged.
    async fn send(&self, results: &[ResultRow]) -> anyhow::Result<()> {
        let topic = self.cfg.topology.reconciliation_topic();
        let detected = Utc::now();
        let mut pending = Vec::with_capacity(results.len());
        for r in results {
            let value = serde_json::json!({
                "flow": r.flow, "key": r.key, "outcome": r.outcome.as_str(), "step": r.step,
                "event_time": r.event_time, "duration_ms": r.duration_ms, "detail": r.detail,
                "detected_at": detected,
            })
            .to_string();
            let headers = OwnedHeaders::new_with_capacity(3)
                .insert(Header {
                    key: "helios-flow",
                    value: Some(r.flow.as_str()),
                })
                .insert(Header {
                    key: "helios-outcome",
                    value: Some(r.outcome.as_str()),
                })
                .insert(Header {
                    key: "content-type",
                    value: Some("application/json"),
                });
            let rec = FutureRecord::to(&topic)
                .key(r.key.as_str())
                .payload(value.as_str())
                .headers(headers);
            pending.push(self.producer.send_result(rec).map_err(|(e, _)| e)?);
        }
        for p in pending {
            match p.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("outcome record not acknowledged: {e}"),
                Err(_) => anyhow::bail!("outcome record cancelled"),
            }
        }
        Ok(())
    }

    fn commit(&self, batch: &[rdkafka::message::OwnedMessage]) -> anyhow::Result<()> {
        use rdkafka::Message;
        let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
        for m in batch {
            let e = next
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in next {
            tpl.add_partition_offset(&t, p, Offset::Offset(o))?;
        }
        // A partition revoked since the batch was polled is refused by the group: its new
        // owner reads the batch again and finds every event already counted.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offsets not committed");
        }
        Ok(())
    }

    /// Deletes instances unchanged for longer than the retention (at most once a minute).
    async fn prune(&mut self, now: DateTime<Utc>) {
        if self.last_prune.elapsed() < Duration::from_secs(60) {
            return;
        }
        self.last_prune = Instant::now();
        let parts: Vec<i32> = {
            let all: Vec<String> = self.by_topic.keys().cloned().collect();
            self.clock.partitions(&all)
        };
        let before = now - chrono::Duration::from_std(self.cfg.state_retention).unwrap_or_default();
        match self.store.prune(&parts, before).await {
            Ok(n) if n > 0 => tracing::info!(deleted = n, "flow states past retention deleted"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "flow states not pruned"),
        }
    }
}

fn collect(
    flow: &Flow,
    key: &str,
    fx: Effects,
    results: &mut Vec<ResultRow>,
    resolved: &mut Vec<Resolution>,
) {
    for o in fx.outcomes {
        results.push(ResultRow {
            flow: flow.name.clone(),
            key: key.to_string(),
            outcome: o.kind,
            step: o.step,
            event_time: o.event_time,
            duration_ms: o.duration_ms,
            detail: o.detail,
        });
    }
    for (outcome, step) in fx.resolved {
        resolved.push(Resolution {
            flow: flow.name.clone(),
            key: key.to_string(),
            outcome,
            step,
        });
    }
}
