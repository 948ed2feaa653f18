//! The reconciler's write side. What was counted is written while the next batches are read:
//! a write (states, results, resolutions and the event-time progress in one fenced transaction,
//! then the outcomes it inserted published to `helios.reconciliation` from those rows: an
//! outbox) runs as its own task, and only when it has landed are its offsets committed. The
//! outbox keeps one mark per partition, the id up to which every outcome was published
//! (`reconcile_outbox`). An outcome whose publication failed or was cut short by a crash stays
//! above its partition's mark and is published by the sweep ([`Reconciler::publish_unpublished`]) of the partition's owner:
//! the topic can repeat an outcome (same `helios-outcome-id`), never say one the table lacks. One write is on its way at a time; the instances it holds
//! are read from it (not from the store, which has their older rows until it lands). A write
//! that fails, or is refused because another instance claimed one of its partitions, is put
//! back into the pending work and written again (minus what was taken over).

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::engine;
use super::pending::{add_us, Pending, Working, Writing, Wrote};
use super::run::Reconciler;
use super::store::{Fence, Mark, ReconStore, Resolution, ResultRow, StateRow, StoredOutcome};

impl Reconciler {
    /// Starts writing what is pending (nothing when nothing is). Call [`Self::land`] first
    /// when a write is on its way.
    pub(super) fn start_write(&mut self) {
        debug_assert!(self.writing.is_none());
        // Watermarks moved since last written (at most every 2 s), for `helios status` and
        // for the instance that takes a partition over.
        let marks: Vec<((usize, i32), DateTime<Utc>)> =
            if self.last_marks.elapsed() >= super::run::MARKS_EVERY {
                self.watermarks
                    .iter()
                    .filter(|(k, w)| self.marks_written.get(*k) != Some(*w))
                    .map(|(k, w)| (*k, *w))
                    .collect()
            } else {
                vec![]
            };
        let p = &self.pending;
        if p.work.is_empty()
            && p.offsets.is_empty()
            && p.skips.is_empty()
            && p.results.is_empty()
            && marks.is_empty()
        {
            self.pending.since = None;
            return;
        }
        if !marks.is_empty() {
            self.last_marks = Instant::now();
        }
        let mut rest = std::mem::replace(&mut self.pending, Pending::new(self.flows.len()));
        let work = std::mem::take(&mut rest.work);
        let mut states = vec![];
        let mut due = vec![];
        for ((f, key), w) in work.iter().filter(|(_, w)| w.changed) {
            let flow = &self.flows[*f];
            let next_due = engine::next_due(flow, &w.state);
            if let Some(d) = next_due {
                due.push((*f, key.clone(), w.part, d));
            }
            states.push(StateRow {
                flow: flow.name.clone(),
                key: key.clone(),
                part: w.part,
                next_due,
                completed: w.state.complete(flow),
                state: w.state.clone(),
            });
        }
        // Every claimed partition is fenced (a write for one another instance claimed since is
        // refused whole), with how far event time came in what was counted.
        let fence: Vec<Fence> = self
            .claims
            .iter()
            .map(|(tp, generation)| Fence {
                topic: tp.0.clone(),
                part: tp.1,
                generation: *generation,
                sources: rest
                    .newest
                    .get(tp)
                    .map(|m| m.iter().map(|(s, t)| (s.clone(), *t)).collect())
                    .unwrap_or_default(),
                next_offset: rest.offsets.get(tp).copied(),
            })
            .collect();
        let mark_rows: Vec<super::store::Mark> = marks
            .iter()
            .map(|((f, part), w)| {
                let held = self
                    .held
                    .get(&(*f, *part))
                    .map(|h| h.describe())
                    .unwrap_or_default();
                (self.flows[*f].name.clone(), *part, *w, held)
            })
            .collect();
        // Resolutions go with their instance's partition.
        let resolved_parts: Vec<i32> = rest
            .resolved
            .iter()
            .map(|r| {
                self.flows
                    .iter()
                    .position(|f| f.name == r.flow)
                    .and_then(|f| work.get(&(f, r.key.clone())))
                    .map_or(0, |w| w.part)
            })
            .collect();
        // Partitions are independent (each fenced on its own): the write is split by partition
        // into lanes, each its own transaction on its own connection, so PostgreSQL works on
        // them side by side. The write lands when every lane has.
        let lanes = match &self.store {
            super::store::ReconStore::Pg(_) => WRITE_LANES,
            super::store::ReconStore::Sqlite(_) => 1,
        };
        let lane_of = |part: i32| part.rem_euclid(lanes as i32) as usize;
        let mut split: Vec<Lane> = (0..lanes).map(|_| Lane::default()).collect();
        for st in states {
            split[lane_of(st.part)].states.push(st);
        }
        for r in &rest.results {
            split[lane_of(r.part)].results.push(r.clone());
        }
        for (r, part) in rest.resolved.iter().zip(resolved_parts) {
            split[lane_of(part)].resolved.push(r.clone());
        }
        for f in fence {
            split[lane_of(f.part)].fence.push(f);
        }
        for m in mark_rows {
            split[lane_of(m.1)].marks.push(m);
        }
        split.retain(|l| !l.is_empty());
        let (producer, store, stats) = (
            self.producer.clone(),
            self.store.clone(),
            self.stats.clone(),
        );
        let (topic, group) = (
            self.cfg.topology.reconciliation_topic(),
            self.cfg.group.clone(),
        );
        let unswept = self.unswept.clone();
        let task = tokio::spawn(async move {
            let t = Instant::now();
            let wrote =
                futures::future::join_all(split.into_iter().map(|lane| {
                    write_lane(lane, &store, &producer, &topic, &group, &unswept, &stats)
                }))
                .await;
            add_us(&stats.save_us, t);
            let mut all = Wrote::default();
            for w in wrote {
                let w = w?;
                all.taken.extend(w.taken);
                all.unpublished.extend(w.unpublished);
            }
            Ok(all)
        });
        self.writing = Some(Writing {
            work,
            due,
            rest,
            claims: self.claims.clone(),
            task,
            marks,
        });
    }

    /// Waits for the write on its way (if any). Landed: its offsets are committed. Failed or
    /// refused: its work is pending again (minus partitions taken over) and the error returned.
    pub(super) async fn land(&mut self) -> anyhow::Result<()> {
        let Some(w) = self.writing.take() else {
            return Ok(());
        };
        let waited = Instant::now();
        let outcome = match w.task.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the write task ended: {e}")),
        };
        add_us(&self.stats.wait_us, waited);
        match outcome {
            Ok(Wrote { taken, unpublished }) if taken.is_empty() => {
                self.unswept.extend(unpublished);
                // Kept as written, where this instance still holds the claim it wrote under.
                let (topics, now, then) = (&self.flow_topics, &self.claims, &w.claims);
                let mut work = w.work;
                work.retain(|(f, _), x| {
                    topics[*f].first().is_some_and(|t| {
                        let tp = (t.clone(), x.part);
                        now.get(&tp).is_some() && now.get(&tp) == then.get(&tp)
                    })
                });
                self.recent.keep(work);
                for (k, wm) in w.marks {
                    self.marks_written.insert(k, wm);
                }
                self.landed(w.rest)?;
                Ok(())
            }
            Ok(Wrote { taken, .. }) => {
                // Claimed again by this instance since (after a rebalance that left them
                // here): the work is still its own, written under the new claim. Else another
                // instance owns them now.
                let lost: Vec<(String, i32)> = taken
                    .iter()
                    .filter(|tp| self.claims.get(*tp).copied() <= w.claims.get(*tp).copied())
                    .cloned()
                    .collect();
                self.put_back(w.work, w.rest);
                self.taken_over(&lost);
                anyhow::bail!(
                    "partitions {taken:?} were claimed since this write began (by another instance of group {}: {lost:?}); written again without those",
                    self.cfg.group
                )
            }
            Err(e) => {
                self.put_back(w.work, w.rest);
                // A rebalance meanwhile: never write for partitions owned by another now.
                self.refresh_assignment();
                Err(e)
            }
        }
    }

    /// Writes what is pending and waits for it (after the write on its way, if any).
    pub(super) async fn flush(&mut self) -> anyhow::Result<()> {
        self.land().await?;
        self.start_write();
        self.land().await?;
        self.prune(Utc::now()).await;
        Ok(())
    }

    /// A write that did not land goes back in front of what was counted since: a pending
    /// instance is newer (it was taken from the write), but still has the write's change to
    /// write.
    fn put_back(&mut self, work: HashMap<(usize, String), Working>, rest: Pending) {
        let p = &mut self.pending;
        for (k, w) in work {
            match p.work.entry(k) {
                Entry::Occupied(mut e) => e.get_mut().changed |= w.changed,
                Entry::Vacant(e) => {
                    e.insert(w);
                }
            }
        }
        let mut results = rest.results;
        results.append(&mut p.results);
        p.results = results;
        let mut resolved = rest.resolved;
        resolved.append(&mut p.resolved);
        p.resolved = resolved;
        for (tp, o) in rest.offsets {
            let e = p.offsets.entry(tp).or_insert(o);
            *e = (*e).max(o);
        }
        for (tp, sources) in rest.newest {
            let e = p.newest.entry(tp).or_default();
            for (source, t) in sources {
                let n = e.entry(source).or_insert(t);
                *n = (*n).max(t);
            }
        }
        p.skips.extend(rest.skips);
        for (c, r) in p.counted.iter_mut().zip(rest.counted) {
            c.0 += r.0;
            c.1 += r.1;
        }
        p.since = Some(rest.since.unwrap_or_else(Instant::now));
    }

    /// A write landed: its counts are reported, its offsets committed (a failed commit is
    /// retried by the loop; the next write's commit covers these offsets).
    fn landed(&mut self, p: Pending) -> anyhow::Result<()> {
        for skip in p.skips {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_skipped_total", "reason" => skip.as_str())
                .increment(1);
        }
        for (flow, (new, again)) in self.flows.iter().zip(&p.counted) {
            self.stats.events.fetch_add(*new, Ordering::Relaxed);
            self.stats
                .already_counted
                .fetch_add(*again, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_events_total", "flow" => flow.name.clone())
                .increment(*new);
            metrics::counter!("helios_reconcile_already_counted_total", "flow" => flow.name.clone())
                .increment(*again);
        }
        for r in &p.results {
            self.stats.outcomes.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_outcomes_total", "flow" => r.flow.clone(), "outcome" => r.outcome.as_str())
                .increment(1);
            tracing::info!(flow = %r.flow, key = %crate::model::text::bounded(&r.key, 128), outcome = r.outcome.as_str(), step = %r.step, "reconciliation outcome");
        }
        self.stats.batches.fetch_add(1, Ordering::Relaxed);
        self.commit(&p.offsets)
    }

    /// Publishes the outcomes of this instance's partitions that were written but not published
    /// (a crash or a failed send after their transaction). Call it with no write on its way.
    pub(super) async fn publish_unpublished(&mut self) {
        self.last_sweep = Instant::now();
        let mut parts: Vec<i32> = self.claims.keys().map(|tp| tp.1).collect();
        parts.sort_unstable();
        parts.dedup();
        self.sweep(&parts).await;
    }

    /// Publishes what is above the outbox marks of these partitions, moving the marks.
    pub(super) async fn sweep(&mut self, parts: &[i32]) {
        if parts.is_empty() {
            return;
        }
        let topic = self.cfg.topology.reconciliation_topic();
        loop {
            let rows = match self.store.unpublished(parts, 1000).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "unpublished outcomes not read");
                    return;
                }
            };
            if rows.is_empty() {
                break;
            }
            let n = rows.len();
            if let Err(e) = publish(&self.producer, &topic, &rows).await {
                tracing::warn!(error = %e, "outcomes not published; trying again later");
                return;
            }
            // The rows come in id order: each partition's rows above its mark, up to the last
            // one read, were all in this batch.
            if let Err(e) = self
                .store
                .advance_published(&through(&rows, |_| true))
                .await
            {
                tracing::warn!(error = %e, "outcomes published, their outbox marks not moved; trying again later");
                return;
            }
            tracing::info!(outcomes = n, "outcomes written earlier published");
            if n < 1000 {
                break;
            }
        }
        // Everything above the marks of these partitions is published.
        self.unswept.retain(|p| !parts.contains(p));
    }

    /// Deletes instances unchanged for longer than the state retention and published outcome
    /// rows older than their flow's `results_retention`, in chunks of [`PRUNE_CHUNK`] rows (at
    /// most [`PRUNE_CHUNKS`] per look, so a large backlog of expired rows never holds a long
    /// transaction or the loop), and refreshes the open-instance counts the cap and the gauges
    /// use. Looks every quarter of the shortest retention, at most once a minute.
    pub(super) async fn prune(&mut self, now: DateTime<Utc>) {
        let shortest = self
            .flows
            .iter()
            .map(|f| f.results_retention)
            .chain([self.cfg.state_retention])
            .min()
            .unwrap_or(self.cfg.state_retention);
        let every = (shortest / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
        if self.last_prune.elapsed() < every {
            return;
        }
        self.last_prune = Instant::now();
        let parts: Vec<i32> = {
            let all: Vec<String> = self.by_topic.keys().cloned().collect();
            self.clock.partitions(&all)
        };
        if parts.is_empty() {
            return;
        }
        let days = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX);
        let before = now - days(self.cfg.state_retention);
        let mut states = 0;
        for _ in 0..PRUNE_CHUNKS {
            match self.store.prune_states(&parts, before, PRUNE_CHUNK).await {
                Ok(n) => {
                    states += n;
                    if n < PRUNE_CHUNK as u64 {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "flow states not pruned");
                    break;
                }
            }
        }
        let mut results = 0;
        for flow in &self.flows {
            let before = now - days(flow.results_retention);
            for _ in 0..PRUNE_CHUNKS {
                match self
                    .store
                    .prune_results(&flow.name, &parts, before, PRUNE_CHUNK)
                    .await
                {
                    Ok(n) => {
                        results += n;
                        if n < PRUNE_CHUNK as u64 {
                            break;
                        }
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, flow = %flow.name, "outcome rows not pruned");
                        break;
                    }
                }
            }
        }
        if states + results > 0 {
            tracing::info!(states, results, "rows past retention deleted");
            metrics::counter!("helios_reconcile_pruned_total", "table" => "flow_state")
                .increment(states);
            metrics::counter!("helios_reconcile_pruned_total", "table" => "reconciliation_results")
                .increment(results);
        }
        match self.store.open_counts(&parts).await {
            Ok(counts) => {
                self.open.clear();
                self.cap_warned.clear();
                for ((flow, part), n) in counts {
                    if let Some(f) = self.flows.iter().position(|x| x.name == flow) {
                        self.open.insert((f, part), n);
                    }
                }
                self.open_gauges();
            }
            Err(e) => tracing::warn!(error = %e, "open instances not counted"),
        }
    }

    /// `helios_reconcile_open_instances{flow}` (this instance's partitions) and
    /// `helios_reconcile_open_instances_fullest{flow}` (the fullest partition's share of
    /// `max_open_per_partition`).
    pub(super) fn open_gauges(&self) {
        for (f, flow) in self.flows.iter().enumerate() {
            let mine = self.open.iter().filter(|((g, _), _)| *g == f);
            let total: u64 = mine.clone().map(|(_, n)| *n).sum();
            let fullest = mine.map(|(_, n)| *n).max().unwrap_or(0);
            metrics::gauge!("helios_reconcile_open_instances", "flow" => flow.name.clone())
                .set(total as f64);
            metrics::gauge!("helios_reconcile_open_instances_fullest", "flow" => flow.name.clone())
                .set(fullest as f64 / flow.max_open_per_partition as f64);
        }
    }
}

/// Rows deleted per statement when pruning, and statements per look.
const PRUNE_CHUNK: i64 = 5000;
const PRUNE_CHUNKS: usize = 20;

/// Lanes a write is split into (by partition), each its own transaction.
const WRITE_LANES: usize = 2;

/// The part of a write for some partitions.
#[derive(Default)]
struct Lane {
    states: Vec<StateRow>,
    results: Vec<ResultRow>,
    resolved: Vec<Resolution>,
    fence: Vec<Fence>,
    marks: Vec<Mark>,
}

impl Lane {
    fn is_empty(&self) -> bool {
        self.states.is_empty()
            && self.results.is_empty()
            && self.resolved.is_empty()
            && self.marks.is_empty()
            && self
                .fence
                .iter()
                .all(|f| f.next_offset.is_none() && f.sources.is_empty())
    }
}

/// One lane: its transaction, then the outcomes it inserted published from the rows and the
/// outbox marks moved past them (where nothing below waits for the sweep). A publication that
/// fails leaves them to the sweep.
async fn write_lane(
    lane: Lane,
    store: &ReconStore,
    producer: &FutureProducer,
    topic: &str,
    group: &str,
    unswept: &std::collections::HashSet<i32>,
    stats: &super::run::ReconcileStats,
) -> anyhow::Result<Wrote> {
    let saved = store
        .save(
            &lane.states,
            &lane.results,
            &lane.resolved,
            group,
            &lane.fence,
            &lane.marks,
        )
        .await?;
    let mut unpublished = vec![];
    if saved.taken.is_empty() && !saved.inserted.is_empty() {
        let t = Instant::now();
        let parts = || {
            let mut p: Vec<i32> = saved.inserted.iter().map(|o| o.row.part).collect();
            p.sort_unstable();
            p.dedup();
            p
        };
        match publish(producer, topic, &saved.inserted).await {
            Ok(()) => {
                let marks = through(&saved.inserted, |p| !unswept.contains(&p));
                if let Err(e) = store.advance_published(&marks).await {
                    tracing::warn!(error = %e, "outcomes published, their outbox marks not moved; the sweep publishes them again");
                    unpublished = parts();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, outcomes = saved.inserted.len(), "outcomes written, not published yet; the sweep publishes them");
                unpublished = parts();
            }
        }
        add_us(&stats.send_us, t);
    }
    Ok(Wrote {
        taken: saved.taken,
        unpublished,
    })
}

/// The outbox marks for these published rows: per partition (where `moves` says so), the
/// highest id.
fn through(rows: &[StoredOutcome], moves: impl Fn(i32) -> bool) -> Vec<(i32, i64)> {
    let mut marks: HashMap<i32, i64> = HashMap::new();
    for o in rows.iter().filter(|o| moves(o.row.part)) {
        let m = marks.entry(o.row.part).or_insert(o.id);
        *m = (*m).max(o.id);
    }
    let mut marks: Vec<(i32, i64)> = marks.into_iter().collect();
    marks.sort_unstable();
    marks
}

/// One record per stored outcome on the reconciliation topic, keyed by the flow key, with the
/// row's id (`helios-outcome-id`), every one acknowledged.
async fn publish(
    producer: &FutureProducer,
    topic: &str,
    rows: &[StoredOutcome],
) -> anyhow::Result<()> {
    if crate::failpoint::fails(&format!("reconcile.publish:{topic}")) {
        anyhow::bail!("failpoint reconcile.publish: not published");
    }
    let mut pending = Vec::with_capacity(rows.len());
    for o in rows {
        let r = &o.row;
        let id = o.id.to_string();
        let value = serde_json::json!({
            "id": o.id, "flow": r.flow, "key": r.key, "outcome": r.outcome.as_str(), "step": r.step,
            "event_time": r.event_time, "duration_ms": r.duration_ms, "detail": r.detail,
            "detected_at": o.detected_at,
        })
        .to_string();
        let headers = OwnedHeaders::new_with_capacity(4)
            .insert(Header {
                key: "helios-flow",
                value: Some(r.flow.as_str()),
            })
            .insert(Header {
                key: "helios-outcome",
                value: Some(r.outcome.as_str()),
            })
            .insert(Header {
                key: "helios-outcome-id",
                value: Some(id.as_str()),
            })
            .insert(Header {
                key: "content-type",
                value: Some("application/json"),
            });
        let rec = FutureRecord::to(topic)
            .key(r.key.as_str())
            .payload(value.as_str())
            .headers(headers);
        pending.push(producer.send_result(rec).map_err(|(e, _)| e)?);
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
