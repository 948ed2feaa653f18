//! The hand-over between two deliveries that overlap: batch N+1 writes PostgreSQL while batch N
//! is still fanning out, and starts its own fan-out only when N's delivery has ended.
//!
//! What the hand-over keeps, whatever N ends with:
//! - **Order on the fan-out topics**: no record of N+1 is sent before every record of N is
//!   acknowledged, so a later event of a key never overtakes an earlier one across batches (the
//!   rounds of [`super::fanout::rounds`] keep it within a batch).
//! - **The dedup hand-over**: a duplicate N+1 holds aside because N owned its mark, when N
//!   dead-letters that event and releases the mark, claims it at the gate and goes through
//!   itself (before the overlap this was done by the loop between the two deliveries).
//! - **In-order commits**: N given up (shutdown, revoked, panicked) gives N+1 up too; the
//!   sequencer has already dropped N+1's ranges with N's and rewound their partitions, so both are
//!   read and delivered again. N+1's rows already written are found again by that redelivery
//!   (same lineage: not duplicates) and fanned out then, as after any batch given up between its
//!   PostgreSQL write and its fan-out.

use std::collections::HashSet;

use tokio::sync::oneshot;

use super::{Delivery, Outputs, Progress, Stop};
use crate::pipeline::dedup::{DedupKey, DedupStore};
use crate::pipeline::plan;

/// How the delivery before ended.
#[derive(Debug)]
pub enum Prior {
    /// Every record resolved; the marks it released (events a sink refused).
    Delivered { released: Vec<DedupKey> },
    /// Given up, or its task panicked (the sender dropped unsent).
    GivenUp,
}

/// Held by a delivery's task: tells the next delivery how this one ended.
#[derive(Debug)]
pub struct Ended(oneshot::Sender<Prior>);

/// Held by the next delivery: waits for the one before to end.
#[derive(Debug)]
pub struct Gate(oneshot::Receiver<Prior>);

/// A pair for one delivery: [`Ended`] for its task, [`Gate`] for whichever delivery follows it.
pub fn pair() -> (Ended, Gate) {
    let (tx, rx) = oneshot::channel();
    (Ended(tx), Gate(rx))
}

impl Ended {
    /// Sends how the delivery ended (nobody listening — no delivery followed — is fine).
    pub fn send(self, prior: Prior) {
        let _ = self.0.send(prior);
    }
}

impl Gate {
    /// Waits for the delivery before to end; a task that ended without telling (it panicked, or
    /// the runtime is going down) counts as given up.
    pub async fn wait(self) -> Prior {
        self.0.await.unwrap_or(Prior::GivenUp)
    }
}

/// Where a delivery stands with the one before it.
#[derive(Debug)]
pub(super) enum Before {
    /// None was running when it started, or its end was followed.
    None,
    /// Still running when this one started: waited for before this one's fan-out.
    Running(Gate),
    /// Delivered, having released these marks: not yet claimed for this batch's held duplicates.
    Released(HashSet<DedupKey>),
    /// Given up: so is this one, however often it is resumed.
    GivenUp,
}

impl Delivery {
    /// Waits (once) for the delivery before to end, then claims the marks it released for the
    /// duplicates this batch held aside because of them. True when some of those became events
    /// (they are stored before anything is fanned out).
    pub(super) async fn follow_prior<S, D: DedupStore>(
        &mut self,
        out: &Outputs<'_, S, D>,
    ) -> Result<bool, Stop> {
        self.prior = match std::mem::replace(&mut self.prior, Before::None) {
            Before::Running(g) => match g.wait().await {
                Prior::GivenUp => Before::GivenUp,
                Prior::Delivered { released } if released.is_empty() => Before::None,
                Prior::Delivered { released } => Before::Released(released.into_iter().collect()),
            },
            other => other,
        };
        let released = match &self.prior {
            Before::Released(keys) => keys,
            Before::GivenUp => return Err(Stop::PriorGivenUp),
            Before::None | Before::Running(_) => return Ok(false),
        };
        let before = self.plan.events.len();
        plan::reclaim(&mut self.plan, released, out.dedup).await?;
        self.prior = Before::None;
        let added = self.plan.events.len() - before;
        self.progress
            .extend(std::iter::repeat_n(Progress::default(), added));
        if added > 0 {
            tracing::info!(
                events = added,
                "the batch before dead-lettered events this one held duplicates of: those go through instead"
            );
        }
        Ok(added > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_gate_passes_what_the_delivery_before_ended_with() {
        let (ended, gate) = pair();
        let waiting = tokio::spawn(gate.wait());
        ended.send(Prior::Delivered {
            released: vec![DedupKey("aws:e-1".into())],
        });
        match waiting.await.unwrap() {
            Prior::Delivered { released } => assert_eq!(released, vec![DedupKey("aws:e-1".into())]),
            p => panic!("{p:?}"),
        }
    }

    #[tokio::test]
    async fn a_delivery_that_ended_without_telling_counts_as_given_up() {
        let (ended, gate) = pair();
        drop(ended);
        assert!(matches!(gate.wait().await, Prior::GivenUp));
    }
}
