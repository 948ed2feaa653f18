//! The reconciler's consumer side: the partition-count check at start-up, batches polled from
//! the group, the assignment (and dropping unwritten work of revoked partitions), staying a
//! live member while a write is retried, knowing which partitions are read to their end
//! (statistics, confirmed against the broker), and committing offsets.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::clock::Clock;
use super::run::Reconciler;
use crate::shutdown::Shutdown;

impl Reconciler {
    /// The step topics exist and have equal partition counts on the broker (an error says what
    /// to fix); a broker that does not answer yet is waited for (warnings, backoff). False:
    /// shutdown came first.
    pub(super) async fn wait_partitions_checked(
        &mut self,
        shutdown: &Shutdown,
    ) -> anyhow::Result<bool> {
        let mut backoff = crate::pipeline::retry::Backoff::default();
        loop {
            match self.check_partitions().await? {
                None => return Ok(true),
                Some(e) => {
                    crate::liveness::progress();
                    tracing::warn!(error = %e, "the broker did not answer the step topics' metadata; retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_wait()) => {}
                        _ = shutdown.clone().wait() => return Ok(false),
                    }
                }
            }
        }
    }

    /// Some(error) when the broker did not answer (worth retrying).
    async fn check_partitions(&mut self) -> anyhow::Result<Option<rdkafka::error::KafkaError>> {
        let settings = self.cfg.kafka.clone();
        let flows: Vec<(String, Vec<String>)> = self
            .flows
            .iter()
            .zip(&self.flow_topics)
            .map(|(f, t)| (f.name.clone(), t.clone()))
            .collect();
        let before = self.partition_counts.clone();
        let checked = tokio::task::spawn_blocking(move || -> anyhow::Result<_> {
            let c = crate::kafka::reader(&settings, "reconcile-check")?;
            let mut all = HashMap::new();
            for (flow, topics) in flows {
                let mut counts = vec![];
                for t in &topics {
                    let md = match c.fetch_metadata(Some(t), Duration::from_secs(10)) {
                        Ok(md) => md,
                        Err(e) => return Ok(Err(e)),
                    };
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
                    if let Some(was) = before.get(t).filter(|was| **was != n) {
                        anyhow::bail!(
                            "flow `{flow}`: topic {t} has {n} partitions, {was} when this reconciler started; an order's events no longer meet on one partition number: restart every reconciler of the group (after the processors) so that they start from the new layout"
                        );
                    }
                    all.insert(t.clone(), n);
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
            Ok(Ok(all))
        })
        .await??;
        match checked {
            Ok(all) => {
                self.partition_counts = all;
                Ok(None)
            }
            Err(e) => Ok(Some(e)),
        }
    }

    /// Up to `batch_size` records: the first waits up to 200 ms, the rest are taken while more
    /// are waiting. True with it when the consumer caught up (time to write what is pending).
    pub(super) async fn poll_batch(&mut self) -> (Vec<rdkafka::message::OwnedMessage>, bool) {
        let mut out = std::mem::take(&mut self.stash);
        let mut caught_up = false;
        let mut epoch = self.rebalances();
        while out.len() < self.cfg.batch_size {
            let wait = if out.is_empty() {
                Duration::from_millis(200)
            } else {
                Duration::from_millis(2)
            };
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Ok(Ok(m)) => {
                    // Records taken before a rebalance come again from the committed offsets
                    // (to this instance or another): they are dropped with the unwritten work.
                    if self.rebalances() != epoch {
                        epoch = self.rebalances();
                        out.clear();
                    }
                    out.push(m.detach());
                }
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
        self.refresh_assignment();
        // Which partitions are read to their end (as of the last statistics); this batch's
        // records then mark theirs as being read again.
        let flags = self.statistics_view(|(read_to_end, _)| read_to_end);
        self.clock.caught_up(&flags);
        // Nothing more waiting: time to write what is pending — when nothing came at all, or
        // the statistics see every partition read to its end (a gap in a backlog being read
        // is not; the next write then takes more at once).
        let caught_up =
            caught_up && (out.is_empty() || self.clock.caught_up_tracks().len() == flags.len());
        (out, caught_up)
    }

    /// One of the statistics' per-partition facts (read to its end, offset read to).
    fn statistics_view<T>(&self, f: impl Fn((bool, i64)) -> T) -> HashMap<(String, i32), T> {
        self.caught_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), f(*v)))
            .collect()
    }

    /// Rebalances the consumer served so far.
    fn rebalances(&self) -> u64 {
        self.consumer.context().rebalances.load(Ordering::SeqCst)
    }

    /// Takes the consumer's assignment as it is now. After a rebalance (every partition was
    /// revoked, and the ones assigned again are read from their committed offsets) the
    /// unwritten work is dropped and every partition is claimed anew.
    pub(super) fn refresh_assignment(&mut self) {
        let rebalances = self.rebalances();
        if rebalances != self.rebalances_seen {
            self.rebalances_seen = rebalances;
            let dropped = self.pending.work.len();
            self.pending = super::pending::Pending::new(self.flows.len());
            self.clock = Clock::default();
            self.claims.clear();
            self.watermarks.clear();
            self.due_checked.clear();
            self.held.clear();
            self.marks_written.clear();
            self.open.clear();
            self.known.clear();
            self.recent.clear();
            // Partition counts may have changed with the rebalance: checked again.
            self.recheck = true;
            if dropped > 0 {
                tracing::info!(
                    dropped,
                    "rebalance: unwritten counts dropped, read again from the committed offsets"
                );
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
        metrics::gauge!("helios_reconcile_assigned_partitions").set(assigned.len() as f64);
        self.watch_unassigned(assigned.is_empty());
        if let Some(why) = copartition_problem(&self.flows, &self.flow_topics, &assigned) {
            self.fatal = Some(why);
        }
        self.clock.assigned(&assigned);
        self.claims.retain(|tp, _| assigned.contains(tp));
        let owned: Vec<Vec<i32>> = self
            .flow_topics
            .iter()
            .map(|t| self.clock.partitions(t))
            .collect();
        self.drop_work(|f, part| !owned[f].contains(&part));
    }

    /// An instance left without partitions joins its group again (see
    /// [`crate::kafka::RejoinWatch`]).
    fn watch_unassigned(&mut self, none: bool) {
        let answered = self.consumer.context().assigns.load(Ordering::SeqCst) > 0;
        let Some(after) = self.unassigned.observe(none, answered) else {
            return;
        };
        self.stats.rejoins.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("helios_reconcile_rejoins_total").increment(1);
        let topics: Vec<&str> = self.by_topic.keys().map(String::as_str).collect();
        crate::kafka::rejoin_group(
            &self.consumer,
            &topics,
            "reconciler",
            after,
            self.unassigned.next_wait(),
        );
    }

    /// A write found these topic-partitions claimed by another instance since: the work
    /// counted for them (every flow they are a step topic of, on that partition) is theirs now.
    pub(super) fn taken_over(&mut self, taken: &[(String, i32)]) {
        let lost: HashSet<(usize, i32)> = taken
            .iter()
            .flat_map(|(t, p)| {
                self.by_topic
                    .get(t)
                    .into_iter()
                    .flatten()
                    .map(move |f| (*f, *p))
            })
            .collect();
        for (f, p) in &lost {
            for t in &self.flow_topics[*f] {
                let tp = (t.clone(), *p);
                self.claims.remove(&tp);
                self.clock.unclaim(&tp);
            }
        }
        self.drop_work(|f, part| lost.contains(&(f, part)));
    }

    /// Drops what was counted but not written for the (flow, partition) pairs `gone` says:
    /// their offsets are not committed, so whoever owns them counts those events itself.
    fn drop_work(&mut self, gone: impl Fn(usize, i32) -> bool) {
        self.recent.forget(&gone);
        self.watermarks.retain(|(f, part), _| !gone(*f, *part));
        self.due_checked.retain(|(f, part), _| !gone(*f, *part));
        let flows = &self.flows;
        let p = &mut self.pending;
        let before = p.work.len();
        p.work.retain(|(f, _), w| !gone(*f, w.part));
        let kept = |flow: &str, key: &str| {
            flows
                .iter()
                .position(|f| f.name == flow)
                .is_some_and(|f| p.work.contains_key(&(f, key.to_string())))
        };
        let (results, resolved) = (
            std::mem::take(&mut p.results),
            std::mem::take(&mut p.resolved),
        );
        p.results = results
            .into_iter()
            .filter(|r| kept(&r.flow, &r.key))
            .collect();
        p.resolved = resolved
            .into_iter()
            .filter(|r| kept(&r.flow, &r.key))
            .collect();
        let by_topic = &self.by_topic;
        let dropped_tp = |tp: &(String, i32)| {
            by_topic
                .get(&tp.0)
                .is_some_and(|fs| fs.iter().any(|f| gone(*f, tp.1)))
        };
        p.offsets.retain(|tp, _| !dropped_tp(tp));
        p.newest.retain(|tp, _| !dropped_tp(tp));
        if p.work.len() < before {
            tracing::info!(
                dropped = before - p.work.len(),
                "partitions gone: their unwritten counts are left to their owner"
            );
        }
    }

    /// While a batch waits to be retried: partitions paused, the consumer polled (the group
    /// sees a live member), anything still delivered kept for the next batch. False: shutdown.
    pub(super) async fn wait_polling(&mut self, d: Duration, shutdown: &Shutdown) -> bool {
        let assignment = self.consumer.assignment().unwrap_or_default();
        let _ = self.consumer.pause(&assignment);
        let until = Instant::now() + d;
        let mut epoch = self.rebalances();
        while Instant::now() < until {
            if shutdown.is_triggered() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if let Ok(Ok(m)) =
                tokio::time::timeout(left.min(Duration::from_millis(100)), self.consumer.recv())
                    .await
            {
                if self.rebalances() != epoch {
                    epoch = self.rebalances();
                    self.stash.clear();
                }
                self.stash.push(m.detach());
            }
        }
        let _ = self.consumer.resume(&assignment);
        !shutdown.is_triggered()
    }

    /// Confirms with the broker that the partitions counted as read to their end still are:
    /// one whose high watermark is past the consumer's position is not (any error: not).
    pub(super) async fn confirm_caught_up(&mut self, clock: &mut Clock) {
        let positions = self.consumer.position().unwrap_or_default();
        let handed_over = |tp: &(String, i32)| {
            positions
                .find_partition(&tp.0, tp.1)
                .is_some_and(|e| matches!(e.offset(), Offset::Offset(_)))
        };
        // Also every partition nothing was handed over from since the assignment (after a
        // restart it may have been read to its end and committed before).
        let mut candidates = clock.caught_up_tracks();
        for tp in clock.assigned_set() {
            if !handed_over(&tp) && !candidates.contains(&tp) {
                candidates.push(tp);
            }
        }
        if candidates.is_empty() {
            return;
        }
        let read_to = self.statistics_view(|(_, read_to)| read_to);
        let meta = self.meta.clone();
        let asked = candidates.clone();
        let highs = tokio::task::spawn_blocking(move || {
            asked
                .iter()
                .map(|(t, p)| meta.fetch_watermarks(t, *p, Duration::from_secs(5)).ok())
                .collect::<Vec<_>>()
        })
        .await
        .unwrap_or_default();
        // The group's committed offsets, from the member itself (only for partitions nothing
        // was handed over from yet).
        let mut tpl = TopicPartitionList::new();
        for tp in candidates.iter().filter(|tp| !handed_over(tp)) {
            tpl.add_partition(&tp.0, tp.1);
        }
        let committed = if tpl.count() == 0 {
            TopicPartitionList::new()
        } else {
            self.consumer
                .committed_offsets(tpl, Duration::from_secs(5))
                .unwrap_or_default()
        };
        for (i, tp) in candidates.iter().enumerate() {
            let position = positions
                .find_partition(&tp.0, tp.1)
                .and_then(|e| match e.offset() {
                    Offset::Offset(o) => Some(o),
                    _ => None,
                });
            // Nothing handed over since the assignment: the group's committed offset (reading
            // resumed there), else where the statistics saw it read to.
            let at = position
                .or_else(|| {
                    committed
                        .find_partition(&tp.0, tp.1)
                        .and_then(|e| match e.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                })
                .or_else(|| read_to.get(tp).copied());
            let read_to_end = match (highs.get(i).copied().flatten(), at) {
                (Some((_, high)), Some(at)) => at >= high,
                _ => false,
            };
            clock.set_caught_up(tp, read_to_end);
        }
    }

    pub(super) fn commit(&self, offsets: &BTreeMap<(String, i32), i64>) -> anyhow::Result<()> {
        if offsets.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in offsets {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
        }
        // A partition revoked since its records were polled is refused by the group: its new
        // owner reads them again and finds every event already counted.
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
            tracing::warn!(error = %e, "offsets not committed");
        }
        Ok(())
    }
}

/// Why an assignment breaks co-partitioning, if it does: every flow needs the same partition
/// numbers of each of its topics (else an order's steps are read by different instances, and
/// one of them reports the others `missing`).
pub(super) fn copartition_problem(
    flows: &[crate::topology::Flow],
    flow_topics: &[Vec<String>],
    assigned: &[(String, i32)],
) -> Option<String> {
    for (flow, topics) in flows.iter().zip(flow_topics) {
        let parts = |t: &String| -> Vec<i32> {
            let mut v: Vec<i32> = assigned
                .iter()
                .filter(|(x, _)| x == t)
                .map(|(_, p)| *p)
                .collect();
            v.sort_unstable();
            v
        };
        let first = parts(&topics[0]);
        for t in &topics[1..] {
            let these = parts(t);
            if these != first {
                return Some(format!(
                    "flow `{}`: this instance was assigned partitions {first:?} of {} but {these:?} of {t}; the reconciler needs partition p of every step topic in one instance (the range assignor with equal partition counts, and every member subscribed to the same topics: is another member of group running a different topology?)",
                    flow.name, topics[0]
                ));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::{Flow, FlowStep};

    #[test]
    fn an_assignment_that_splits_a_flow_is_named() {
        let flows = vec![Flow::new(
            "f",
            vec![
                FlowStep::new("A", None),
                FlowStep::new("B", Some(Duration::from_secs(1))),
            ],
            Duration::ZERO,
        )];
        let topics = vec![vec!["a".to_string(), "b".to_string()]];
        let ok = [
            ("a".into(), 0),
            ("b".into(), 0),
            ("a".into(), 2),
            ("b".into(), 2),
        ];
        assert_eq!(copartition_problem(&flows, &topics, &ok), None);
        let bad = [("a".into(), 0), ("b".into(), 1)];
        let why = copartition_problem(&flows, &topics, &bad).unwrap();
        assert!(why.contains("[0] of a but [1] of b"), "{why}");
    }
}
