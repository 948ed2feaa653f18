//! The reconciler's write side. What was counted is written while the next batches are read:
//! a write (states, results, resolutions and the event-time progress in one fenced transaction,
//! then the outcomes it inserted published to `helios.reconciliation` from those rows: an
//! outbox) runs as its own task, and only when it has landed are its offsets committed. An
//! outcome whose publication failed or was cut short by a crash stays unpublished in the table
//! and is published by the sweep ([`Reconciler::publish_unpublished`]) of the partition's owner:
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
use super::pending::{add_us, Pending, Working, Writing};
use super::run::Reconciler;
use super::store::{Fence, ReconStore, StateRow, StoredOutcome};

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
        let save = !states.is_empty()
            || !rest.results.is_empty()
            || !rest.resolved.is_empty()
            || !rest.offsets.is_empty()
            || !mark_rows.is_empty();
        let (results, resolved) = (rest.results.clone(), rest.resolved.clone());
        let (producer, store, stats) = (
            self.producer.clone(),
            self.store.clone(),
            self.stats.clone(),
        );
        let (topic, group) = (
            self.cfg.topology.reconciliation_topic(),
            self.cfg.group.clone(),
        );
        let task = tokio::spawn(async move {
            if !save {
                return Ok(vec![]);
            }
            let t = Instant::now();
            let saved = store
                .save(&states, &results, &resolved, &group, &fence, &mark_rows)
                .await?;
            add_us(&stats.save_us, t);
            if saved.taken.is_empty() && !saved.inserted.is_empty() {
                // Committed: published from the rows (a failure leaves them to the sweep).
                let t = Instant::now();
                if let Err(e) = publish(&producer, &store, &topic, &saved.inserted).await {
                    tracing::warn!(error = %e, outcomes = saved.inserted.len(), "outcomes written, not published yet; the sweep publishes them");
                }
                add_us(&stats.send_us, t);
            }
            Ok(saved.taken)
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
            Ok(taken) if taken.is_empty() => {
                for (k, wm) in w.marks {
                    self.marks_written.insert(k, wm);
                }
                self.landed(w.rest)?;
                Ok(())
            }
            Ok(taken) => {
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

    /// A write landed: its offsets are committed, its counts reported.
    fn landed(&mut self, p: Pending) -> anyhow::Result<()> {
        self.commit(&p.offsets)?;
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
        Ok(())
    }

    /// Publishes the outcomes of this instance's partitions that were written but not published
    /// (a crash or a failed send after their transaction). Call it with no write on its way.
    pub(super) async fn publish_unpublished(&mut self) {
        self.last_sweep = Instant::now();
        let mut parts: Vec<i32> = self.claims.keys().map(|tp| tp.1).collect();
        parts.sort_unstable();
        parts.dedup();
        if parts.is_empty() {
            return;
        }
        let topic = self.cfg.topology.reconciliation_topic();
        loop {
            let rows = match self.store.unpublished(&parts, 1000).await {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "unpublished outcomes not read");
                    return;
                }
            };
            if rows.is_empty() {
                return;
            }
            let n = rows.len();
            match publish(&self.producer, &self.store, &topic, &rows).await {
                Ok(()) => tracing::info!(outcomes = n, "outcomes written earlier published"),
                Err(e) => {
                    tracing::warn!(error = %e, "outcomes not published; trying again later");
                    return;
                }
            }
            if n < 1000 {
                return;
            }
        }
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

/// One record per stored outcome on the reconciliation topic, keyed by the flow key, with the
/// row's id (`helios-outcome-id`); marks them published once every one was acknowledged.
async fn publish(
    producer: &FutureProducer,
    store: &ReconStore,
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
    let ids: Vec<i64> = rows.iter().map(|o| o.id).collect();
    store.mark_published(&ids).await?;
    Ok(())
}
