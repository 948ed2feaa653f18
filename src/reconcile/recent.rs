//! The instances this reconciler wrote last, as written: an order's next step is usually read
//! soon after its first, and then needs no read from PostgreSQL. An entry is exactly the stored
//! row (it enters when its write landed, under this instance's claim), so using it is the same
//! as reading the row: the cache is emptied on every rebalance and loses the partitions another
//! instance takes over; an entry is taken out while its instance is pending or being written
//! (those versions are newer), and is ignored past [`MAX_AGE`] (instances that old may have been
//! pruned since). Bounded by [`RECENT_STATES`] entries, oldest written out first.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use super::engine::FlowState;
use super::pending::Working;

/// Instances kept (about 1 KiB each with three steps).
pub const RECENT_STATES: usize = 20_000;
/// Entries older than this are not used.
pub const MAX_AGE: Duration = Duration::from_secs(600);

type Key = (usize, String);

#[derive(Debug, Default)]
pub struct Recent {
    entries: HashMap<Key, Entry>,
    /// Keys in the order they were kept (with the sequence they were kept under: an older
    /// position of a key kept again is skipped when it comes out).
    order: VecDeque<(u64, Key)>,
    seq: u64,
}

#[derive(Debug)]
struct Entry {
    seq: u64,
    at: Instant,
    part: i32,
    state: FlowState,
}

impl Recent {
    /// Keeps the instances of a write that landed.
    pub(super) fn keep(&mut self, work: HashMap<Key, Working>) {
        let now = Instant::now();
        for (k, w) in work {
            self.seq += 1;
            self.order.push_back((self.seq, k.clone()));
            self.entries.insert(
                k,
                Entry {
                    seq: self.seq,
                    at: now,
                    part: w.part,
                    state: w.state,
                },
            );
        }
        while self.entries.len() > RECENT_STATES {
            let Some((seq, k)) = self.order.pop_front() else {
                break;
            };
            if self.entries.get(&k).is_some_and(|e| e.seq == seq) {
                self.entries.remove(&k);
            }
        }
        // Positions of keys kept again since: dropped once they outnumber the entries.
        if self.order.len() > 2 * RECENT_STATES.max(self.entries.len()) {
            let entries = &self.entries;
            self.order
                .retain(|(seq, k)| entries.get(k).is_some_and(|e| e.seq == *seq));
        }
    }

    /// The instance as stored, if kept (and not too old); it leaves the cache.
    pub(super) fn take(&mut self, k: &Key) -> Option<(i32, FlowState)> {
        let e = self.entries.remove(k)?;
        (e.at.elapsed() <= MAX_AGE).then_some((e.part, e.state))
    }

    pub fn contains(&self, k: &Key) -> bool {
        self.entries.contains_key(k)
    }

    /// Forgets the instances of the (flow, partition) pairs `gone` says.
    pub(super) fn forget(&mut self, gone: impl Fn(usize, i32) -> bool) {
        self.entries.retain(|(f, _), e| !gone(*f, e.part));
    }

    pub(super) fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn work(keys: &[&str], part: i32) -> HashMap<Key, Working> {
        keys.iter()
            .map(|k| {
                (
                    (0, k.to_string()),
                    Working {
                        part,
                        state: FlowState::default(),
                        changed: true,
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_entry_is_taken_once_and_the_oldest_go_first() {
        let mut r = Recent::default();
        r.keep(work(&["a"], 1));
        assert_eq!(r.take(&(0, "a".into())).map(|x| x.0), Some(1));
        assert!(r.take(&(0, "a".into())).is_none(), "taken out");
        let many: Vec<String> = (0..RECENT_STATES + 10).map(|i| format!("k{i}")).collect();
        for k in &many {
            r.keep(work(&[k.as_str()], 0));
        }
        assert_eq!(r.len(), RECENT_STATES);
        assert!(!r.contains(&(0, "k0".into())), "the oldest went first");
        assert!(r.contains(&(0, many.last().unwrap().clone())));
        // Kept again: its newer position counts, the older one is skipped.
        r.keep(work(&["k20"], 0));
        for i in 0..20 {
            r.keep(work(&[format!("x{i}").as_str()], 0));
        }
        assert!(r.contains(&(0, "k20".into())));
        assert!(r.order.len() <= 2 * RECENT_STATES + 1);
    }

    #[test]
    fn partitions_taken_over_are_forgotten() {
        let mut r = Recent::default();
        r.keep(work(&["a"], 1));
        r.keep(work(&["b"], 2));
        r.forget(|_, p| p == 1);
        assert!(!r.contains(&(0, "a".into())));
        assert!(r.contains(&(0, "b".into())));
        r.clear();
        assert!(r.is_empty());
    }
}
