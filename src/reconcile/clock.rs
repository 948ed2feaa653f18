//! Watermarks: how far event time has certainly advanced on a partition of a flow's topics.
//!
//! Per assigned topic-partition the newest `occurred_at` read is kept (taken over from the
//! store when the partition is assigned: what was read before a restart or a rebalance is not
//! read again, and the event time it reached must not be forgotten), and whether the consumer
//! has read it to its end (from librdkafka's statistics: the high watermark against the last
//! record handed over; a record read since marks it as being read again). A flow's watermark on
//! partition p is the newest event time over its step topics' partition p when all are caught
//! up, else the smallest newest event time among those still being read (a topic whose backlog
//! is behind holds the watermark back), minus `allowed_lateness`. When every one is caught up
//! and nothing has arrived for `idle_after`, wall-clock time minus `allowed_lateness` counts
//! too, so a missing step is reported even when traffic stops.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::topology::Flow;

#[derive(Debug, Clone)]
struct Track {
    newest: Option<DateTime<Utc>>,
    caught_up: bool,
    last_record: Instant,
    /// Claimed for this instance in the store, and the newest event time stored for it (up to
    /// the offsets committed) taken over: the records read before a restart or a rebalance are
    /// not read again.
    claimed: bool,
}

impl Track {
    fn new() -> Track {
        Track {
            newest: None,
            caught_up: false,
            last_record: Instant::now(),
            claimed: false,
        }
    }
}

/// Event-time progress per topic-partition.
#[derive(Debug, Default, Clone)]
pub struct Clock {
    tracks: HashMap<(String, i32), Track>,
}

impl Clock {
    /// Keeps tracks only for the assigned topic-partitions (new ones start not caught up).
    pub fn assigned(&mut self, tps: &[(String, i32)]) {
        self.tracks.retain(|k, _| tps.contains(k));
        for tp in tps {
            self.tracks.entry(tp.clone()).or_insert_with(Track::new);
        }
    }

    /// The assigned topic-partitions not claimed yet.
    pub fn unclaimed(&self) -> Vec<(String, i32)> {
        let mut v: Vec<(String, i32)> = self
            .tracks
            .iter()
            .filter(|(_, t)| !t.claimed)
            .map(|(k, _)| k.clone())
            .collect();
        v.sort();
        v
    }

    /// `tp` was claimed: takes over the newest event time stored for it (none: nothing was).
    pub fn claimed(&mut self, tp: &(String, i32), stored: Option<DateTime<Utc>>) {
        if let Some(t) = self.tracks.get_mut(tp) {
            t.newest = t.newest.max(stored);
            t.claimed = true;
        }
    }

    /// `tp`'s claim was lost (another instance claimed it since): claimed again if assigned.
    pub fn unclaim(&mut self, tp: &(String, i32)) {
        if let Some(t) = self.tracks.get_mut(tp) {
            t.claimed = false;
        }
    }

    /// A record of `topic`/`partition` with this event time was read.
    pub fn record(&mut self, topic: &str, partition: i32, at: DateTime<Utc>) {
        let t = self
            .tracks
            .entry((topic.to_string(), partition))
            .or_insert_with(Track::new);
        t.newest = Some(t.newest.map_or(at, |n| n.max(at)));
        t.caught_up = false;
        t.last_record = Instant::now();
    }

    /// Which topic-partitions are read to their end (the consumer's statistics); one not
    /// listed is not.
    pub fn caught_up(&mut self, flags: &HashMap<(String, i32), bool>) {
        for (tp, t) in self.tracks.iter_mut() {
            t.caught_up = flags.get(tp).copied().unwrap_or(false);
        }
    }

    /// The topic-partitions counted as read to their end.
    pub fn caught_up_tracks(&self) -> Vec<(String, i32)> {
        self.tracks
            .iter()
            .filter(|(_, t)| t.caught_up)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// Sets whether one is read to its end (a fresher look at the broker).
    pub fn set_caught_up(&mut self, tp: &(String, i32), read_to_end: bool) {
        if let Some(t) = self.tracks.get_mut(tp) {
            t.caught_up = read_to_end;
        }
    }

    /// The assigned topic-partitions.
    pub fn assigned_set(&self) -> HashSet<(String, i32)> {
        self.tracks.keys().cloned().collect()
    }

    /// The partitions (numbers) assigned on any of `topics`.
    pub fn partitions(&self, topics: &[String]) -> Vec<i32> {
        let mut v: Vec<i32> = self
            .tracks
            .keys()
            .filter(|(t, _)| topics.contains(t))
            .map(|(_, p)| *p)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The flow's watermark on partition `p` (its step topics are `topics`).
    pub fn watermark(
        &self,
        flow: &Flow,
        topics: &[String],
        p: i32,
        idle_after: Duration,
        now: DateTime<Utc>,
    ) -> Option<DateTime<Utc>> {
        let tracks: Vec<&Track> = topics
            .iter()
            .filter_map(|t| self.tracks.get(&(t.clone(), p)))
            .collect();
        if tracks.is_empty() {
            return None;
        }
        let lateness = chrono::Duration::from_std(flow.allowed_lateness).unwrap_or_default();
        let all_caught_up = tracks.iter().all(|t| t.caught_up);
        let event_time = if all_caught_up {
            tracks.iter().filter_map(|t| t.newest).max()
        } else {
            tracks
                .iter()
                .filter(|t| !t.caught_up)
                .map(|t| t.newest)
                .min()
                .flatten()
        };
        let mut wm = event_time.map(|t| t - lateness);
        let quiet_for = tracks
            .iter()
            .map(|t| t.last_record.elapsed())
            .min()
            .unwrap_or_default();
        if all_caught_up && quiet_for >= idle_after {
            let wall = now - lateness;
            wm = Some(wm.map_or(wall, |w| w.max(wall)));
        }
        wm
    }
}

/// Which topic-partitions the consumer has read to their end, from librdkafka's statistics
/// (the high watermark against the offset of the last record handed over).
/// Per topic-partition: read to its end, and the offset read to.
pub(super) type CaughtUp = Arc<std::sync::Mutex<HashMap<(String, i32), (bool, i64)>>>;

/// The consumer's context: keeps [`CaughtUp`] from the statistics.
pub struct ReconContext {
    pub(super) caught_up: CaughtUp,
    /// Rebalances served (each one starts the instance's unwritten work over).
    pub(super) rebalances: std::sync::atomic::AtomicU64,
    /// Assignments the group answered with (empty ones too).
    pub(super) assigns: std::sync::atomic::AtomicU64,
}

impl rdkafka::ClientContext for ReconContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        let mut m = self.caught_up.lock().unwrap_or_else(|e| e.into_inner());
        m.clear();
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.hi_offset < 0 {
                    continue;
                }
                let read_to = part
                    .app_offset
                    .max(part.committed_offset)
                    .max(part.lo_offset);
                m.insert((topic.clone(), *p), (read_to >= part.hi_offset, read_to));
            }
        }
    }
}

impl rdkafka::consumer::ConsumerContext for ReconContext {
    fn post_rebalance(
        &self,
        _: &rdkafka::consumer::BaseConsumer<Self>,
        rebalance: &rdkafka::consumer::Rebalance<'_>,
    ) {
        self.rebalances
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if matches!(rebalance, rdkafka::consumer::Rebalance::Assign(_)) {
            self.assigns
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::FlowStep;

    fn flow() -> Flow {
        Flow {
            name: "f".into(),
            key: "order_id".into(),
            steps: vec![
                FlowStep {
                    event_type: "A".into(),
                    within: None,
                },
                FlowStep {
                    event_type: "B".into(),
                    within: Some(Duration::from_secs(60)),
                },
            ],
            allowed_lateness: Duration::from_secs(10),
        }
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    #[test]
    fn a_topic_behind_holds_the_watermark_back_until_caught_up() {
        let f = flow();
        let topics = vec!["a".to_string(), "b".to_string()];
        let mut c = Clock::default();
        c.assigned(&[("a".into(), 0), ("b".into(), 0)]);
        let idle = Duration::from_secs(3600);
        c.record("a", 0, t(100));
        assert_eq!(c.watermark(&f, &topics, 0, idle, t(0)), None, "b unread");
        c.record("b", 0, t(50));
        assert_eq!(c.watermark(&f, &topics, 0, idle, t(0)), Some(t(40)));
        let mut flags = HashMap::new();
        flags.insert(("a".to_string(), 0), true);
        c.caught_up(&flags);
        assert_eq!(
            c.watermark(&f, &topics, 0, idle, t(0)),
            Some(t(40)),
            "b still being read"
        );
        flags.insert(("b".to_string(), 0), true);
        c.caught_up(&flags);
        assert_eq!(c.watermark(&f, &topics, 0, idle, t(0)), Some(t(90)));
        assert_eq!(
            c.watermark(&f, &topics, 0, Duration::ZERO, t(1000)),
            Some(t(990)),
            "idle: wall clock"
        );
        assert_eq!(c.watermark(&f, &topics, 1, idle, t(0)), None);
    }

    #[test]
    fn an_assigned_partition_takes_over_the_event_time_reached_before() {
        let f = flow();
        let topics = vec!["a".to_string(), "b".to_string()];
        let mut c = Clock::default();
        c.assigned(&[("a".into(), 0), ("b".into(), 0)]);
        assert_eq!(c.unclaimed().len(), 2);
        // `a` was read to t(500) before a restart; `b` never had anything.
        c.claimed(&("a".into(), 0), Some(t(500)));
        c.claimed(&("b".into(), 0), None);
        assert!(c.unclaimed().is_empty());
        c.record("b", 0, t(20));
        let mut flags = HashMap::new();
        flags.insert(("a".to_string(), 0), true);
        flags.insert(("b".to_string(), 0), true);
        c.caught_up(&flags);
        let idle = Duration::from_secs(3600);
        assert_eq!(
            c.watermark(&f, &topics, 0, idle, t(0)),
            Some(t(490)),
            "read to the end: the newest, stored or read"
        );
        // An older stored time never moves a track back; a new assignment starts unclaimed.
        c.claimed(&("b".into(), 0), Some(t(10)));
        flags.insert(("a".to_string(), 0), false);
        c.caught_up(&flags);
        assert_eq!(c.watermark(&f, &topics, 0, idle, t(0)), Some(t(490)));
        c.assigned(&[("a".into(), 0), ("b".into(), 0), ("a".into(), 1)]);
        assert_eq!(c.unclaimed(), vec![("a".to_string(), 1)]);
    }
}
