//! Replays: a processor on assigned partitions (never the live group), serial, committing
//! nothing: each range is processed once and the run reports whether it finished.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use rdkafka::{Offset, TopicPartitionList};

use super::super::dedup::DedupStore;
use super::super::deliver::Delivery;
use super::super::stats::record_metrics;
use super::{deliver_task, Outcome, Processor};
use crate::db::EventStore;
use crate::model::RawRecord;
use crate::shutdown::Shutdown;

impl<D: DedupStore, S: EventStore> Processor<D, S> {
    /// Processes `ranges` (topic, partition, start offset, end offset exclusive) once, then
    /// returns: `Ok(true)` when every range was processed, `Ok(false)` when interrupted.
    /// `progress(done, total)` is called after each batch; `max_rate` caps records per second.
    /// Serial: a replay has no group to stay alive in and no commits to order.
    pub async fn run_replay(
        mut self,
        ranges: &[(String, i32, i64, i64)],
        shutdown: Shutdown,
        max_rate: Option<u64>,
        mut progress: impl FnMut(u64, u64),
    ) -> anyhow::Result<bool> {
        let mut remaining: HashMap<(String, i32), i64> = HashMap::new();
        let mut tpl = TopicPartitionList::new();
        let mut total = 0u64;
        for (t, p, start, end) in ranges {
            if end > start {
                tpl.add_partition_offset(t, *p, Offset::Offset(*start))?;
                remaining.insert((t.clone(), *p), *end);
                total += (end - start) as u64;
            }
        }
        if remaining.is_empty() {
            return Ok(true);
        }
        self.consumer.assign(&tpl)?;
        self.refresh_topics(true).await;
        let started = Instant::now();
        let mut done = 0u64;
        let dry_run = self.sinks.replay.as_ref().is_some_and(|r| r.dry_run);
        while !remaining.is_empty() {
            let batch = tokio::select! {
                b = tokio::time::timeout(Duration::from_secs(60), self.consumer.next_batch(usize::MAX)) => match b {
                    Ok(b) => b?.records,
                    Err(_) => anyhow::bail!("no records arrived for 60 s with {} partition(s) unfinished", remaining.len()),
                },
                _ = shutdown.clone().wait() => return Ok(false),
            };
            let batch = self.within_ranges(batch, &mut remaining);
            if batch.is_empty() {
                continue;
            }
            let n = batch.len() as u64;
            let Some(plan) = self.plan(&batch, &shutdown).await else {
                return Ok(false);
            };
            if dry_run {
                self.stats.add(&batch, &plan);
            } else {
                let delivery = Delivery::new(None, batch, plan);
                match deliver_task(
                    self.sinks.clone(),
                    delivery,
                    None,
                    None,
                    shutdown.clone(),
                    None,
                )
                .await
                {
                    Outcome::Delivered(d) => {
                        record_metrics(&d.records, &d.plan, d.rows_inserted);
                        self.stats.add(&d.records, &d.plan);
                    }
                    Outcome::Abandoned { .. } => return Ok(false),
                }
            }
            done += n;
            progress(done, total);
            if let Some(rate) = max_rate.filter(|r| *r > 0) {
                let due = Duration::from_secs_f64(done as f64 / rate as f64);
                let elapsed = started.elapsed();
                if due > elapsed {
                    tokio::select! {
                        _ = tokio::time::sleep(due - elapsed) => {},
                        _ = shutdown.clone().wait() => return Ok(false),
                    }
                }
            }
        }
        Ok(true)
    }

    /// The records of a replay batch inside their ranges, in order; partitions whose range
    /// is done are unassigned.
    fn within_ranges(
        &self,
        batch: Vec<RawRecord>,
        remaining: &mut HashMap<(String, i32), i64>,
    ) -> Vec<RawRecord> {
        let mut batch: Vec<RawRecord> = batch
            .into_iter()
            .filter(|r| {
                remaining
                    .get(&(r.topic.clone(), r.partition))
                    .is_some_and(|end| r.offset < *end)
            })
            .collect();
        batch.sort_by(|a, b| {
            (&a.topic, a.partition, a.offset).cmp(&(&b.topic, b.partition, b.offset))
        });
        for r in &batch {
            let key = (r.topic.clone(), r.partition);
            if remaining.get(&key).is_some_and(|end| r.offset + 1 >= *end) {
                remaining.remove(&key);
                self.consumer.unassign(&r.topic, r.partition);
            }
        }
        batch
    }
}
