//! The commit path's rule, as types: an offset is committed only when every record below it on
//! its partition has resolved (stored and fanned out, counted duplicate, dead-lettered, or a
//! handshake), whatever fails, panics, shuts down or rebalances in between (DESIGN.md,
//! guarantee 8).
//!
//! - [`Ownership`]: which partitions this instance owns now, each with an *epoch* that changes
//!   whenever the partition's read position is reset (assigned, or sought back). A record carries
//!   the epoch it was polled in; work of an older epoch is stale and never committed. Only the
//!   partitions a rebalance moved change epoch: under cooperative or KIP-848 rebalancing the
//!   partitions an instance keeps carry on untouched.
//! - [`Ticket`]: a batch's claim on its offset ranges, one [`Span`] per partition. Made only by
//!   [`CommitSequencer::submit`], not cloneable; a delivery holds it and hands it back only when
//!   every record of the batch resolved.
//! - [`CommitSequencer`]: per partition, the ranges submitted in offset order (Kafka Connect's
//!   `SubmittedRecords`). Only the end of the leading run of resolved ranges is ever offered for
//!   commit, so a batch that fails, is abandoned or panics holds every later offset of its
//!   partitions back; abandoning it rewinds those partitions to its first offset (a new epoch),
//!   so it is read and delivered again instead of skipped.
//! - [`Commit`]: offsets the sequencer allows, with the epoch each was allowed in; the consumer
//!   commits only those whose epoch still holds.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// A topic-partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PartitionKey {
    pub topic: String,
    pub partition: i32,
}

impl PartitionKey {
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        PartitionKey {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for PartitionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Changes (strictly increases, across all partitions) every time a partition's read position
/// is reset.
pub type Epoch = u64;

/// The partitions this instance owns now, and their epochs. Shared by the consumer's rebalance
/// callback (assign, revoke), the consumer (stamping records, fencing commits) and the
/// sequencer (rewinds).
#[derive(Debug, Default)]
pub struct Ownership {
    inner: Mutex<OwnershipState>,
}

#[derive(Debug, Default)]
struct OwnershipState {
    last: Epoch,
    owned: HashMap<String, BTreeMap<i32, Epoch>>,
}

impl OwnershipState {
    fn bump(&mut self, topic: &str, partition: i32) -> Epoch {
        self.last += 1;
        let e = self.last;
        self.owned
            .entry(topic.to_string())
            .or_default()
            .insert(partition, e);
        e
    }
}

impl Ownership {
    fn state(&self) -> std::sync::MutexGuard<'_, OwnershipState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Partitions assigned to this instance: each gets a new epoch (under eager rebalancing a
    /// partition revoked and assigned again is read again from the committed offset, so work
    /// from before is stale).
    pub fn assign<'a>(&self, parts: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut s = self.state();
        for (t, p) in parts {
            s.bump(t, p);
        }
    }

    /// Partitions taken from this instance: their work is stale from now on.
    pub fn revoke<'a>(&self, parts: impl IntoIterator<Item = (&'a str, i32)>) {
        let mut s = self.state();
        for (t, p) in parts {
            if let Some(m) = s.owned.get_mut(t) {
                m.remove(&p);
                if m.is_empty() {
                    s.owned.remove(t);
                }
            }
        }
    }

    /// Every partition taken (eager revocation, unsubscribe, a lost assignment).
    pub fn revoke_all(&self) {
        self.state().owned.clear();
    }

    /// The partition's read position is being reset (sought back): a new epoch, if it is owned.
    pub fn reset(&self, key: &PartitionKey) -> Option<Epoch> {
        let mut s = self.state();
        let owned = s
            .owned
            .get(&key.topic)
            .is_some_and(|m| m.contains_key(&key.partition));
        owned.then(|| s.bump(&key.topic, key.partition))
    }

    /// The partition's epoch now; `None` when it is not owned.
    pub fn epoch(&self, topic: &str, partition: i32) -> Option<Epoch> {
        self.state().owned.get(topic)?.get(&partition).copied()
    }

    /// True while the partition is owned in `epoch`.
    pub fn holds(&self, key: &PartitionKey, epoch: Epoch) -> bool {
        self.epoch(&key.topic, key.partition) == Some(epoch)
    }

    /// Every owned partition with its epoch.
    pub fn owned(&self) -> Vec<(PartitionKey, Epoch)> {
        let s = self.state();
        s.owned
            .iter()
            .flat_map(|(t, m)| {
                m.iter()
                    .map(|(p, e)| (PartitionKey::new(t.clone(), *p), *e))
            })
            .collect()
    }
}

/// A batch's records on one partition: offsets `first..next` (every record in between that the
/// consumer handed over is in the batch), polled in `epoch`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Span {
    pub key: PartitionKey,
    pub epoch: Epoch,
    pub first: i64,
    pub next: i64,
}

/// Identifies a submitted batch (for abandoning one whose delivery is gone, e.g. panicked).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TicketId(u64);

impl std::fmt::Display for TicketId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A batch's claim on its ranges. Not `Clone`: one batch, one claim, given back once.
#[derive(Debug)]
pub struct Ticket {
    id: TicketId,
    spans: Vec<Span>,
}

impl Ticket {
    pub fn id(&self) -> TicketId {
        self.id
    }

    /// The ranges this batch holds (registered with the sequencer).
    pub fn spans(&self) -> &[Span] {
        &self.spans
    }
}

/// Offsets the sequencer allows to commit (per partition: the next offset to read), with the
/// epoch each was allowed in.
#[derive(Debug, Default)]
#[must_use = "a Commit does nothing until the consumer commits it"]
pub struct Commit {
    offsets: Vec<(Span, i64)>,
}

impl Commit {
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }

    /// `(partition, epoch, next offset)` for each partition.
    pub fn offsets(&self) -> impl Iterator<Item = (&PartitionKey, Epoch, i64)> {
        self.offsets.iter().map(|(s, o)| (&s.key, s.epoch, *o))
    }

    /// Keeps only the partitions `keep` says still hold (the consumer's fence).
    pub fn retain(&mut self, mut keep: impl FnMut(&PartitionKey, Epoch) -> bool) -> usize {
        let before = self.offsets.len();
        self.offsets.retain(|(s, _)| keep(&s.key, s.epoch));
        before - self.offsets.len()
    }
}

/// Where to read a partition again from after an abandoned batch (its first offset), and the
/// epoch the records read from there will carry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rewind {
    pub key: PartitionKey,
    pub offset: i64,
    pub epoch: Epoch,
}

#[derive(Debug)]
struct Range {
    id: TicketId,
    first: i64,
    next: i64,
    resolved: bool,
}

#[derive(Debug)]
struct Ledger {
    epoch: Epoch,
    /// Submitted ranges not yet part of the leading resolved run, in offset order.
    ranges: VecDeque<Range>,
    /// The end of the leading resolved run: what may be committed.
    resolved_to: Option<i64>,
    /// What was last handed out for commit (not handed out again unless the commit failed).
    offered: Option<i64>,
}

impl Ledger {
    fn new(epoch: Epoch) -> Self {
        Ledger {
            epoch,
            ranges: VecDeque::new(),
            resolved_to: None,
            offered: None,
        }
    }
}

/// Per partition, the ranges submitted and which resolved; see the module docs.
#[derive(Debug)]
pub struct CommitSequencer {
    ownership: Arc<Ownership>,
    next_id: u64,
    ledgers: BTreeMap<PartitionKey, Ledger>,
}

impl CommitSequencer {
    pub fn new(ownership: Arc<Ownership>) -> Self {
        CommitSequencer {
            ownership,
            next_id: 0,
            ledgers: BTreeMap::new(),
        }
    }

    /// Registers a batch's ranges; returns its ticket. A span that is stale (its partition is no
    /// longer owned in its epoch) or that does not come after what was submitted before on its
    /// partition is left out of the ticket: those records are never committed by this batch.
    pub fn submit(&mut self, spans: Vec<Span>) -> Ticket {
        self.next_id += 1;
        let id = TicketId(self.next_id);
        let mut kept = Vec::with_capacity(spans.len());
        for s in spans {
            if !self.ownership.holds(&s.key, s.epoch) || s.next <= s.first {
                continue;
            }
            let ledger = self
                .ledgers
                .entry(s.key.clone())
                .or_insert_with(|| Ledger::new(s.epoch));
            if ledger.epoch != s.epoch {
                // Owned in this span's epoch, so the ledger's is older: its partition was
                // reassigned or rewound since, and what it held is stale.
                *ledger = Ledger::new(s.epoch);
            }
            let after = ledger
                .ranges
                .back()
                .map(|r| r.next)
                .or(ledger.resolved_to)
                .unwrap_or(i64::MIN);
            if s.first < after {
                tracing::error!(partition = %s.key, first = s.first, expected_from = after,
                    "a batch's records overlap what was submitted before on their partition; they will not be committed by it");
                continue;
            }
            ledger.ranges.push_back(Range {
                id,
                first: s.first,
                next: s.next,
                resolved: false,
            });
            kept.push(s);
        }
        Ticket { id, spans: kept }
    }

    /// Every record of the ticket's batch resolved: returns what may be committed now.
    pub fn resolve(&mut self, ticket: Ticket) -> Commit {
        for s in &ticket.spans {
            if let Some(l) = self.ledgers.get_mut(&s.key).filter(|l| l.epoch == s.epoch) {
                if let Some(r) = l.ranges.iter_mut().find(|r| r.id == ticket.id) {
                    r.resolved = true;
                }
            }
        }
        self.committable()
    }

    /// The batch will not resolve (its delivery gave up, was fenced, or panicked). On each of its
    /// partitions still owned, every range not yet committable is dropped (the abandoned one, any
    /// later one, and an earlier one still running), the partition gets a new epoch, and the
    /// caller seeks it back to the returned offset: the first record not yet resolved in order.
    /// Nothing past it is committed until it is read and resolved again.
    pub fn abandon(&mut self, id: TicketId) -> Vec<Rewind> {
        let mut rewinds = vec![];
        for (key, l) in self.ledgers.iter_mut() {
            if !l.ranges.iter().any(|r| r.id == id) {
                continue;
            }
            let offset = l.ranges.front().map(|r| r.first).expect("a range");
            l.ranges.clear();
            if !self.ownership.holds(key, l.epoch) {
                continue;
            }
            if let Some(epoch) = self.ownership.reset(key) {
                l.epoch = epoch;
                rewinds.push(Rewind {
                    key: key.clone(),
                    offset,
                    epoch,
                });
            }
        }
        rewinds
    }

    /// What may be committed now: per partition owned in its ledger's epoch, the end of the
    /// leading run of resolved ranges, when it moved on since last offered. Ledgers of partitions
    /// no longer owned in their epoch are dropped.
    pub fn committable(&mut self) -> Commit {
        let ownership = &self.ownership;
        self.ledgers.retain(|k, l| ownership.holds(k, l.epoch));
        let mut offsets = vec![];
        for (key, l) in self.ledgers.iter_mut() {
            while l.ranges.front().is_some_and(|r| r.resolved) {
                l.resolved_to = l.ranges.pop_front().map(|r| r.next);
            }
            if let Some(next) = l.resolved_to {
                if l.offered.is_none_or(|o| next > o) {
                    l.offered = Some(next);
                    offsets.push((
                        Span {
                            key: key.clone(),
                            epoch: l.epoch,
                            first: next,
                            next,
                        },
                        next,
                    ));
                }
            }
        }
        Commit { offsets }
    }

    /// A commit failed: its offsets are offered again next time.
    pub fn commit_failed(&mut self, c: &Commit) {
        for (s, o) in &c.offsets {
            if let Some(l) = self.ledgers.get_mut(&s.key).filter(|l| l.epoch == s.epoch) {
                if l.offered == Some(*o) {
                    l.offered = None;
                }
            }
        }
    }

    /// Batches submitted and not resolved yet (counted per partition).
    pub fn unresolved(&self) -> usize {
        self.ledgers
            .values()
            .flat_map(|l| l.ranges.iter())
            .filter(|r| !r.resolved)
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(p: i32) -> PartitionKey {
        PartitionKey::new("raw", p)
    }

    fn setup(parts: &[i32]) -> (Arc<Ownership>, CommitSequencer) {
        let o = Arc::new(Ownership::default());
        o.assign(parts.iter().map(|p| ("raw", *p)));
        let s = CommitSequencer::new(o.clone());
        (o, s)
    }

    fn span(o: &Ownership, p: i32, first: i64, next: i64) -> Span {
        Span {
            key: key(p),
            epoch: o.epoch("raw", p).expect("owned"),
            first,
            next,
        }
    }

    fn offsets(c: &Commit) -> Vec<(i32, i64)> {
        c.offsets().map(|(k, _, o)| (k.partition, o)).collect()
    }

    #[test]
    fn only_the_leading_run_of_resolved_batches_is_committed() {
        let (o, mut s) = setup(&[0]);
        let a = s.submit(vec![span(&o, 0, 0, 10)]);
        let b = s.submit(vec![span(&o, 0, 10, 20)]);
        let c = s.submit(vec![span(&o, 0, 20, 30)]);
        // b and c resolve first: nothing may be committed while a is open.
        assert!(s.resolve(b).is_empty());
        assert!(s.resolve(c).is_empty());
        assert_eq!(offsets(&s.resolve(a)), vec![(0, 30)]);
        // Offered once.
        assert!(s.committable().is_empty());
        assert_eq!(s.unresolved(), 0);
    }

    #[test]
    fn an_abandoned_batch_blocks_later_ones_and_rewinds_its_partitions_only() {
        let (o, mut s) = setup(&[0, 1]);
        let n = s.submit(vec![span(&o, 0, 0, 50)]);
        let n1 = s.submit(vec![span(&o, 0, 50, 100), span(&o, 1, 0, 7)]);
        let n_id = n.id();
        // N's delivery gives up (shutdown during a retry) or panics: N+1 resolves anyway.
        let c = s.resolve(n1);
        // Partition 1 has nothing below N+1: committed. Partition 0 waits for N.
        assert_eq!(offsets(&c), vec![(1, 7)]);
        let old0 = o.epoch("raw", 0).unwrap();
        let rewinds = s.abandon(n_id);
        assert_eq!(rewinds.len(), 1);
        assert_eq!((rewinds[0].key.partition, rewinds[0].offset), (0, 0));
        assert_ne!(rewinds[0].epoch, old0, "a rewind starts a new epoch");
        assert_eq!(o.epoch("raw", 0), Some(rewinds[0].epoch));
        // N's ticket resolving late (its task came back after all) changes nothing.
        let _ = n;
        assert!(s.committable().is_empty());
        // Read again from 0 in the new epoch: 0..100 committed only once it resolved.
        let again = s.submit(vec![span(&o, 0, 0, 100)]);
        assert!(s.committable().is_empty());
        assert_eq!(offsets(&s.resolve(again)), vec![(0, 100)]);
    }

    #[test]
    fn a_late_resolution_of_an_abandoned_or_stale_ticket_commits_nothing() {
        let (o, mut s) = setup(&[0]);
        let n = s.submit(vec![span(&o, 0, 0, 10)]);
        let id = n.id();
        s.abandon(id);
        assert!(s.resolve(n).is_empty());
        // Revoked while in flight.
        let m = s.submit(vec![span(&o, 0, 0, 10)]);
        o.revoke([("raw", 0)]);
        assert!(s.resolve(m).is_empty());
        // Eager: revoked and assigned again (a new epoch): the old batch stays uncommitted.
        o.assign([("raw", 0)]);
        let stale = Span {
            key: key(0),
            epoch: 1,
            first: 0,
            next: 10,
        };
        let t = s.submit(vec![stale]);
        assert!(t.spans().is_empty(), "a stale span is not registered");
        assert!(s.resolve(t).is_empty());
    }

    #[test]
    fn a_rebalance_touches_only_the_partitions_it_moved() {
        let (o, mut s) = setup(&[0, 1]);
        let a = s.submit(vec![span(&o, 0, 0, 10), span(&o, 1, 0, 10)]);
        // Cooperative: partition 1 is revoked, 0 is kept (no new epoch for it).
        let e0 = o.epoch("raw", 0);
        o.revoke([("raw", 1)]);
        assert_eq!(o.epoch("raw", 0), e0);
        assert_eq!(offsets(&s.resolve(a)), vec![(0, 10)]);
        let b = s.submit(vec![span(&o, 0, 10, 20)]);
        assert_eq!(offsets(&s.resolve(b)), vec![(0, 20)]);
    }

    #[test]
    fn an_earlier_batch_still_running_is_read_again_after_a_rewind() {
        let (o, mut s) = setup(&[0]);
        let m = s.submit(vec![span(&o, 0, 0, 10)]);
        let n = s.submit(vec![span(&o, 0, 10, 20)]);
        let rewinds = s.abandon(n.id());
        // The rewind goes to the first offset not yet resolved in order: M's.
        assert_eq!(rewinds[0].offset, 0);
        assert!(s.resolve(m).is_empty());
    }

    #[test]
    fn gaps_between_batches_are_fine_and_a_failed_commit_is_offered_again() {
        let (o, mut s) = setup(&[0]);
        let a = s.submit(vec![span(&o, 0, 0, 5)]);
        // Offsets 5 and 6 are transaction markers (never handed over).
        let b = s.submit(vec![span(&o, 0, 7, 9)]);
        let c = s.resolve(a);
        assert_eq!(offsets(&c), vec![(0, 5)]);
        s.commit_failed(&c);
        assert_eq!(offsets(&s.resolve(b)), vec![(0, 9)]);
        let overlap = s.submit(vec![span(&o, 0, 3, 12)]);
        assert!(
            overlap.spans().is_empty(),
            "an overlapping range is refused"
        );
    }

    #[test]
    fn commits_carry_the_epoch_they_were_allowed_in() {
        let (o, mut s) = setup(&[0]);
        let a = s.submit(vec![span(&o, 0, 0, 5)]);
        let mut c = s.resolve(a);
        o.revoke([("raw", 0)]);
        o.assign([("raw", 0)]);
        let dropped = c.retain(|k, e| o.holds(k, e));
        assert_eq!((dropped, c.is_empty()), (1, true));
    }
}
