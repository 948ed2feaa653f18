//! Writing to Kafka for a delivery: the fan-out/DLQ producer, records in flight tagged with what
//! each stands for and settled into acknowledged / refused for their data / unclassified /
//! transient, and the steps of a Kafka transaction with librdkafka's error classes.

use std::time::Duration;

use futures::future::join_all;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::TopicPartitionList;

use crate::config::{pin, property_set, KafkaSettings};
use crate::kafka::produce_fault;
use crate::limits::SizeLimits;
use crate::model::{Fault, Sink};
use crate::pipeline::config::DeliveryMode;
use crate::pipeline::Unavailable;

/// Creates the fan-out/DLQ producer for `mode`. Pinned (no pass-through property or alias
/// overrides them): `acks=all`, on which "ack means durable" rests; idempotence, or without it
/// one request in flight, on which per-key order rests; the largest record (the output limit);
/// in exactly-once mode the transactional id.
pub fn output_producer(
    kafka: &KafkaSettings,
    mode: &DeliveryMode,
    limits: &SizeLimits,
) -> Result<FutureProducer, KafkaError> {
    let mut cfg = kafka.client_config();
    for (k, v) in [
        ("client.id", "helios-processor"),
        ("linger.ms", "5"),
        ("compression.type", "lz4"),
        ("message.timeout.ms", "30000"),
    ] {
        if !property_set(&kafka.properties, k) {
            cfg.set(k, v);
        }
    }
    if let DeliveryMode::Transactional { transactional_id } = mode {
        pin(&mut cfg, "transactional.id", transactional_id);
        let txn_timeout = transaction_timeout(kafka).as_millis() as u64;
        cfg.set("transaction.timeout.ms", txn_timeout.to_string());
        // librdkafka requires message.timeout.ms <= transaction.timeout.ms.
        if !property_set(&kafka.properties, "message.timeout.ms") {
            cfg.set("message.timeout.ms", txn_timeout.min(30_000).to_string());
        }
    }
    // Per-key order rests on two things: the fan-out's rounds (one record per key in flight at
    // a time, so a failure that surfaces leaves every later record of the key unsent) and a
    // producer whose own retries keep each partition's order. That is idempotence (the
    // default); a user who turns it off (`KAFKA_ENABLE_IDEMPOTENCE=false`, for a broker that
    // mishandles it, e.g. Tansu 0.6.0 across a restart) gets one request in flight per
    // connection instead, which keeps the order too, at some throughput.
    let idempotence_off =
        idempotence_disabled(kafka) && !matches!(mode, DeliveryMode::Transactional { .. });
    if idempotence_off {
        pin(&mut cfg, "enable.idempotence", "false");
        pin(&mut cfg, "max.in.flight.requests.per.connection", "1");
    } else {
        pin(&mut cfg, "enable.idempotence", "true");
    }
    // Every DLQ copy of a raw record fits; fan-out records are checked against the same limit
    // before they are sent (see crate::limits).
    pin(
        &mut cfg,
        "message.max.bytes",
        &limits.output_record_max().to_string(),
    );
    pin(&mut cfg, "acks", "all");
    cfg.create()
}

/// True when the user turned the fan-out producer's idempotence off.
fn idempotence_disabled(kafka: &KafkaSettings) -> bool {
    kafka
        .properties
        .get("enable.idempotence")
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

/// `transaction.timeout.ms` (default 60 s): how long the broker lets a transaction stay open.
pub fn transaction_timeout(kafka: &KafkaSettings) -> Duration {
    Duration::from_millis(
        kafka
            .properties
            .get("transaction.timeout.ms")
            .and_then(|v| v.parse().ok())
            .unwrap_or(60_000),
    )
}

/// How long one `commit_transaction` call waits before it is called again: half the
/// transaction timeout, at most 30 s.
pub fn commit_timeout(kafka: &KafkaSettings) -> Duration {
    (transaction_timeout(kafka) / 2).min(Duration::from_secs(30))
}

/// Records in flight to Kafka, each tagged with what it stands for.
#[derive(Default)]
pub struct Sends {
    pending: Vec<(usize, DeliveryFuture)>,
    failed: Vec<(usize, KafkaError)>,
}

/// What came back from a set of sends.
#[derive(Debug, Default)]
pub struct Settled {
    /// Tags acknowledged.
    pub acked: Vec<usize>,
    /// Tags refused for their data, with the error and its code.
    pub refused: Vec<(usize, KafkaError, String)>,
    /// Tags that failed with a code nobody classified, with the error and the code.
    pub unclassified: Vec<(usize, KafkaError, String)>,
    /// The first transient failure, if any.
    pub transient: Option<Unavailable>,
}

impl Sends {
    /// Enqueues `rec` for `tag` (a failure to enqueue is settled with the rest).
    pub async fn send(
        &mut self,
        producer: &FutureProducer,
        tag: usize,
        rec: FutureRecord<'_, [u8], [u8]>,
    ) {
        if let Err(e) = enqueue(producer, rec, tag, &mut self.pending).await {
            self.failed.push((tag, e));
        }
    }

    /// Waits for every record and sorts the results.
    pub async fn settle(self) -> Settled {
        let mut failed = self.failed;
        let mut out = Settled::default();
        let results = join_all(
            self.pending
                .into_iter()
                .map(|(i, f)| async move { (i, f.await) }),
        )
        .await;
        for (i, r) in results {
            match r {
                Ok(Ok(_)) => out.acked.push(i),
                Ok(Err((e, _))) => failed.push((i, e)),
                Err(_) => failed.push((i, KafkaError::Canceled)),
            }
        }
        for (i, e) in failed {
            match produce_fault(&e) {
                Fault::Data { code } => out.refused.push((i, e, code)),
                Fault::Unclassified { code } => out.unclassified.push((i, e, code)),
                Fault::Transient => {
                    out.transient
                        .get_or_insert(Unavailable::new(Sink::Kafka, e.to_string()));
                }
            }
        }
        out
    }
}

/// Enqueues a record; when librdkafka's queue is full, waits for what is in flight first.
async fn enqueue(
    producer: &FutureProducer,
    rec: FutureRecord<'_, [u8], [u8]>,
    tag: usize,
    pending: &mut Vec<(usize, DeliveryFuture)>,
) -> Result<(), KafkaError> {
    let mut rec = rec;
    for _ in 0..50 {
        match producer.send_result(rec) {
            Ok(f) => {
                pending.push((tag, f));
                return Ok(());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                producer.poll(Duration::from_millis(100));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
    Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull))
}

/// A transactional call failed; what librdkafka allows next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TxnError {
    /// The same call may be made again (e.g. a commit that timed out goes on in the background).
    #[error("retriable: {0}")]
    Retriable(String),
    /// The transaction failed: abort it and redo the batch.
    #[error("the transaction must be aborted: {0}")]
    Abortable(String),
    /// The producer is unusable (fenced, its epoch expired, not authorized): create a new one and
    /// resume from the committed offsets.
    #[error("fatal: {0}")]
    Fatal(String),
}

impl TxnError {
    /// librdkafka's class of `e` (an error that is neither retriable, abortable nor fatal is
    /// treated as fatal, as librdkafka's INTRODUCTION.md recommends).
    pub fn of(e: &KafkaError) -> TxnError {
        let msg = e.to_string();
        match e {
            KafkaError::Transaction(t) if t.is_retriable() => TxnError::Retriable(msg),
            KafkaError::Transaction(t) if t.txn_requires_abort() => TxnError::Abortable(msg),
            _ => TxnError::Fatal(msg),
        }
    }

    /// As the delivery's retry error.
    pub fn unavailable(&self) -> Unavailable {
        Unavailable::new(Sink::Kafka, format!("transaction: {self}"))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, KafkaError> + Send + 'static,
) -> Result<T, TxnError> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| TxnError::of(&e)),
        Err(e) => Err(TxnError::Fatal(format!("transaction call panicked: {e}"))),
    }
}

/// Starts a transaction.
pub async fn begin(p: &FutureProducer) -> Result<(), TxnError> {
    let p = p.clone();
    blocking(move || p.begin_transaction()).await
}

/// Adds the consumed offsets to the transaction (retriable errors are retried here).
pub async fn send_offsets(
    p: &FutureProducer,
    offsets: &TopicPartitionList,
    group: &std::sync::Arc<ConsumerGroupMetadata>,
) -> Result<(), TxnError> {
    let mut tries = 0;
    loop {
        let (p2, o, g) = (p.clone(), offsets.clone(), group.clone());
        match blocking(move || p2.send_offsets_to_transaction(&o, &g, Duration::from_secs(30)))
            .await
        {
            Err(TxnError::Retriable(e)) if tries < 5 => {
                tries += 1;
                tracing::warn!(error = %e, "send_offsets_to_transaction failed; trying again");
                tokio::time::sleep(Duration::from_millis(200 << tries)).await;
            }
            other => return other,
        }
    }
}

/// Commits the transaction. A retriable failure (a timeout: the commit goes on in the
/// background) is answered by committing again, never by an abort, which librdkafka refuses
/// then; `give_up` ends the retries (shutdown), leaving the outcome to the broker (committed in
/// the background, or aborted when the successor fences this transactional id).
pub async fn commit(
    p: &FutureProducer,
    timeout: Duration,
    give_up: &crate::shutdown::Shutdown,
) -> Result<(), TxnError> {
    let mut wait = Duration::from_millis(100);
    loop {
        let p2 = p.clone();
        match blocking(move || p2.commit_transaction(timeout)).await {
            Err(TxnError::Retriable(e)) => {
                metrics::counter!("helios_processor_transaction_retries_total", "step" => "commit")
                    .increment(1);
                tracing::warn!(error = %e, "commit_transaction did not finish; committing again");
                if give_up.is_triggered() {
                    return Err(TxnError::Retriable(e));
                }
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(Duration::from_secs(5));
            }
            other => return other,
        }
    }
}

/// Aborts the transaction; `Err` when librdkafka refuses (the caller recreates the producer).
pub async fn abort(p: &FutureProducer) -> Result<(), TxnError> {
    let p = p.clone();
    let r = blocking(move || p.abort_transaction(Duration::from_secs(30))).await;
    if let Err(e) = &r {
        tracing::warn!(error = %e, "abort_transaction failed");
    }
    r
}

/// Creates a transactional producer and fences any predecessor with the same id (aborting its
/// open transaction).
pub async fn transactional_producer(
    kafka: &KafkaSettings,
    mode: &DeliveryMode,
    limits: &SizeLimits,
) -> anyhow::Result<FutureProducer> {
    let p = output_producer(kafka, mode, limits)?;
    let p2 = p.clone();
    tokio::task::spawn_blocking(move || p2.init_transactions(Duration::from_secs(30)))
        .await?
        .map_err(|e| anyhow::anyhow!("exactly-once: init_transactions failed: {e}"))?;
    Ok(p)
}
