//! Consuming raw records: the consumer-group member (or a replay's assigned consumer), batches
//! bounded by count *and* bytes, staying a healthy group member while a batch waits for a
//! dependency, and committing a delivered batch's offsets.
//!
//! While a batch is being retried the consumer pauses its partitions and keeps polling: the
//! group sees a live member (heartbeats and `max.poll.interval.ms` are served), nothing new is
//! fetched, and librdkafka resumes each partition right after the last record handed over.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{
    CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Statistics, TopicPartitionList};

use super::deliver::Delivered;
use crate::config::KafkaSettings;
use crate::model::RawRecord;

/// Consumer context: logs and counts rebalances, exports consumer lag from librdkafka's
/// statistics.
pub struct ProcessorContext {
    /// Partition assignments and revocations seen (shared with the processor's stats).
    pub rebalances: Arc<AtomicU64>,
}

impl ClientContext for ProcessorContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (p, part) in &t.partitions {
                if *p < 0 || part.consumer_lag < 0 {
                    continue;
                }
                metrics::gauge!("helios_processor_consumer_lag", "topic" => topic.clone(), "partition" => p.to_string())
                    .set(part.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, _: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Revoke(tpl) => {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
                tracing::info!(partitions = tpl.count(), "partitions revoked");
            }
            Rebalance::Assign(tpl) => {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
                tracing::info!(partitions = tpl.count(), "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// How batches are cut.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimits {
    /// Most records per batch.
    pub records: usize,
    /// Most bytes (values, keys, headers) per batch; a single larger record is a batch alone.
    pub bytes: usize,
    /// How long a batch waits to fill after its first record.
    pub linger: Duration,
}

/// The raw-topic consumer of a processor or a replay.
pub struct RawConsumer {
    consumer: Arc<StreamConsumer<ProcessorContext>>,
    limits: BatchLimits,
    /// Records received while paused (or beyond a batch's budget): the next batch starts here.
    stash: VecDeque<RawRecord>,
    paused: bool,
}

impl RawConsumer {
    /// A consumer in `group` with HELIOS's defaults (a user's `KAFKA_*` properties win).
    pub fn new(
        kafka: &KafkaSettings,
        group: &str,
        read_committed: bool,
        limits: BatchLimits,
        rebalances: Arc<AtomicU64>,
    ) -> anyhow::Result<Self> {
        let mut c = kafka.client_config();
        for (k, v) in [
            ("client.id", "helios-processor"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("session.timeout.ms", "15000"),
            // Bound the prefetch queue so memory stays flat whatever the backlog
            // (librdkafka's defaults allow ~1 GB of prefetched records).
            ("queued.max.messages.kbytes", "16384"),
            ("queued.min.messages", "10000"),
        ] {
            if !kafka.properties.contains_key(k) {
                c.set(k, v);
            }
        }
        c.set("group.id", group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        if read_committed {
            c.set("isolation.level", "read_committed");
        }
        let consumer: StreamConsumer<ProcessorContext> =
            c.create_with_context(ProcessorContext { rebalances })?;
        Ok(RawConsumer {
            consumer: Arc::new(consumer),
            limits,
            stash: VecDeque::new(),
            paused: false,
        })
    }

    /// Joins the group on these topics.
    pub fn subscribe(&self, topics: &[String]) -> anyhow::Result<()> {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        Ok(self.consumer.subscribe(&refs)?)
    }

    /// Reads exactly these partitions from these offsets (replays; no group membership).
    pub fn assign(&self, tpl: &TopicPartitionList) -> anyhow::Result<()> {
        Ok(self.consumer.assign(tpl)?)
    }

    /// Stops reading one partition (a replay reached the end of its range).
    pub fn unassign(&self, topic: &str, partition: i32) {
        let mut t = TopicPartitionList::new();
        t.add_partition(topic, partition);
        let _ = self.consumer.incremental_unassign(&t);
    }

    /// The group's metadata (for the offsets of a Kafka transaction).
    pub fn group_metadata(&self) -> Option<ConsumerGroupMetadata> {
        self.consumer.group_metadata()
    }

    /// The broker's topic names (a metadata request; `None` when the broker does not answer).
    pub async fn topics(&self) -> Option<HashSet<String>> {
        let c = self.consumer.clone();
        tokio::task::spawn_blocking(move || {
            c.fetch_metadata(None, Duration::from_secs(5)).map(|m| {
                m.topics()
                    .iter()
                    .map(|t| t.name().to_string())
                    .collect::<HashSet<_>>()
            })
        })
        .await
        .ok()?
        .ok()
    }

    /// The next batch: up to `limits.records` records and `limits.bytes` bytes, waiting at most
    /// `limits.linger` after the first one.
    pub async fn next_batch(&mut self) -> anyhow::Result<Vec<RawRecord>> {
        self.resume();
        let mut batch = vec![];
        let mut bytes = 0;
        let first = match self.stash.pop_front() {
            Some(r) => r,
            None => to_raw(&self.consumer.recv().await?),
        };
        bytes += first.size();
        batch.push(first);
        let deadline = tokio::time::Instant::now() + self.limits.linger;
        while batch.len() < self.limits.records {
            let next = match self.stash.pop_front() {
                Some(r) => r,
                None => match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                    Ok(Ok(m)) => to_raw(&m),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        break;
                    }
                    Err(_) => break,
                },
            };
            if bytes + next.size() > self.limits.bytes {
                self.stash.push_front(next);
                break;
            }
            bytes += next.size();
            batch.push(next);
        }
        Ok(batch)
    }

    /// Waits `d` while a batch is paused: partitions paused, polling on, so rebalances and
    /// group liveness are served; a record that still arrives (a partition assigned meanwhile)
    /// is kept for the next batch and its partition paused too.
    pub async fn idle(&mut self, d: Duration) {
        if !self.paused {
            if let Ok(a) = self.consumer.assignment() {
                let _ = self.consumer.pause(&a);
            }
            self.paused = true;
        }
        let deadline = tokio::time::Instant::now() + d;
        loop {
            match tokio::time::timeout_at(deadline, self.consumer.recv()).await {
                Err(_) => return,
                Ok(Ok(m)) => {
                    let mut t = TopicPartitionList::new();
                    t.add_partition(m.topic(), m.partition());
                    let _ = self.consumer.pause(&t);
                    self.stash.push_back(to_raw(&m));
                }
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "consumer error while paused");
                    tokio::time::sleep_until(
                        deadline.min(tokio::time::Instant::now() + Duration::from_millis(200)),
                    )
                    .await;
                }
            }
        }
    }

    /// Resumes the partitions paused by [`RawConsumer::idle`].
    pub fn resume(&mut self) {
        if self.paused {
            if let Ok(a) = self.consumer.assignment() {
                let _ = self.consumer.resume(&a);
            }
            self.paused = false;
        }
    }

    /// Commits the offsets of a delivered batch. A failure (after a rebalance took the
    /// partitions) only means the new owner processes those records again: duplicates on the
    /// fan-out topics at worst, never a loss, and PostgreSQL stays exactly once.
    pub async fn commit(&self, delivered: &Delivered) {
        let tpl = delivered.offsets().clone();
        let c = self.consumer.clone();
        match tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "offset commit failed; the records will be processed again")
            }
            Err(e) => tracing::warn!(error = %e, "offset commit task failed"),
        }
    }
}

fn to_raw(m: &BorrowedMessage<'_>) -> RawRecord {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    RawRecord {
        topic: m.topic().to_string(),
        partition: m.partition(),
        offset: m.offset(),
        timestamp_ms: m.timestamp().to_millis(),
        key: m.key().map(<[u8]>::to_vec),
        value: m.payload().unwrap_or_default().to_vec(),
        headers,
    }
}
