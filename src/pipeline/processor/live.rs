//! The live loop of a group member: poll a batch, plan it, deliver it, and commit only what the
//! [`CommitSequencer`] allows.
//!
//! Pipelined: while batch N is being delivered (a task of its own), batch N+1 is polled and
//! planned, and its delivery starts at once (up to `deliveries_in_flight` at a time, 2 by
//! default): N+1 writes PostgreSQL while N fans out, and fans out only when N's delivery has
//! ended ([`gate`](super::super::deliver::gate)). Deliveries are settled in the order they were
//! spawned. Whatever N's delivery ends with, the in-order rule is the sequencer's, not this
//! loop's statement order:
//! - every record of N resolved → its ranges resolve, and the leading resolved run of each
//!   partition is committed (fenced by the epoch each offset was allowed in);
//! - N is given up (shutdown during a retry, its partitions revoked, its producer failed for
//!   good) or its task panicked → its ranges block every later commit on their partitions, and
//!   each partition still owned is sought back to N's first record in a new epoch: N+1's records
//!   of those partitions are stale and dropped before delivery (or, when N+1's delivery had
//!   started, it is given up at its gate), and N is read and delivered again. Nothing past N is
//!   committed in between, even at shutdown.
//!
//! A rebalance drops only the revoked partitions' work: under cooperative or KIP-848 rebalancing
//! the kept partitions' epochs do not change and their batches carry on.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::super::commit::{CommitSequencer, TicketId};
use super::super::config::DeliveryMode;
use super::super::consume::Batch;
use super::super::dedup::{DedupKey, DedupStore};
use super::super::deliver::gate::{self, Gate};
use super::super::deliver::Delivery;
use super::super::plan::BatchPlan;
use super::super::retry::Backoff;
use super::super::stats::record_metrics;
use super::{deliver_task, Outcome, Processor};
use crate::db::EventStore;
use crate::shutdown::Shutdown;

/// A delivery running apart from the consumer.
struct InFlight {
    handle: tokio::task::JoinHandle<Outcome>,
    ticket: Option<TicketId>,
    started: Instant,
    /// How this delivery ends, for the one spawned after it (taken by that one).
    next: Option<Gate>,
    /// The batch's record bytes (the byte budget counts every delivery in flight).
    bytes: usize,
}

/// The record bytes of the deliveries in flight.
fn in_flight_bytes(in_flight: &VecDeque<InFlight>) -> usize {
    in_flight.iter().map(|f| f.bytes).sum()
}

impl<D: DedupStore, S: EventStore> Processor<D, S> {
    /// Runs until shutdown: the batch being delivered is finished (or given up) first, and only
    /// what the sequencer allows is committed.
    pub async fn run(mut self, shutdown: Shutdown) -> anyhow::Result<()> {
        self.init_transactions().await?;
        self.refresh_topics(true).await;
        self.report_missing_topics();
        let ownership = self.consumer.ownership();
        let mut seq = CommitSequencer::new(ownership.clone());
        // Oldest first; settled in this order.
        let mut in_flight: VecDeque<InFlight> = VecDeque::new();
        let depth = match self.cfg.mode {
            DeliveryMode::AtLeastOnce => self.cfg.deliveries_in_flight.max(1),
            // One transaction at a time per producer.
            DeliveryMode::Transactional { .. } => 1,
        };
        let mut after_abandon = Backoff::default();
        'batches: loop {
            if let Some(f) = self.consumer.fatal() {
                return Err(anyhow::anyhow!("{f}. {}", fatal_hint(&f.0)));
            }
            // Deliveries in flight holding more than half the byte budget end first: the next
            // batch is polled (and planned, its bodies parsed) only into what is left, so large
            // records are held no more at once than without the overlap. What they release needs
            // no reclaim: the next batch is planned after it.
            while in_flight_bytes(&in_flight) > self.cfg.batch.bytes / 2 {
                let f = in_flight.pop_front().expect("in flight");
                self.finish(&mut seq, f, &shutdown, &mut after_abandon)
                    .await;
            }
            // Until records are waiting, a delivery in flight is settled as soon as it is done
            // (a quiet stream must not leave its last batch uncommitted).
            // Not "waiting for work" for liveness: a delivery is in flight, and it makes progress
            // (settles, or attempts again) or is stuck.
            while let Some(f) = in_flight.front_mut() {
                tokio::select! {
                    r = &mut f.handle => {
                        let f = in_flight.pop_front().expect("in flight");
                        self.settle(&mut seq, f, r, &shutdown, &mut after_abandon).await;
                    }
                    w = self.consumer.wait_for_record() => {
                        if let Err(e) = w {
                            if let Some(f) = self.consumer.fatal() {
                                return Err(anyhow::anyhow!("{f}. {}", fatal_hint(&f.0)));
                            }
                            tracing::warn!(error = %e, "consumer error; polling again");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            continue;
                        }
                        break;
                    }
                    _ = shutdown.clone().wait() => break 'batches,
                }
            }
            let room = self
                .cfg
                .batch
                .bytes
                .saturating_sub(in_flight_bytes(&in_flight));
            let batch = {
                let _waiting = crate::liveness::waiting();
                tokio::select! {
                    b = self.consumer.next_batch(room) => b,
                    _ = shutdown.clone().wait() => break,
                }
            };
            let mut batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    if let Some(f) = self.consumer.fatal() {
                        return Err(anyhow::anyhow!("{f}. {}", fatal_hint(&f.0)));
                    }
                    // Broker hiccups surface here; librdkafka reconnects by itself.
                    tracing::warn!(error = %e, "consumer error; polling again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    continue;
                }
            };
            if batch.records.is_empty() {
                continue;
            }
            let started = Instant::now();
            if !in_flight.is_empty() {
                self.stats.overlapped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("helios_processor_batches_overlapped_total").increment(1);
            }
            let plan = self.plan(&batch.records, &shutdown).await;
            // At most `depth` deliveries at once, and together within one batch's byte budget
            // (`HELIOS_BATCH_MAX_BYTES`): else the oldest ends (and is settled) first (a batch's
            // first record is taken whatever its size, so it may not fit in the room left).
            let bytes: usize = batch.records.iter().map(|r| r.size()).sum();
            let mut released = vec![];
            while !in_flight.is_empty()
                && (in_flight.len() >= depth
                    || in_flight_bytes(&in_flight) + bytes > self.cfg.batch.bytes)
            {
                let f = in_flight.pop_front().expect("in flight");
                released.extend(
                    self.finish(&mut seq, f, &shutdown, &mut after_abandon)
                        .await,
                );
            }
            let Some(mut plan) = plan else {
                break;
            };
            if shutdown.is_triggered() {
                break;
            }
            if batch.retain_fresh(&ownership) {
                // Some partitions were revoked or rewound since the batch was polled: their
                // records are read again (by their new owner, or from the rewind); the rest
                // goes on, planned again without them.
                tracing::info!(records = batch.records.len(), "partitions of a planned batch were revoked or rewound: only the others' records go on");
                if batch.records.is_empty() {
                    continue;
                }
                let Some(p) = self.plan(&batch.records, &shutdown).await else {
                    break;
                };
                plan = p;
            }
            let Some(plan) = self.reclaim(plan, &released, &shutdown).await else {
                break;
            };
            // Overlapping the newest delivery still running: its fan-out waits for that one.
            let after = in_flight.back_mut().and_then(|f| f.next.take());
            let f = self.spawn_delivery(&mut seq, (batch, bytes), plan, after, started, &shutdown);
            in_flight.push_back(f);
        }
        while let Some(f) = in_flight.pop_front() {
            self.finish(&mut seq, f, &shutdown, &mut after_abandon)
                .await;
        }
        if seq.unresolved() > 0 {
            tracing::warn!(
                batches = seq.unresolved(),
                "stopping with batches unresolved: nothing at or after them was committed (they are read again at the next start)"
            );
        }
        tracing::info!("processor stopping");
        Ok(())
    }

    /// Spawns a batch's delivery; `bytes` (its records' bytes as polled) counts against the
    /// byte budget while it is in flight.
    fn spawn_delivery(
        &self,
        seq: &mut CommitSequencer,
        (batch, bytes): (Batch, usize),
        plan: BatchPlan,
        after: Option<Gate>,
        started: Instant,
        shutdown: &Shutdown,
    ) -> InFlight {
        let mut delivery = Delivery::new(Some(seq.submit(batch.spans)), batch.records, plan);
        if let Some(g) = after {
            delivery = delivery.after(g);
        }
        let ticket = delivery.ticket_id();
        let group = self.consumer.group_metadata().map(Arc::new);
        let (ended, next) = gate::pair();
        let handle = tokio::spawn(deliver_task(
            self.sinks.clone(),
            delivery,
            group,
            Some(self.consumer.ownership()),
            shutdown.clone(),
            Some(ended),
        ));
        InFlight {
            handle,
            ticket,
            started,
            next: Some(next),
            bytes,
        }
    }

    /// Waits for a delivery (keeping the group membership alive while it is slow) and settles
    /// it; returns the marks it released.
    async fn finish(
        &mut self,
        seq: &mut CommitSequencer,
        mut f: InFlight,
        shutdown: &Shutdown,
        after_abandon: &mut Backoff,
    ) -> Vec<DedupKey> {
        let result = loop {
            tokio::select! {
                r = &mut f.handle => break r,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {
                    // A slow or retrying delivery: partitions paused, polling on.
                    self.consumer.idle(Duration::from_millis(500)).await;
                }
            }
        };
        self.settle(seq, f, result, shutdown, after_abandon).await
    }

    /// Settles a finished delivery task: a delivered batch resolves its ranges and what the
    /// sequencer then allows is committed; a batch given up (or whose task panicked) is
    /// abandoned, and its partitions are read again from its first record.
    async fn settle(
        &mut self,
        seq: &mut CommitSequencer,
        f: InFlight,
        result: Result<Outcome, tokio::task::JoinError>,
        shutdown: &Shutdown,
        after_abandon: &mut Backoff,
    ) -> Vec<DedupKey> {
        crate::liveness::progress();
        let (why, renew) = match result {
            Ok(Outcome::Delivered(mut d)) => {
                let commit = d.resolve(seq);
                if let Err(c) = self.consumer.commit(commit).await {
                    seq.commit_failed(&c);
                }
                record_metrics(&d.records, &d.plan, d.rows_inserted);
                self.stats.add(&d.records, &d.plan);
                let ms = f.started.elapsed();
                tracing::debug!(
                    records = d.records.len(),
                    ms = ms.as_millis() as u64,
                    "batch done"
                );
                metrics::histogram!("helios_processor_batch_duration_seconds")
                    .record(ms.as_secs_f64());
                metrics::histogram!("helios_processor_batch_records")
                    .record(d.records.len() as f64);
                *after_abandon = Backoff::default();
                return d.released;
            }
            Ok(Outcome::Abandoned { why, renew, .. }) => (why, renew),
            Err(e) => (format!("its delivery task failed: {e}"), false),
        };
        metrics::counter!("helios_processor_abandoned_batches_total").increment(1);
        let rewinds = f.ticket.map(|t| seq.abandon(t)).unwrap_or_default();
        if shutdown.is_triggered() {
            tracing::warn!(why = %why, "a batch was given up at shutdown: it and everything after it on its partitions stay uncommitted");
            return vec![];
        }
        tracing::warn!(why = %why, partitions = rewinds.len(), "a batch was given up: its partitions are read again from its first record");
        if renew && !self.sinks.renew_producer(shutdown).await {
            return vec![];
        }
        self.consumer.rewind(&rewinds).await;
        // A batch that keeps failing this way (a panic on its data) is not retried in a hot loop.
        let pause = after_abandon.next_wait();
        tokio::select! {
            _ = self.consumer.idle(pause) => {}
            _ = shutdown.clone().wait() => {}
        }
        vec![]
    }
}

/// What to do about a fatal consumer error.
fn fatal_hint(error: &str) -> &'static str {
    if error.contains("ConsumerGroupHeartbeat")
        || error.contains("UnsupportedFeature")
        || error.contains("Unsupported")
    {
        "The broker does not serve the KIP-848 consumer group protocol (KAFKA_GROUP_PROTOCOL=consumer needs Kafka 4.0 or later): remove KAFKA_GROUP_PROTOCOL, or set it to `classic`"
    } else {
        "The processor stops; its partitions go to the other members of the group"
    }
}
