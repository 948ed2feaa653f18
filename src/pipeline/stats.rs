//! What a processor did, twice: Prometheus metrics for operators, and running totals of the
//! instance for tests, the demo and the benchmark. Both are tallied once per batch, after its
//! delivery (a sink may still move an event to the DLQ). The invariant:
//! `units_in = events_out + duplicates + dlq`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::plan::BatchPlan;
use crate::model::RawRecord;

/// Running totals of one processor instance (the metrics' per-instance twin).
#[derive(Debug, Default)]
pub struct ProcessorStats {
    pub raw_records: AtomicU64,
    pub units_in: AtomicU64,
    pub events_out: AtomicU64,
    pub duplicates: AtomicU64,
    /// Units dead-lettered (an array's failing events count one each).
    pub dlq: AtomicU64,
    /// DLQ records written (at most one per raw record).
    pub dlq_records: AtomicU64,
    pub handshakes: AtomicU64,
    pub batches: AtomicU64,
    pub filtered: AtomicU64,
    /// Batches or plans retried because a dependency failed.
    pub retries: AtomicU64,
    /// Partition assignments and revocations this instance went through.
    pub rebalances: Arc<AtomicU64>,
    /// Batches polled and planned while the one before was still being delivered.
    pub overlapped: AtomicU64,
    /// Events out by type, DLQ by reason (for reports).
    pub by_type: std::sync::Mutex<BTreeMap<String, u64>>,
    pub dlq_by_reason: std::sync::Mutex<BTreeMap<String, u64>>,
}

impl ProcessorStats {
    /// Adds a delivered (or dry-run) batch.
    pub fn add(&self, batch: &[RawRecord], plan: &BatchPlan) {
        let relaxed = Ordering::Relaxed;
        self.raw_records.fetch_add(batch.len() as u64, relaxed);
        self.units_in.fetch_add(plan.units_in.len() as u64, relaxed);
        self.events_out.fetch_add(plan.events.len() as u64, relaxed);
        self.duplicates
            .fetch_add(plan.duplicates.len() as u64, relaxed);
        self.dlq.fetch_add(plan.dlq.len() as u64, relaxed);
        self.dlq_records.fetch_add(dlq_records(plan), relaxed);
        self.handshakes
            .fetch_add(plan.handshakes.len() as u64, relaxed);
        self.batches.fetch_add(1, relaxed);
        self.filtered.fetch_add(plan.filtered, relaxed);
        let mut t = self.by_type.lock().unwrap_or_else(|p| p.into_inner());
        for (k, n) in tally(plan.events.iter().map(|e| e.event.event_type.as_str())) {
            *t.entry(k.to_string()).or_default() += n;
        }
        let mut d = self.dlq_by_reason.lock().unwrap_or_else(|p| p.into_inner());
        for (k, n) in tally(plan.dlq.iter().map(|x| x.refusal.reason.as_str())) {
            *d.entry(k.to_string()).or_default() += n;
        }
    }

    /// (raw records, units in, events out, duplicates, dlq)
    pub fn snapshot(&self) -> (u64, u64, u64, u64, u64) {
        (
            self.raw_records.load(Ordering::Relaxed),
            self.units_in.load(Ordering::Relaxed),
            self.events_out.load(Ordering::Relaxed),
            self.duplicates.load(Ordering::Relaxed),
            self.dlq.load(Ordering::Relaxed),
        )
    }
}

fn dlq_records(plan: &BatchPlan) -> u64 {
    let mut records: Vec<usize> = plan.dlq.iter().map(|d| d.record).collect();
    records.sort_unstable();
    records.dedup();
    records.len() as u64
}

/// Counts with the same labels added up first: one registry lookup per label set and batch,
/// not per event.
fn tally<K: Ord>(items: impl IntoIterator<Item = K>) -> BTreeMap<K, u64> {
    let mut m = BTreeMap::new();
    for k in items {
        *m.entry(k).or_default() += 1;
    }
    m
}

/// Exports a delivered batch to Prometheus.
pub fn record_metrics(batch: &[RawRecord], plan: &BatchPlan, rows_inserted: u64) {
    for (t, n) in tally(batch.iter().map(|r| r.topic.as_str())) {
        metrics::counter!("helios_processor_raw_records_total", "topic" => t.to_string())
            .increment(n);
    }
    for (s, n) in tally(plan.units_in.iter()) {
        metrics::counter!("helios_processor_events_in_total", "source" => s.as_str()).increment(n);
    }
    for ((t, s), n) in tally(
        plan.events
            .iter()
            .map(|e| (e.event.event_type.as_str(), e.event.source)),
    ) {
        metrics::counter!("helios_processor_events_out_total", "event_type" => t.to_string(), "source" => s.as_str())
            .increment(n);
    }
    for (s, n) in tally(plan.duplicates.iter()) {
        metrics::counter!("helios_processor_duplicates_total", "source" => s.as_str()).increment(n);
    }
    for ((r, st), n) in tally(plan.dlq.iter().map(|d| (d.refusal.reason, d.refusal.stage))) {
        metrics::counter!("helios_processor_dlq_total", "reason" => r.as_str(), "stage" => st.as_str())
            .increment(n);
    }
    let records = dlq_records(plan);
    if records > 0 {
        metrics::counter!("helios_processor_dlq_records_total").increment(records);
    }
    for (s, n) in tally(plan.handshakes.iter()) {
        metrics::counter!("helios_processor_handshakes_total", "source" => s.as_str()).increment(n);
    }
    metrics::counter!("helios_processor_rows_inserted_total").increment(rows_inserted);
    if plan.store_duplicates > 0 {
        metrics::counter!("helios_processor_store_duplicates_total")
            .increment(plan.store_duplicates);
    }
}
