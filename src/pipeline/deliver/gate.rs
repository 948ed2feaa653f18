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

use tokio::sync::oneshot;

use crate::pipeline::dedup::DedupKey;

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
