//! Consuming raw records: the consumer-group member (or a replay's assigned consumer), batches
//! bounded by count *and* bytes, staying a healthy group member while a batch waits for a
//! dependency, and committing a delivered batch's offsets.
//!
//! A batch closes when it is full (records or bytes) or when nothing more is waiting (unless a
//! linger is configured): a quiet stream is processed at once, a busy one in large batches.
//!
//! Rebalances are tracked as a *generation* (bumped on every assignment and revocation). Every
//! batch carries the generation it was polled in; a batch from an older generation is stale
//! (its partitions were revoked, and on re-assignment librdkafka fetches again from the committed
//! offset), so it is neither delivered nor committed by this instance.
//!
//! While a batch waits for a dependency the consumer pauses its partitions and keeps polling:
//! the group sees a live member (heartbeats and `max.poll.interval.ms` are served), nothing new
//! is fetched, and librdkafka resumes each partition right after the last record handed over.

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
    /// Partition assignments and revocations seen: the generation (shared with the processor's
    /// stats and its deliveries).
    pub rebalances: Arc<AtomicU64>,
    /// Assignments the group answered with (empty ones too).
    pub assigns: AtomicU64,
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
                self.assigns.fetch_add(1, Ordering::Relaxed);
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
    /// How long a batch waits to fill after its first record; zero: it closes as soon as
    /// nothing more is waiting.
    pub linger: Duration,
}

/// Records polled in one consumer generation.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<RawRecord>,
    /// The rebalance generation the records were polled in.
    pub generation: u64,
}

/// The raw-topic consumer of a processor or a replay.
pub struct RawConsumer {
    consumer: Arc<StreamConsumer<ProcessorContext>>,
    limits: BatchLimits,
    /// Records received while paused (or beyond a batch's budget), with their generation: the
    /// next batch starts here.
    stash: VecDeque<(u64, RawRecord)>,
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
        let mut c = kafka.member_config();
        for (k, v) in [
            ("client.id", "helios-processor"),
            ("auto.offset.reset", "earliest"),
            ("statistics.interval.ms", "5000"),
            ("session.timeout.ms", "15000"),
            // Bound the prefetch queue so memory stays flat whatever the backlog
            // (librdkafka's defaults allow ~1 GB of prefetched records).
            ("queued.max.messages.kbytes", "16384"),
            ("queued.min.messages", "10000"),
            // Freshness: librdkafka's 500 ms lets a record that arrives on an idle partition
            // wait for the broker's fetch timeout (Tansu answers a fetch only then). 20 ms took
            // push→PostgreSQL p50 from 400 to 39 ms at 5,000 events/s (README, Benchmarks),
            // for ~50 empty fetches a second per broker while idle.
            ("fetch.wait.max.ms", "20"),
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
            c.create_with_context(ProcessorContext {
                rebalances,
                assigns: AtomicU64::new(0),
            })?;
        Ok(RawConsumer {
            consumer: Arc::new(consumer),
            limits,
            stash: VecDeque::new(),
            paused: false,
        })
    }

    /// Joins the group on these topics. While the consumer lives, a member left without
    /// partitions joins the group again ([`crate::kafka::RejoinWatch`]; checked every second).
    pub fn subscribe(&self, topics: &[String]) -> anyhow::Result<()> {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&refs)?;
        let consumer = Arc::downgrade(&self.consumer);
        let topics = topics.to_vec();
        tokio::spawn(async move {
            let mut watch = crate::kafka::RejoinWatch::new(crate::kafka::DEFAULT_REJOIN_AFTER);
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let Some(c) = consumer.upgrade() else { return };
                let none = c.assignment().map(|a| a.count() == 0).unwrap_or(false);
                let answered = c.context().assigns.load(Ordering::Relaxed) > 0;
                if let Some(after) = watch.observe(none, answered) {
                    metrics::counter!("helios_processor_rejoins_total").increment(1);
                    let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
                    crate::kafka::rejoin_group(&c, &refs, "processor", after);
                }
            }
        });
        Ok(())
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

    /// The rebalance generation now.
    pub fn generation(&self) -> u64 {
        self.consumer.context().rebalances.load(Ordering::SeqCst)
    }

    /// A shared handle on the generation (for deliveries running apart from the consumer).
    pub fn generation_handle(&self) -> Arc<AtomicU64> {
        self.consumer.context().rebalances.clone()
    }

    /// The next record: from the stash, else polled (with the generation it arrived in).
    async fn next_record(&mut self) -> anyhow::Result<(u64, RawRecord)> {
        if let Some(r) = self.stash.pop_front() {
            return Ok(r);
        }
        let m = self.consumer.recv().await?;
        // A rebalance runs inside the poll that returned this record, so the generation read
        // now is the record's.
        Ok((self.generation(), to_raw(&m)))
    }

    /// Waits until a record is there to start a batch with (it stays in the stash). Cancel-safe:
    /// nothing is lost when the wait is abandoned.
    pub async fn wait_for_record(&mut self) -> anyhow::Result<()> {
        self.resume();
        let r = self.next_record().await?;
        self.stash.push_front(r);
        Ok(())
    }

    /// A record that is already waiting (none: the batch closes).
    fn waiting_record(&mut self) -> Option<(u64, RawRecord)> {
        if let Some(r) = self.stash.pop_front() {
            return Some(r);
        }
        use futures::FutureExt;
        match self.consumer.recv().now_or_never()? {
            Ok(m) => Some((self.generation(), to_raw(&m))),
            Err(e) => {
                tracing::warn!(error = %e, "consumer error");
                None
            }
        }
    }

    /// The next batch: up to `limits.records` records and `limits.bytes` bytes of one
    /// generation, closed when nothing more is waiting (or after `limits.linger`).
    pub async fn next_batch(&mut self) -> anyhow::Result<Batch> {
        self.resume();
        let (mut generation, first) = self.next_record().await?;
        let mut bytes = first.size();
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + self.limits.linger;
        while batch.len() < self.limits.records {
            let next = if self.limits.linger.is_zero() {
                self.waiting_record()
            } else {
                match tokio::time::timeout_at(deadline, self.next_record()).await {
                    Ok(Ok(r)) => Some(r),
                    Ok(Err(e)) => {
                        tracing::warn!(error = %e, "consumer error");
                        None
                    }
                    Err(_) => None,
                }
            };
            let Some((g, next)) = next else {
                break;
            };
            if g != generation {
                // A rebalance happened: what was collected belongs to revoked partitions (it
                // is fetched again from the committed offsets). Start over from this record.
                generation = g;
                bytes = 0;
                batch.clear();
            }
            if !batch.is_empty() && bytes + next.size() > self.limits.bytes {
                self.stash.push_front((g, next));
                break;
            }
            bytes += next.size();
            batch.push(next);
        }
        Ok(Batch {
            records: batch,
            generation,
        })
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
                    self.stash.push_back((self.generation(), to_raw(&m)));
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
