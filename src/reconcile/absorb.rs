//! One batch counted into the pending work: the fan-out records read, partitions assigned since
//! the last look claimed (their event time and stored keys taken over), the states not pending
//! yet loaded (kept from the last write, else read), the watermarks moved on and the stored
//! instances they make due fetched, then every event applied and every deadline passed fired.
//! The reads come first: if one fails, nothing of the batch was kept and it is taken again.

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use super::clock::Held;
use super::engine::{self, Effects, FlowState};
use super::input::{self, Seen};
use super::pending::{add_us, Working};
use super::run::Reconciler;
use super::store::{Resolution, ResultRow};
use crate::topology::Flow;

/// Instances fetched per flow per look for due deadlines.
const DUE_LIMIT: i64 = 5000;

impl Reconciler {
    /// Counts a batch into the pending states and fires the deadlines the watermarks passed.
    /// The reads (states not pending yet, instances due) come first: if one fails, nothing of
    /// the batch was kept and it is taken again.
    pub(super) async fn absorb(
        &mut self,
        batch: &[rdkafka::message::OwnedMessage],
    ) -> anyhow::Result<()> {
        let now = Utc::now();
        let mut seen: Vec<(usize, Seen)> = vec![];
        let mut skips: Vec<input::Skip> = vec![];
        for m in batch {
            use rdkafka::Message;
            let fields = self
                .fields_by_topic
                .get(m.topic())
                .map(Vec::as_slice)
                .unwrap_or_default();
            match input::read(m, now, fields) {
                Ok(s) => {
                    if let Some(flows) = self.by_topic.get(&s.sighting.topic) {
                        for &f in flows {
                            seen.push((f, s.clone()));
                        }
                    }
                }
                Err(skip) => skips.push(skip),
            }
        }
        // Partitions assigned since the last look are claimed before any of their states is
        // read (a write on its way from their earlier owner is refused from now on, or it was
        // committed before and is read here); the event time reached before is taken over.
        let mut clock = self.clock.clone();
        let fresh = clock.unclaimed();
        let fresh_parts: HashSet<i32> = fresh.iter().map(|t| t.1).collect();
        let mut claimed = HashMap::new();
        let mut floors: HashMap<(usize, i32), DateTime<Utc>> = HashMap::new();
        let mut opens: HashMap<(usize, i32), u64> = HashMap::new();
        let mut built: Vec<(i32, Vec<(String, String)>)> = vec![];
        if !fresh.is_empty() {
            let stored = self.store.claim(&self.cfg.group, &fresh).await?;
            let sources = self.store.sources(&self.cfg.group, &fresh).await?;
            for tp in &fresh {
                let generation = stored.get(tp).map_or(0, |x| x.1);
                clock.claimed(
                    tp,
                    sources.get(tp).map(Vec::as_slice).unwrap_or_default(),
                    now,
                );
                claimed.insert(tp.clone(), generation);
            }
            // The watermarks reached before (never back; never past the wall clock).
            let parts: HashSet<i32> = fresh.iter().map(|t| t.1).collect();
            let list: Vec<i32> = parts.iter().copied().collect();
            for p in &list {
                if !built.iter().any(|(q, _)| q == p) {
                    let t = Instant::now();
                    let keys = self.store.keys_of(*p).await?;
                    add_us(&self.stats.load_us, t);
                    built.push((*p, keys));
                }
            }
            for ((flow, part), n) in self.store.open_counts(&list).await? {
                if let Some(f) = self.flows.iter().position(|x| x.name == flow) {
                    opens.insert((f, part), n);
                }
            }
            for (flow, part, wm, _, _) in self.store.watermarks(&self.cfg.group).await? {
                if let Some(f) = self.flows.iter().position(|x| x.name == flow) {
                    if parts.contains(&part) {
                        floors.insert((f, part), wm.min(now));
                    }
                }
            }
        }
        // States of this batch's instances that are not pending already, as stored: written
        // last by this instance (kept), else read.
        let mut cached: Vec<((usize, String), (i32, FlowState))> = vec![];
        for (f, s) in &seen {
            let k = (*f, s.order_id.clone());
            if !self.pending.work.contains_key(&k)
                && !self
                    .writing
                    .as_ref()
                    .is_some_and(|w| w.work.contains_key(&k))
            {
                if let Some(x) = self.recent.take(&k) {
                    cached.push((k, x));
                }
            }
        }
        let hit: HashSet<&(usize, String)> = cached.iter().map(|(k, _)| k).collect();
        let keys: Vec<(String, String)> = {
            let set: HashSet<(String, String)> = seen
                .iter()
                .filter(|(f, s)| {
                    let k = (*f, s.order_id.clone());
                    !self.pending.work.contains_key(&k)
                        && !hit.contains(&k)
                        && !self
                            .writing
                            .as_ref()
                            .is_some_and(|w| w.work.contains_key(&k))
                        && (fresh_parts.contains(&s.sighting.partition)
                            || self
                                .known
                                .may_be_stored(s.sighting.partition, *f, &s.order_id))
                })
                .map(|(f, s)| (self.flows[*f].name.clone(), s.order_id.clone()))
                .collect();
            set.into_iter().collect()
        };
        drop(hit);
        let t = Instant::now();
        let stored = self.store.load(&keys).await?;
        add_us(&self.stats.load_us, t);
        if !cached.is_empty() {
            self.stats
                .recent_hits
                .fetch_add(cached.len() as u64, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_state_cache_hits_total")
                .increment(cached.len() as u64);
        }
        if !keys.is_empty() {
            self.stats
                .state_reads
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_state_reads_total").increment(keys.len() as u64);
        }
        // The watermarks with this batch's event times, and the stored instances they make due.
        for (_, s) in &seen {
            let skew = skew_of(&self.skew_by_topic, &s.sighting.topic);
            clock.record(
                &s.sighting.topic,
                s.sighting.partition,
                &s.sighting.source,
                s.trust(skew).occurred_at,
            );
        }
        let bound = self.backlog.as_ref().and_then(|b| b.view().bound);
        // The statistics that count a partition as read to its end may predate records
        // written since (before the records just read that move event time on): check those
        // partitions against the broker's high watermark now.
        self.confirm_caught_up(&mut clock).await;
        let mut wms: Vec<BTreeMap<i32, DateTime<Utc>>> = vec![];
        let mut helds: HashMap<(usize, i32), Held> = HashMap::new();
        let mut due_rows = vec![];
        let mut checked = self.due_checked.clone();
        for (f, flow) in self.flows.iter().enumerate() {
            let topics = &self.flow_topics[f];
            // Watermarks never go back (a topic read again holds back only what comes next).
            let w: BTreeMap<i32, DateTime<Utc>> = clock
                .partitions(topics)
                .into_iter()
                .filter_map(|p| {
                    let new = clock.watermark(flow, topics, p, self.cfg.idle_after, now, bound);
                    if let Some((_, h)) = &new {
                        helds.insert((f, p), h.clone());
                    }
                    let old = self
                        .watermarks
                        .get(&(f, p))
                        .copied()
                        .max(floors.get(&(f, p)).copied());
                    new.map(|n| n.0).max(old).map(|w| (p, w))
                })
                .collect();
            if batch.is_empty() {
                tracing::debug!(flow = %flow.name, watermarks = ?w, clock = ?clock, "event time while idle");
            }
            // Stored instances due since the last look (earlier ones were fetched then and
            // are pending or written with a later deadline).
            let list: Vec<super::store::DueWindow> = w
                .iter()
                .map(|(p, t)| (*p, checked.get(&(f, *p)).copied(), *t))
                .filter(|(_, lo, hi)| lo.is_none_or(|lo| lo < *hi))
                .collect();
            if !list.is_empty() {
                let t = Instant::now();
                let rows = self.store.due(&flow.name, &list, DUE_LIMIT).await?;
                add_us(&self.stats.due_us, t);
                let cut = (rows.len() as i64 >= DUE_LIMIT)
                    .then(|| rows.iter().map(|r| r.3).max())
                    .flatten();
                for (p, _, hi) in &list {
                    // Cut by the limit: the rest (from the last deadline returned, ties
                    // included) next time.
                    let upto = match cut {
                        Some(c) => (*hi).min(c - chrono::Duration::milliseconds(1)),
                        None => *hi,
                    };
                    checked.insert((f, *p), upto);
                }
                for (key, part, state, _) in rows {
                    due_rows.push((f, key, part, state));
                }
            }
            wms.push(w);
        }
        // Nothing below fails: the batch is now part of the pending work.
        self.clock = clock;
        self.claims.extend(claimed);
        if !fresh.is_empty() {
            // Outcomes an earlier owner wrote and did not publish go out now, before this
            // instance publishes its own there (no write on its way holds outcomes of a
            // partition just claimed: it would be refused). Left for the next sweep if it fails.
            self.unswept.extend(fresh_parts.iter().copied());
            let mut parts: Vec<i32> = fresh_parts.iter().copied().collect();
            parts.sort_unstable();
            self.sweep(&parts).await;
        }
        self.due_checked = checked;
        self.held.extend(helds);
        self.open.extend(opens);
        for (p, keys) in built {
            let flows = &self.flows;
            let index: Vec<(usize, &str)> = keys
                .iter()
                .filter_map(|(f, k)| {
                    flows
                        .iter()
                        .position(|x| &x.name == f)
                        .map(|i| (i, k.as_str()))
                })
                .collect();
            self.known.build(p, index.into_iter());
        }
        for (f, flow) in self.flows.iter().enumerate() {
            let oldest = wms[f].values().min();
            if let Some(w) = oldest {
                let lag = (now - *w).num_milliseconds() as f64 / 1000.0;
                metrics::gauge!("helios_reconcile_event_time_lag_seconds", "flow" => flow.name.clone())
                    .set(lag.max(0.0));
            }
        }
        for (f, w) in wms.iter().enumerate() {
            for (p, t) in w {
                self.watermarks.insert((f, *p), *t);
            }
        }
        let flow_index: HashMap<&str, usize> = self
            .flows
            .iter()
            .enumerate()
            .map(|(i, f)| (f.name.as_str(), i))
            .collect();
        let p = &mut self.pending;
        p.since.get_or_insert_with(Instant::now);
        p.skips.extend(skips);
        let mut misplaced = 0u64;
        for m in batch {
            use rdkafka::Message;
            if let (Some(k), Some(n)) = (m.key(), self.partition_counts.get(m.topic())) {
                if crate::kafka::key_partition(k, *n as i32) != m.partition() {
                    misplaced += 1;
                }
            }
            let e = p
                .offsets
                .entry((m.topic().to_string(), m.partition()))
                .or_insert(0);
            *e = (*e).max(m.offset() + 1);
        }
        if misplaced > 0 {
            // Not fatal (a producer with another partitioner may still co-partition its keys
            // its own way), but an order's events may then meet on no single instance.
            self.stats.misplaced.fetch_add(misplaced, Ordering::Relaxed);
            metrics::counter!("helios_reconcile_misplaced_records_total").increment(misplaced);
        }
        // Instances of the write on its way: its version is the newest (the stored row is older
        // until it lands) — those seen again, those whose deadline the watermark passed, and
        // stored ones found due.
        let writing = self.writing.as_ref();
        let from_write = |k: &(usize, String)| {
            writing.and_then(|w| w.work.get(k)).map(|x| Working {
                part: x.part,
                state: x.state.clone(),
                changed: false,
            })
        };
        for (f, s) in &seen {
            let k = (*f, s.order_id.clone());
            if let Entry::Vacant(e) = p.work.entry(k) {
                if let Some(x) = from_write(e.key()) {
                    e.insert(x);
                }
            }
        }
        for (f, key, part, due) in writing.map(|w| w.due.as_slice()).unwrap_or_default() {
            let k = (*f, key.clone());
            if wms[*f].get(part).is_some_and(|wm| due <= wm) && !p.work.contains_key(&k) {
                if let Some(x) = from_write(&k) {
                    p.work.insert(k, x);
                }
            }
        }
        for (k, (part, state)) in cached {
            p.work.entry(k).or_insert(Working {
                part,
                state,
                changed: false,
            });
        }
        for ((flow, key), (part, state)) in stored {
            if let Some(&i) = flow_index.get(flow.as_str()) {
                p.work.entry((i, key)).or_insert(Working {
                    part,
                    state,
                    changed: false,
                });
            }
        }
        for (f, key, part, state) in due_rows {
            // A pending state, or one on its way, is newer than the stored one.
            let k = (f, key);
            self.recent.take(&k);
            let w = from_write(&k).unwrap_or(Working {
                part,
                state,
                changed: false,
            });
            p.work.entry(k).or_insert(w);
        }
        for (_, s) in &seen {
            let at = s
                .trust(skew_of(&self.skew_by_topic, &s.sighting.topic))
                .occurred_at;
            p.newest
                .entry((s.sighting.topic.clone(), s.sighting.partition))
                .or_default()
                .entry(s.sighting.source.clone())
                .and_modify(|n| *n = (*n).max(at))
                .or_insert(at);
        }
        for (f, s) in seen {
            let flow = &self.flows[f];
            let sighting = s.trust(flow.max_clock_skew);
            if sighting.untrusted_occurred_at.is_some() {
                metrics::counter!("helios_reconcile_untrusted_clock_total", "flow" => flow.name.clone())
                    .increment(1);
                tracing::warn!(flow = %flow.name, event_id = %crate::model::text::bounded(&sighting.event_id, 128),
                    occurred_at = ?sighting.untrusted_occurred_at, ingested_at = %s.ingested_at,
                    "occurred_at too far ahead of its reception: counted at its reception time");
            }
            let k = (f, s.order_id.clone());
            if !p.work.contains_key(&k) {
                // A new order: within the partition's cap of open instances, or skipped.
                let open = self.open.entry((f, s.sighting.partition)).or_insert(0);
                if *open >= flow.max_open_per_partition {
                    p.skips.push(input::Skip::InstanceCap);
                    if self.cap_warned.insert((f, s.sighting.partition)) {
                        tracing::warn!(flow = %flow.name, partition = s.sighting.partition, cap = flow.max_open_per_partition,
                            "open instances at max_open_per_partition: events of new orders are skipped (helios_reconcile_skipped_total{{reason=\"instance_cap\"}})");
                    }
                    continue;
                }
                *open += 1;
                self.known.insert(s.sighting.partition, f, &s.order_id);
            }
            let w = p.work.entry(k).or_insert(Working {
                part: s.sighting.partition,
                state: FlowState::default(),
                changed: false,
            });
            w.part = s.sighting.partition;
            let fx = engine::apply(flow, &mut w.state, sighting);
            if fx.already_counted {
                p.counted[f].1 += 1;
                continue;
            }
            w.changed = true;
            p.counted[f].0 += 1;
            collect(
                flow,
                &s.order_id,
                w.part,
                fx,
                &mut p.results,
                &mut p.resolved,
            );
        }
        // Deadlines of every pending instance (stored ones were fetched above when due).
        for ((f, key), w) in p.work.iter_mut() {
            let Some(wm) = wms[*f].get(&w.part) else {
                continue;
            };
            let flow = &self.flows[*f];
            if engine::next_due(flow, &w.state).is_none_or(|d| d > *wm) {
                continue;
            }
            let fx = engine::due(flow, &mut w.state, *wm);
            if !fx.outcomes.is_empty() {
                w.changed = true;
                collect(flow, key, w.part, fx, &mut p.results, &mut p.resolved);
            }
        }
        Ok(())
    }
}

/// The clock skew a topic's events are trusted within (the tightest of the flows reading it).
fn skew_of(skew_by_topic: &HashMap<String, Duration>, topic: &str) -> Duration {
    skew_by_topic
        .get(topic)
        .copied()
        .unwrap_or(crate::topology::DEFAULT_MAX_CLOCK_SKEW)
}

fn collect(
    flow: &Flow,
    key: &str,
    part: i32,
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
            part,
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
