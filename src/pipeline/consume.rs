//! Consuming raw records: the consumer-group member (or a replay's assigned consumer), batches
//! bounded by count *and* bytes, staying a healthy group member while a batch waits for a
//! dependency, rewinding partitions whose batch was abandoned, and committing what the commit
//! sequencer allows.
//!
//! A batch closes when it is full (records or bytes) or when nothing more is waiting (unless a
//! linger is configured): a quiet stream is processed at once, a busy one in large batches.
//!
//! Ownership is tracked per partition ([`Ownership`]): the rebalance callback gives each
//! partition assigned a new epoch and forgets each one revoked, whether the group rebalances
//! eagerly (everything revoked, then assigned), cooperatively or with the KIP-848 protocol (only
//! the partitions that move). Every record is stamped with its partition's epoch when it is
//! polled; a batch keeps only records whose epoch still holds when it closes, and describes
//! itself as one [`Span`] per partition for the sequencer. [`RawConsumer::commit`] is the fence:
//! it commits only offsets whose epoch still holds.
//!
//! While a batch waits for a dependency the consumer pauses its partitions and keeps polling:
//! the group sees a live member (heartbeats and `max.poll.interval.ms` are served), nothing new
//! is fetched, and librdkafka resumes each partition right after the last record handed over.

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{
    CommitMode, Consumer, ConsumerContext, ConsumerGroupMetadata, Rebalance, StreamConsumer,
};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, Statistics, TopicPartitionList};

use super::commit::{Commit, Epoch, Ownership, PartitionKey, Rewind, Span};
pub use super::config::BatchLimits;
use crate::config::KafkaSettings;
use crate::model::RawRecord;

/// Consumer context: keeps [`Ownership`] per partition, logs and counts rebalances, exports
/// consumer lag from librdkafka's statistics.
pub struct ProcessorContext {
    /// The partitions owned now, with their epochs.
    pub ownership: Arc<Ownership>,
    /// Partition assignments and revocations seen (shared with the processor's stats).
    pub rebalances: Arc<AtomicU64>,
    /// Assignments the group answered with (empty ones too).
    pub assigns: AtomicU64,
    /// Lag and stalled partitions for `/metrics`.
    pub progress: crate::kafka::progress::PartitionProgress,
}

fn parts(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_string(), e.partition()))
        .collect()
}

fn refs(parts: &[(String, i32)]) -> impl Iterator<Item = (&str, i32)> {
    parts.iter().map(|(t, p)| (t.as_str(), *p))
}

impl ClientContext for ProcessorContext {
    fn stats(&self, stats: Statistics) {
        // helios_processor_consumer_lag, helios_processor_partition_stalled
        self.progress.observe(&stats);
    }
}

impl ConsumerContext for ProcessorContext {
    fn pre_rebalance(&self, c: &rdkafka::consumer::BaseConsumer<Self>, r: &Rebalance<'_>) {
        match r {
            Rebalance::Revoke(tpl) => {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
                // Eager rebalancing revokes the whole assignment, cooperative and KIP-848 only
                // what moves: either way exactly these partitions' work becomes stale.
                self.ownership.revoke(refs(&parts(tpl)));
                tracing::info!(
                    partitions = tpl.count(),
                    lost = c.assignment_lost(),
                    "partitions revoked"
                );
            }
            Rebalance::Assign(tpl) => {
                self.rebalances.fetch_add(1, Ordering::Relaxed);
                self.assigns.fetch_add(1, Ordering::Relaxed);
                self.ownership.assign(refs(&parts(tpl)));
                let protocol = match c.rebalance_protocol() {
                    rdkafka::consumer::RebalanceProtocol::Cooperative => "cooperative",
                    rdkafka::consumer::RebalanceProtocol::Eager => "eager",
                    _ => "none",
                };
                tracing::info!(partitions = tpl.count(), protocol, "partitions assigned")
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// Records polled for one batch, with the range they cover on each partition.
#[derive(Debug)]
pub struct Batch {
    pub records: Vec<RawRecord>,
    /// Per partition: the epoch the records were polled in and the offsets they cover.
    pub spans: Vec<Span>,
}

impl Batch {
    /// The batch of `records` (each with the epoch it was polled in) whose epoch still holds.
    fn of(stamped: Vec<(Epoch, RawRecord)>, ownership: &Ownership) -> Batch {
        let mut spans: BTreeMap<(String, i32), Span> = BTreeMap::new();
        let mut records = Vec::with_capacity(stamped.len());
        for (epoch, r) in stamped {
            if ownership.epoch(&r.topic, r.partition) != Some(epoch) {
                continue;
            }
            let s = spans
                .entry((r.topic.clone(), r.partition))
                .or_insert_with(|| Span {
                    key: PartitionKey::new(r.topic.clone(), r.partition),
                    epoch,
                    first: r.offset,
                    next: r.offset + 1,
                });
            s.first = s.first.min(r.offset);
            s.next = s.next.max(r.offset + 1);
            records.push(r);
        }
        Batch {
            records,
            spans: spans.into_values().collect(),
        }
    }

    /// Drops the records of partitions whose epoch no longer holds (revoked or rewound since the
    /// batch was polled). True when something was dropped.
    pub fn retain_fresh(&mut self, ownership: &Ownership) -> bool {
        let stale: HashSet<(String, i32)> = self
            .spans
            .iter()
            .filter(|s| !ownership.holds(&s.key, s.epoch))
            .map(|s| (s.key.topic.clone(), s.key.partition))
            .collect();
        if stale.is_empty() {
            return false;
        }
        self.spans
            .retain(|s| !stale.contains(&(s.key.topic.clone(), s.key.partition)));
        self.records
            .retain(|r| !stale.contains(&(r.topic.clone(), r.partition)));
        true
    }
}

/// The consumer reached a state it cannot leave by itself (librdkafka raised a fatal error,
/// e.g. a group protocol the broker does not support).
#[derive(Debug, thiserror::Error)]
#[error("the Kafka consumer stopped for good: {0}")]
pub struct ConsumerFatal(pub String);

/// The raw-topic consumer of a processor or a replay.
pub struct RawConsumer {
    consumer: Arc<StreamConsumer<ProcessorContext>>,
    limits: BatchLimits,
    /// Records received while paused (or beyond a batch's budget), with their epoch: the next
    /// batch starts here.
    stash: VecDeque<(Epoch, RawRecord)>,
    paused: bool,
    /// The topics subscribed to (for a rejoin after a failed rewind).
    topics: Vec<String>,
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
        // KIP-848 has no session timeout on the client (the broker sets it) and refuses one.
        if kafka
            .properties
            .get("group.protocol")
            .is_some_and(|p| p.eq_ignore_ascii_case("consumer"))
            && !kafka.properties.contains_key("session.timeout.ms")
        {
            c.remove("session.timeout.ms");
        }
        c.set("group.id", group);
        c.set("enable.auto.commit", "false");
        c.set("enable.auto.offset.store", "false");
        if read_committed {
            c.set("isolation.level", "read_committed");
        }
        let consumer: StreamConsumer<ProcessorContext> =
            c.create_with_context(ProcessorContext {
                ownership: Arc::new(Ownership::default()),
                rebalances,
                assigns: AtomicU64::new(0),
                progress: crate::kafka::progress::PartitionProgress::new("helios_processor"),
            })?;
        Ok(RawConsumer {
            consumer: Arc::new(consumer),
            limits,
            stash: VecDeque::new(),
            paused: false,
            topics: vec![],
        })
    }

    /// The partitions owned now (shared with the commit sequencer).
    pub fn ownership(&self) -> Arc<Ownership> {
        self.consumer.context().ownership.clone()
    }

    /// Joins the group on these topics. While the consumer lives, a member left without
    /// partitions joins the group again ([`crate::kafka::RejoinWatch`]; checked every second).
    pub fn subscribe(&mut self, topics: &[String]) -> anyhow::Result<()> {
        let refs: Vec<&str> = topics.iter().map(String::as_str).collect();
        self.consumer.subscribe(&refs)?;
        self.topics = topics.to_vec();
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
                    crate::kafka::rejoin_group(&c, &refs, "processor", after, watch.next_wait());
                }
            }
        });
        Ok(())
    }

    /// Reads exactly these partitions from these offsets (replays; no group membership).
    pub fn assign(&self, tpl: &TopicPartitionList) -> anyhow::Result<()> {
        self.consumer.assign(tpl)?;
        self.ownership().assign(refs(&parts(tpl)));
        Ok(())
    }

    /// Stops reading one partition (a replay reached the end of its range).
    pub fn unassign(&self, topic: &str, partition: i32) {
        let mut t = TopicPartitionList::new();
        t.add_partition(topic, partition);
        let _ = self.consumer.incremental_unassign(&t);
        self.ownership().revoke([(topic, partition)]);
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

    /// Partition assignments and revocations so far.
    pub fn rebalances(&self) -> u64 {
        self.consumer.context().rebalances.load(Ordering::SeqCst)
    }

    /// A fatal error librdkafka raised, if any (the consumer cannot go on).
    pub fn fatal(&self) -> Option<ConsumerFatal> {
        self.consumer
            .client()
            .fatal_error()
            .map(|(code, why)| ConsumerFatal(format!("{code:?}: {why}")))
    }

    fn stamp(&self, m: &BorrowedMessage<'_>) -> Option<(Epoch, RawRecord)> {
        // A rebalance runs inside the poll that returned this record, so the epoch read now is
        // the record's. None: the partition is not owned (a record that slipped through a
        // revocation): it is not ours to process.
        let epoch = self
            .consumer
            .context()
            .ownership
            .epoch(m.topic(), m.partition())?;
        Some((epoch, to_raw(m)))
    }

    /// The next record: from the stash, else polled (with the epoch it arrived in).
    async fn next_record(&mut self) -> anyhow::Result<(Epoch, RawRecord)> {
        if let Some(r) = self.stash.pop_front() {
            return Ok(r);
        }
        loop {
            let m = match self.consumer.recv().await {
                Ok(m) => m,
                Err(e) => {
                    if let Some(f) = self.fatal() {
                        return Err(f.into());
                    }
                    return Err(e.into());
                }
            };
            if let Some(r) = self.stamp(&m) {
                return Ok(r);
            }
        }
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
    fn waiting_record(&mut self) -> Option<(Epoch, RawRecord)> {
        if let Some(r) = self.stash.pop_front() {
            return Some(r);
        }
        use futures::FutureExt;
        loop {
            match self.consumer.recv().now_or_never()? {
                Ok(m) => {
                    if let Some(r) = self.stamp(&m) {
                        return Some(r);
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consumer error");
                    return None;
                }
            }
        }
    }

    /// The next batch: up to `limits.records` records and `limits.bytes` bytes (fewer when `room`
    /// is less; the first record is taken whatever its size), closed when nothing more is
    /// waiting (or after `limits.linger`); only records whose partition is still owned in the
    /// epoch they were polled in. May be empty (everything polled went stale).
    pub async fn next_batch(&mut self, room: usize) -> anyhow::Result<Batch> {
        let max_bytes = self.limits.bytes.min(room);
        self.resume();
        let first = self.next_record().await?;
        let mut bytes = first.1.size();
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
            let Some(next) = next else {
                break;
            };
            if bytes + next.1.size() > max_bytes {
                self.stash.push_front(next);
                break;
            }
            bytes += next.1.size();
            batch.push(next);
        }
        Ok(Batch::of(batch, &self.consumer.context().ownership))
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
                    if let Some(r) = self.stamp(&m) {
                        self.stash.push_back(r);
                    }
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

    /// Reads partitions again from where an abandoned batch began (the sequencer gave them new
    /// epochs: what was polled from them before is stale and dropped). A partition whose seek
    /// fails is given up instead: this instance leaves the group and joins it again, so it is
    /// read from the committed offset (by this instance or another), never skipped.
    pub async fn rewind(&mut self, rewinds: &[Rewind]) {
        if rewinds.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for r in rewinds {
            let _ =
                tpl.add_partition_offset(&r.key.topic, r.key.partition, Offset::Offset(r.offset));
            tracing::warn!(partition = %r.key, offset = r.offset, "a batch was abandoned: its partition is read again from its first record");
        }
        metrics::counter!("helios_processor_rewinds_total").increment(rewinds.len() as u64);
        let stale: HashSet<(String, i32)> = rewinds
            .iter()
            .map(|r| (r.key.topic.clone(), r.key.partition))
            .collect();
        self.stash
            .retain(|(_, r)| !stale.contains(&(r.topic.clone(), r.partition)));
        let c = self.consumer.clone();
        let result =
            tokio::task::spawn_blocking(move || c.seek_partitions(tpl, Duration::from_secs(10)))
                .await;
        let failed: Vec<(String, i32, String)> = match result {
            Ok(Ok(done)) => done
                .elements()
                .iter()
                .filter_map(|e| {
                    e.error()
                        .err()
                        .map(|err| (e.topic().to_string(), e.partition(), err.to_string()))
                })
                .collect(),
            Ok(Err(e)) => rewinds
                .iter()
                .map(|r| (r.key.topic.clone(), r.key.partition, e.to_string()))
                .collect(),
            Err(e) => rewinds
                .iter()
                .map(|r| (r.key.topic.clone(), r.key.partition, e.to_string()))
                .collect(),
        };
        if !failed.is_empty() {
            for (t, p, e) in &failed {
                tracing::error!(topic = %t, partition = p, error = %e, "seeking back failed: leaving the group to be read again from the committed offset");
            }
            let ownership = self.ownership();
            ownership.revoke(failed.iter().map(|(t, p, _)| (t.as_str(), *p)));
            let refs: Vec<&str> = self.topics.iter().map(String::as_str).collect();
            if !refs.is_empty() {
                self.consumer.unsubscribe();
                ownership.revoke_all();
                if let Err(e) = self.consumer.subscribe(&refs) {
                    tracing::error!(error = %e, "subscribing again failed");
                }
            }
        }
    }

    /// Commits what the sequencer allowed, fenced: only partitions still owned in the epoch each
    /// offset was allowed in. `Err` gives the commit back (its offsets are offered again).
    pub async fn commit(&self, mut commit: Commit) -> Result<(), Commit> {
        let ownership = self.ownership();
        let stale = commit.retain(|k, e| ownership.holds(k, e));
        if stale > 0 {
            tracing::info!(
                partitions = stale,
                "partitions were revoked or rewound since their records resolved: not committed"
            );
        }
        if commit.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for (k, _, o) in commit.offsets() {
            let _ = tpl.add_partition_offset(&k.topic, k.partition, Offset::Offset(o));
        }
        let c = self.consumer.clone();
        match tokio::task::spawn_blocking(move || c.commit(&tpl, CommitMode::Sync)).await {
            Ok(Ok(())) => {
                for (k, _, o) in commit.offsets() {
                    metrics::gauge!("helios_processor_committed_offset", "topic" => k.topic.clone(), "partition" => k.partition.to_string())
                        .set(o as f64);
                }
                Ok(())
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "offset commit failed; offered again with the next batch");
                Err(commit)
            }
            Err(e) => {
                tracing::warn!(error = %e, "offset commit task failed");
                Err(commit)
            }
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
