//! The reconciler's consumer side: the partition-count check at start-up, batches polled from
//! the group, the assignment (and dropping unwritten work of revoked partitions), staying a
//! live member while a write is retried, knowing which partitions are read to their end
//! (statistics, confirmed against the broker), and committing offsets.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::clock::Clock;
use super::run::Reconciler;
use crate::shutdown::Shutdown;

impl Reconciler {
    pub(super) async fn check_partitions(&self) -> anyhow::Result<()> {
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
    /// are waiting. True with it when the batch was cut short (nothing more waiting: time to
    /// write what is pending).
    pub(super) async fn poll_batch(&mut self) -> (Vec<rdkafka::message::OwnedMessage>, bool) {
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
        self.refresh_assignment();
        // Which partitions are read to their end (as of the last statistics); this batch's
        // records then mark theirs as being read again.
        let flags: HashMap<(String, i32), bool> = self
            .caught_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.0))
            .collect();
        self.clock.caught_up(&flags);
        (out, caught_up)
    }

    /// Takes the consumer's assignment as it is now.
    pub(super) fn refresh_assignment(&mut self) {
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
        self.forget_unassigned();
    }

    /// Drops what was counted but not written for partitions this instance no longer owns:
    /// their offsets were not committed, so their new owner counts those events itself.
    pub(super) fn forget_unassigned(&mut self) {
        let owned: Vec<Vec<i32>> = self
            .flow_topics
            .iter()
            .map(|t| self.clock.partitions(t))
            .collect();
        self.watermarks
            .retain(|(f, part), _| owned[*f].contains(part));
        self.due_checked
            .retain(|(f, part), _| owned[*f].contains(part));
        let flows = &self.flows;
        let p = &mut self.pending;
        let before = p.work.len();
        p.work.retain(|(f, _), w| owned[*f].contains(&w.part));
        if p.work.len() == before {
            return;
        }
        let gone = |flow: &str, key: &str| {
            !flows
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
            .filter(|r| !gone(&r.flow, &r.key))
            .collect();
        p.resolved = resolved
            .into_iter()
            .filter(|r| !gone(&r.flow, &r.key))
            .collect();
        let assigned = self.clock.assigned_set();
        p.offsets.retain(|tp, _| assigned.contains(tp));
        p.newest.retain(|tp, _| assigned.contains(tp));
        tracing::info!(
            dropped = before - p.work.len(),
            "partitions revoked: their unwritten counts are left to the new owner"
        );
    }

    /// While a batch waits to be retried: partitions paused, the consumer polled (the group
    /// sees a live member), anything still delivered kept for the next batch. False: shutdown.
    pub(super) async fn wait_polling(&mut self, d: Duration, shutdown: &Shutdown) -> bool {
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
        let read_to: HashMap<(String, i32), i64> = self
            .caught_up
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, v)| (k.clone(), v.1))
            .collect();
        let meta = self.meta.clone();
        let asked = candidates.clone();
        let (highs, committed) = tokio::task::spawn_blocking(move || {
            let highs = asked
                .iter()
                .map(|(t, p)| meta.fetch_watermarks(t, *p, Duration::from_secs(5)).ok())
                .collect::<Vec<_>>();
            let mut tpl = TopicPartitionList::new();
            for (t, p) in &asked {
                tpl.add_partition(t, *p);
            }
            let committed = meta
                .committed_offsets(tpl, Duration::from_secs(5))
                .unwrap_or_default();
            (highs, committed)
        })
        .await
        .unwrap_or_default();
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
