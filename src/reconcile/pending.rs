//! What the reconciler has counted and not yet written: the pending work, and the write on
//! its way (shared by the loop, the consumer side and the write side).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use chrono::{DateTime, Utc};

use super::engine::FlowState;
use super::input;
use super::store::{Resolution, ResultRow};

/// Adds the time since `since` (µs) to a [`super::run::ReconcileStats`] counter.
pub(super) fn add_us(c: &AtomicU64, since: Instant) {
    c.fetch_add(since.elapsed().as_micros() as u64, Ordering::Relaxed);
}

/// Counted but not yet written: a write starts when the consumer has caught up, every 500 ms,
/// or when 4 batches' worth of instances are pending, and no write is on its way (each write
/// of an instance covers all of its events read meanwhile).
#[derive(Default)]
pub(super) struct Pending {
    pub(super) work: HashMap<(usize, String), Working>,
    pub(super) results: Vec<ResultRow>,
    pub(super) resolved: Vec<Resolution>,
    /// Next offset per topic-partition of the records absorbed.
    pub(super) offsets: BTreeMap<(String, i32), i64>,
    /// Newest (trusted) event time per topic-partition and cloud of the records absorbed.
    pub(super) newest: HashMap<(String, i32), BTreeMap<String, DateTime<Utc>>>,
    pub(super) skips: Vec<input::Skip>,
    /// Per flow: events counted, events already counted.
    pub(super) counted: Vec<(u64, u64)>,
    pub(super) since: Option<Instant>,
}

impl Pending {
    pub(super) fn new(flows: usize) -> Pending {
        Pending {
            counted: vec![(0, 0); flows],
            ..Pending::default()
        }
    }
}

/// One instance being worked on.
pub(super) struct Working {
    pub(super) part: i32,
    pub(super) state: FlowState,
    pub(super) changed: bool,
}

/// A write on its way.
pub(super) struct Writing {
    /// The instances it writes (newer than their stored rows until it lands).
    pub(super) work: HashMap<(usize, String), Working>,
    /// (flow, key, partition, next deadline) of the changed instances that have one.
    pub(super) due: Vec<(usize, String, i32, DateTime<Utc>)>,
    /// The rest of what it writes (results, resolutions, offsets, event times, skips, counts).
    pub(super) rest: Pending,
    /// The generations it was written under.
    pub(super) claims: HashMap<(String, i32), i64>,
    /// What became of it, or the failure.
    pub(super) task: tokio::task::JoinHandle<anyhow::Result<Wrote>>,
    /// The watermarks it writes.
    pub(super) marks: Vec<((usize, i32), DateTime<Utc>)>,
}

/// What a write did.
#[derive(Debug, Default)]
pub(super) struct Wrote {
    /// Partitions another instance claimed since (nothing was written then).
    pub(super) taken: Vec<(String, i32)>,
    /// Partitions with outcomes written and not (known to be) published: the sweep publishes them.
    pub(super) unpublished: Vec<i32>,
}

impl Writing {
    pub(super) fn finished(&self) -> bool {
        self.task.is_finished()
    }
}
