//! Which instances may already be stored, per partition: a Bloom filter of (flow, key) built
//! when the partition is claimed (every `flow_state` row of it) and added to as this instance
//! writes. A first sighting of an order the filter has never seen needs no read of PostgreSQL
//! (most events of a stream start new orders). A false positive only costs the read it would
//! have cost anyway; there are no false negatives, since after the claim no one else writes the
//! partition.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

/// Bits per key the filter is sized for (about 1 % false positives with 7 probes).
const BITS_PER_KEY: usize = 10;
const PROBES: u64 = 7;
/// Keys a filter is sized for at least.
const MIN_KEYS: usize = 1 << 16;

#[derive(Debug, Clone)]
struct Bloom {
    bits: Vec<u64>,
    capacity: usize,
    inserted: usize,
}

fn hashes(flow: usize, key: &str) -> (u64, u64) {
    let mut a = std::hash::DefaultHasher::new();
    (flow, key).hash(&mut a);
    let mut b = std::hash::DefaultHasher::new();
    (key, flow, 0x9e37_79b9_7f4a_7c15u64).hash(&mut b);
    (a.finish(), b.finish() | 1)
}

impl Bloom {
    fn new(keys: usize) -> Bloom {
        let capacity = keys.max(MIN_KEYS);
        let words = (capacity * BITS_PER_KEY).div_ceil(64);
        Bloom {
            bits: vec![0; words],
            capacity,
            inserted: 0,
        }
    }

    fn slots(&self, flow: usize, key: &str) -> impl Iterator<Item = usize> {
        let (h1, h2) = hashes(flow, key);
        let m = (self.bits.len() * 64) as u64;
        (0..PROBES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % m) as usize)
    }

    fn insert(&mut self, flow: usize, key: &str) {
        let slots: Vec<usize> = self.slots(flow, key).collect();
        for s in slots {
            self.bits[s / 64] |= 1 << (s % 64);
        }
        self.inserted += 1;
    }

    fn contains(&self, flow: usize, key: &str) -> bool {
        // Past twice its capacity the filter says yes to almost anything: it stops answering.
        self.inserted > 2 * self.capacity
            || self
                .slots(flow, key)
                .all(|s| self.bits[s / 64] & (1 << (s % 64)) != 0)
    }
}

/// The filters of the claimed partitions.
#[derive(Debug, Default, Clone)]
pub struct Known {
    filters: HashMap<i32, Bloom>,
}

impl Known {
    /// Whether partition `part` has a filter (built at its claim).
    pub fn has(&self, part: i32) -> bool {
        self.filters.contains_key(&part)
    }

    /// Builds `part`'s filter from the stored instances of the partition.
    pub fn build<'a>(
        &mut self,
        part: i32,
        stored: impl ExactSizeIterator<Item = (usize, &'a str)>,
    ) {
        let mut b = Bloom::new(stored.len() * 2);
        for (flow, key) in stored {
            b.insert(flow, key);
        }
        self.filters.insert(part, b);
    }

    /// An instance is (or is about to be) stored.
    pub fn insert(&mut self, part: i32, flow: usize, key: &str) {
        if let Some(b) = self.filters.get_mut(&part) {
            b.insert(flow, key);
        }
    }

    /// Whether the instance may be stored (always, for a partition without a filter).
    pub fn may_be_stored(&self, part: i32, flow: usize, key: &str) -> bool {
        self.filters
            .get(&part)
            .is_none_or(|b| b.contains(flow, key))
    }

    pub fn clear(&mut self) {
        self.filters.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let keys: Vec<String> = (0..10_000).map(|i| format!("O-{i}")).collect();
        let mut k = Known::default();
        assert!(k.may_be_stored(0, 0, "anything"), "no filter: always");
        k.build(0, keys.iter().map(|s| (0, s.as_str())));
        assert!(keys.iter().all(|s| k.may_be_stored(0, 0, s)));
        let fp = (0..10_000)
            .filter(|i| k.may_be_stored(0, 0, &format!("N-{i}")))
            .count();
        assert!(fp < 200, "{fp} false positives of 10,000");
        assert!(!k.may_be_stored(0, 0, "N-new"));
        k.insert(0, 0, "N-new");
        assert!(k.may_be_stored(0, 0, "N-new"));
        assert!(
            k.may_be_stored(1, 0, "N-new"),
            "another partition: no filter"
        );
    }
}
