//! Per-partition progress from librdkafka's statistics, for autoscalers and alerts: the
//! consumer lag of each assigned partition and whether one with lag stopped moving (its
//! position unchanged for [`STALLED_AFTER`]: a poison record, a stuck sink, a paused partition),
//! which a lag-based autoscaler should not scale on (KEDA's `excludePersistentLag`).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A partition with lag whose position has not moved for this long counts as stalled.
pub const STALLED_AFTER: Duration = Duration::from_secs(120);

/// Exports `<prefix>_consumer_lag{topic,partition}` and `<prefix>_partition_stalled{topic,partition}`.
pub struct PartitionProgress {
    prefix: &'static str,
    /// Per partition: the position last seen and since when.
    seen: Mutex<HashMap<(String, i32), (i64, Instant)>>,
}

impl PartitionProgress {
    pub fn new(prefix: &'static str) -> Self {
        PartitionProgress {
            prefix,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// One statistics report.
    pub fn observe(&self, stats: &rdkafka::Statistics) {
        let now = Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        let mut reported = vec![];
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                // Only partitions this consumer reads (librdkafka reports -1 otherwise).
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                let k = (topic.clone(), *p);
                let position = part.app_offset.max(part.committed_offset);
                let stalled = step(&mut seen, &k, position, part.consumer_lag, now);
                let labels = [("topic", topic.clone()), ("partition", p.to_string())];
                metrics::gauge!(format!("{}_consumer_lag", self.prefix), &labels)
                    .set(part.consumer_lag as f64);
                metrics::gauge!(format!("{}_partition_stalled", self.prefix), &labels)
                    .set(if stalled { 1.0 } else { 0.0 });
                reported.push(k);
            }
        }
        // Partitions no longer read are forgotten (bounded by the assignment).
        seen.retain(|k, _| reported.contains(k));
    }
}

/// Records `position` for `k`; stalled when there is lag and the position has not moved for
/// [`STALLED_AFTER`].
fn step(
    seen: &mut HashMap<(String, i32), (i64, Instant)>,
    k: &(String, i32),
    position: i64,
    lag: i64,
    now: Instant,
) -> bool {
    let e = seen.entry(k.clone()).or_insert((position, now));
    if e.0 != position {
        *e = (position, now);
    }
    lag > 0 && now.duration_since(e.1) >= STALLED_AFTER
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_partition_with_lag_that_stops_moving_is_stalled_and_one_that_moves_is_not() {
        let mut seen = HashMap::new();
        let k = ("t".to_string(), 0);
        let t0 = Instant::now();
        assert!(!step(&mut seen, &k, 10, 5, t0));
        assert!(!step(&mut seen, &k, 10, 5, t0 + STALLED_AFTER / 2));
        assert!(step(&mut seen, &k, 10, 5, t0 + STALLED_AFTER));
        // It moves again: not stalled, the clock starts over.
        assert!(!step(&mut seen, &k, 11, 5, t0 + STALLED_AFTER * 2));
        assert!(!step(
            &mut seen,
            &k,
            11,
            5,
            t0 + STALLED_AFTER * 2 + STALLED_AFTER / 2
        ));
        // No lag: never stalled, however long it stands.
        assert!(!step(&mut seen, &k, 11, 0, t0 + STALLED_AFTER * 10));
    }
}
