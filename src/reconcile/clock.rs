//! Watermarks: how far event time has certainly advanced on a partition of a flow's topics.
//!
//! Event time is held back by the slowest input, the way Flink takes the minimum over its
//! inputs: an input is one cloud (source) on one step topic-partition, and its time is the
//! newest trusted event time read from it (see `input::Seen::trust`). An input with nothing
//! new for `idle_after` stops holding (a cloud that went quiet). When every step topic-partition
//! is read to its end and quiet for `idle_after`, wall-clock time counts too, so a missing step
//! is reported when traffic stops. Both are capped by the raw backlog's bound (see
//! [`super::backlog`]): nothing later than the reception time of the oldest raw record the
//! processor has not fanned out yet, so a step acknowledged by the ingress before a deadline
//! is never reported missing while it waits behind a sink outage. `allowed_lateness` is taken
//! off the result. Per input, the time reached is taken over from the store when the partition
//! is assigned (what was read before a restart or a rebalance is not read again), capped at
//! the wall clock.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};

use crate::topology::Flow;

/// One cloud on one topic-partition.
#[derive(Debug, Clone)]
struct Input {
    newest: DateTime<Utc>,
    last_record: Instant,
}

#[derive(Debug, Clone)]
struct Track {
    inputs: BTreeMap<String, Input>,
    caught_up: bool,
    /// The last record read (or the claim).
    last_activity: Instant,
    /// Claimed for this instance in the store, and the event times stored for it (up to the
    /// offsets committed) taken over.
    claimed: bool,
}

impl Track {
    fn new() -> Track {
        Track {
            inputs: BTreeMap::new(),
            caught_up: false,
            last_activity: Instant::now(),
            claimed: false,
        }
    }
}

/// What holds a watermark where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Held {
    /// The slowest input: a cloud on a step topic.
    Input { topic: String, source: String },
    /// Raw records the processor has not fanned out yet (a lagging or stalled processor).
    RawBacklog,
    /// Every input read to its end and quiet: the wall clock.
    WallClock,
}

impl Held {
    pub fn describe(&self) -> String {
        match self {
            Held::Input { topic, source } => format!("input {source} on {topic}"),
            Held::RawBacklog => "raw backlog (records not yet processed)".into(),
            Held::WallClock => "wall clock (inputs idle)".into(),
        }
    }
}

/// Event-time progress per topic-partition and cloud.
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

    /// `tp` was claimed: takes over the event time stored per cloud (capped at `now`: a time
    /// ahead of the wall clock is never taken over).
    pub fn claimed(
        &mut self,
        tp: &(String, i32),
        stored: &[(String, DateTime<Utc>)],
        now: DateTime<Utc>,
    ) {
        if let Some(t) = self.tracks.get_mut(tp) {
            for (source, at) in stored {
                let at = (*at).min(now);
                let i = t.inputs.entry(source.clone()).or_insert(Input {
                    newest: at,
                    last_record: Instant::now(),
                });
                i.newest = i.newest.max(at);
            }
            t.last_activity = Instant::now();
            t.claimed = true;
        }
    }

    /// `tp`'s claim was lost (another instance claimed it since): claimed again if assigned.
    pub fn unclaim(&mut self, tp: &(String, i32)) {
        if let Some(t) = self.tracks.get_mut(tp) {
            t.claimed = false;
        }
    }

    /// A record of `topic`/`partition` from `source` with this (trusted) event time was read.
    pub fn record(&mut self, topic: &str, partition: i32, source: &str, at: DateTime<Utc>) {
        let t = self
            .tracks
            .entry((topic.to_string(), partition))
            .or_insert_with(Track::new);
        let now = Instant::now();
        match t.inputs.get_mut(source) {
            Some(i) => {
                i.newest = i.newest.max(at);
                i.last_record = now;
            }
            None => {
                t.inputs.insert(
                    source.to_string(),
                    Input {
                        newest: at,
                        last_record: now,
                    },
                );
            }
        }
        t.caught_up = false;
        t.last_activity = now;
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

    /// The flow's watermark on partition `p` (its topics are `topics`) and what holds it;
    /// `bound` is the raw backlog's (none: not known yet, nothing advances).
    pub fn watermark(
        &self,
        flow: &Flow,
        topics: &[String],
        p: i32,
        idle_after: Duration,
        now: DateTime<Utc>,
        bound: Option<DateTime<Utc>>,
    ) -> Option<(DateTime<Utc>, Held)> {
        let tracks: Vec<(&String, &Track)> = topics
            .iter()
            .filter_map(|t| self.tracks.get(&(t.clone(), p)).map(|x| (t, x)))
            .collect();
        if tracks.is_empty() {
            return None;
        }
        let mut slowest: Option<(DateTime<Utc>, Held)> = None;
        for (topic, t) in &tracks {
            // A topic-partition still being read with no active input yet (its records not
            // reached, e.g. right after an assignment): whatever it holds is unknown.
            let active = t
                .inputs
                .values()
                .any(|i| i.last_record.elapsed() < idle_after);
            if !t.caught_up && !active {
                return None;
            }
            for (source, i) in &t.inputs {
                if i.last_record.elapsed() >= idle_after {
                    continue;
                }
                if slowest.as_ref().is_none_or(|(at, _)| i.newest < *at) {
                    slowest = Some((
                        i.newest,
                        Held::Input {
                            topic: (*topic).clone(),
                            source: source.clone(),
                        },
                    ));
                }
            }
        }
        let quiet = tracks
            .iter()
            .all(|(_, t)| t.caught_up && t.last_activity.elapsed() >= idle_after);
        let mut mark = slowest;
        if quiet && mark.as_ref().is_none_or(|(at, _)| *at < now) {
            mark = Some((now, Held::WallClock));
        }
        let (at, held) = mark?;
        let bound = bound?;
        let (at, held) = if bound < at {
            (bound, Held::RawBacklog)
        } else {
            (at, held)
        };
        let lateness = chrono::Duration::from_std(flow.allowed_lateness).unwrap_or_default();
        Some((at - lateness, held))
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
    /// Lag and stalled partitions for `/metrics`.
    pub(super) progress: crate::kafka::progress::PartitionProgress,
}

impl rdkafka::ClientContext for ReconContext {
    fn stats(&self, stats: rdkafka::Statistics) {
        // helios_reconcile_consumer_lag, helios_reconcile_partition_stalled
        self.progress.observe(&stats);
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
        Flow::new(
            "f",
            vec![
                FlowStep::new("A", None),
                FlowStep::new("B", Some(Duration::from_secs(60))),
            ],
            Duration::from_secs(10),
        )
    }

    fn t(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn at(w: Option<(DateTime<Utc>, Held)>) -> Option<DateTime<Utc>> {
        w.map(|(t, _)| t)
    }

    #[test]
    fn the_slowest_cloud_holds_the_watermark_back() {
        let f = flow();
        let topics = vec!["a".to_string(), "b".to_string()];
        let mut c = Clock::default();
        c.assigned(&[("a".into(), 0), ("b".into(), 0)]);
        let idle = Duration::from_secs(3600);
        let far = Some(t(100_000));
        assert_eq!(
            at(c.watermark(&f, &topics, 0, idle, t(0), far)),
            None,
            "nothing read"
        );
        c.record("a", 0, "aws", t(100));
        c.record("b", 0, "gcp", t(50));
        assert_eq!(
            at(c.watermark(&f, &topics, 0, idle, t(0), far)),
            Some(t(40))
        );
        // Fast traffic from one cloud never moves event time past another's newest.
        c.record("a", 0, "aws", t(500));
        c.record("b", 0, "aws", t(500));
        let (w, held) = c.watermark(&f, &topics, 0, idle, t(0), far).unwrap();
        assert_eq!(w, t(40));
        assert_eq!(
            held,
            Held::Input {
                topic: "b".into(),
                source: "gcp".into()
            }
        );
        // A topic being read that no record came from yet holds everything.
        let mut other = c.clone();
        other.assigned(&[("a".into(), 0), ("b".into(), 0), ("c".into(), 0)]);
        let three = vec!["a".to_string(), "b".to_string(), "c".to_string()];
        assert_eq!(other.watermark(&f, &three, 0, idle, t(0), far), None);
        // Read to the end everywhere: still the slowest input, not the newest.
        let mut flags = HashMap::new();
        flags.insert(("a".to_string(), 0), true);
        flags.insert(("b".to_string(), 0), true);
        c.caught_up(&flags);
        assert_eq!(
            at(c.watermark(&f, &topics, 0, idle, t(0), far)),
            Some(t(40))
        );
        // The raw backlog's bound caps it; unknown bound: nothing.
        let (w, held) = c
            .watermark(&f, &topics, 0, idle, t(0), Some(t(45)))
            .unwrap();
        assert_eq!((w, held), (t(35), Held::RawBacklog));
        assert_eq!(c.watermark(&f, &topics, 0, idle, t(0), None), None);
        // Idle: inputs stop holding, wall clock (capped by the bound).
        let (w, held) = c
            .watermark(&f, &topics, 0, Duration::ZERO, t(1000), far)
            .unwrap();
        assert_eq!((w, held), (t(990), Held::WallClock));
        assert_eq!(
            at(c.watermark(&f, &topics, 0, Duration::ZERO, t(1000), Some(t(700)))),
            Some(t(690)),
            "idle fallback never passes the raw backlog"
        );
        assert_eq!(c.watermark(&f, &topics, 1, idle, t(0), far), None);
    }

    #[test]
    fn an_assigned_partition_takes_over_the_event_time_reached_before_capped_at_now() {
        let f = flow();
        let topics = vec!["a".to_string(), "b".to_string()];
        let mut c = Clock::default();
        c.assigned(&[("a".into(), 0), ("b".into(), 0)]);
        assert_eq!(c.unclaimed().len(), 2);
        c.claimed(
            &("a".into(), 0),
            &[("aws".into(), t(500)), ("gcp".into(), t(400))],
            t(1000),
        );
        c.claimed(&("b".into(), 0), &[("aws".into(), t(99_999))], t(1000));
        assert!(c.unclaimed().is_empty());
        let idle = Duration::from_secs(3600);
        let far = Some(t(100_000));
        assert_eq!(
            at(c.watermark(&f, &topics, 0, idle, t(1000), far)),
            Some(t(390))
        );
        c.record("a", 0, "gcp", t(800));
        assert_eq!(
            at(c.watermark(&f, &topics, 0, idle, t(1000), far)),
            Some(t(490)),
            "a stored time from the future counts as now"
        );
        c.assigned(&[("a".into(), 0), ("b".into(), 0), ("a".into(), 1)]);
        assert_eq!(c.unclaimed(), vec![("a".to_string(), 1)]);
    }
}
