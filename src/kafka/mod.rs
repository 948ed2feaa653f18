//! Kafka plumbing shared by every command: the raw-landing producer, the broker health probe,
//! and (in submodules, re-exported here) `topology apply` and the topic checks, direct
//! readers, and consumer-group helpers. Producer settings are plain librdkafka
//! properties; HELIOS only pins the one its guarantee depends on (`acks=all`).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaSettings;
use crate::limits::SizeLimits;
use crate::model::Fault;

/// Why a record could not be landed.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// Kafka did not acknowledge in time (broker down, slow, or partition leaderless).
    #[error("Kafka did not acknowledge the record within {0:?}")]
    Timeout(Duration),
    /// The local producer queue is full: too much is waiting for the broker.
    #[error("the Kafka producer queue is full")]
    QueueFull,
    /// The record can never be accepted (too large for the broker, unknown topic, ...).
    #[error("Kafka refused the record: {0}")]
    Refused(KafkaError),
    /// Any other delivery failure (retriable from the cloud's point of view).
    #[error("Kafka delivery failed: {0}")]
    Failed(KafkaError),
}

/// Producer for raw records: waits for acks=all before reporting success.
#[derive(Clone)]
pub struct RawProducer {
    producer: FutureProducer,
    timeout: Duration,
}

impl RawProducer {
    /// Creates the producer; `timeout` bounds how long one record may wait for its ack.
    pub fn new(
        settings: &KafkaSettings,
        timeout: Duration,
        limits: &SizeLimits,
    ) -> Result<Self, KafkaError> {
        let mut cfg = settings.client_config();
        // Defaults a user may override. Idempotence stays off by default (librdkafka's own
        // default): a retried raw record is a duplicate the processor's dedup absorbs, and
        // Tansu 0.6.0 panics on an idempotent producer that outlives a broker restart.
        // Set KAFKA_ENABLE_IDEMPOTENCE=true on a real Kafka cluster if you want it.
        // linger.ms 1: each request waits for its record's ack, so the linger is latency every
        // request pays, and at 16–64 connections the rate is bound by it, not by CPU (the
        // machine 45–60 % busy). Measured (`scripts/bench.sh ingress`, README "Ingress"): 1 ms
        // gave +43–52 % req/s over 2 ms at the same CPU per request; 0 ms sends a produce
        // request per record (the broker's CPU per request ×12) and is slower.
        for (k, v) in [
            ("client.id", "helios-ingress"),
            ("linger.ms", "1"),
            ("compression.type", "lz4"),
            ("enable.idempotence", "false"),
        ] {
            if !crate::config::property_set(&settings.properties, k) {
                cfg.set(k, v);
            }
        }
        // What "ack means durable" depends on, which they may not override, under any alias.
        crate::config::pin(&mut cfg, "acks", "all");
        crate::config::pin(
            &mut cfg,
            "message.timeout.ms",
            &timeout.as_millis().to_string(),
        );
        // Room for the body plus headers (see crate::limits); a larger record gets 413.
        crate::config::pin(
            &mut cfg,
            "message.max.bytes",
            &limits.raw_record_max().to_string(),
        );
        let producer: FutureProducer = cfg.create()?;
        Ok(RawProducer { producer, timeout })
    }

    /// Produces one record and waits for the broker's acknowledgement (or the timeout).
    pub async fn send(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
    ) -> Result<(i32, i64), ProduceError> {
        let mut record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(payload).headers(headers);
        if let Some(k) = key {
            record = record.key(k);
        }
        // Queue timeout zero: a full local queue answers at once (503) instead of piling up.
        let delivery = match self.producer.send_result(record) {
            Ok(d) => d,
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                return Err(ProduceError::QueueFull)
            }
            Err((e, _)) => return Err(classify(e)),
        };
        // message.timeout.ms makes librdkafka give up at the same deadline; the outer timeout
        // is a backstop so a request never outlives it by much.
        match tokio::time::timeout(self.timeout + Duration::from_millis(250), delivery).await {
            Err(_) => Err(ProduceError::Timeout(self.timeout)),
            Ok(Err(_canceled)) => Err(ProduceError::Timeout(self.timeout)),
            Ok(Ok(Ok(delivered))) => Ok((delivered.partition, delivered.offset)),
            Ok(Ok(Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)))) => {
                Err(ProduceError::Timeout(self.timeout))
            }
            Ok(Ok(Err((e, _)))) => Err(classify(e)),
        }
    }

    /// Waits for everything in flight to be acknowledged (graceful shutdown).
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.producer.flush(timeout)
    }

    /// The underlying client, for metadata probes.
    pub fn producer(&self) -> &FutureProducer {
        &self.producer
    }
}

fn classify(e: KafkaError) -> ProduceError {
    use RDKafkaErrorCode::*;
    match e.rdkafka_error_code() {
        Some(MessageSizeTooLarge) | Some(InvalidMessageSize) | Some(MessageBatchTooLarge) => {
            ProduceError::Refused(e)
        }
        _ => ProduceError::Failed(e),
    }
}

/// What a produce error means for a retry (see [`crate::model::fault`]): a record too large or
/// invalid for the broker is the data's fault; timeouts, a broker, leader, topic or the network
/// unavailable, a full local queue, too few replicas, authorization (an operator's fix) are
/// transient; any other code is unclassified (retried a few times, then isolated).
pub fn produce_fault(e: &KafkaError) -> Fault {
    use RDKafkaErrorCode::*;
    match e.rdkafka_error_code() {
        Some(
            code @ (MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge | InvalidRecord
            | InvalidMessage | InvalidTimestamp | BadMessage | InvalidRequiredAcks),
        ) => Fault::Data {
            code: format!("{code:?}"),
        },
        Some(
            MessageTimedOut
            | QueueFull
            | BrokerTransportFailure
            | AllBrokersDown
            | Resolve
            | TimedOutQueue
            | UnknownPartition
            | UnknownTopic
            | UnknownTopicOrPartition
            | LeaderNotAvailable
            | NotLeaderForPartition
            | RequestTimedOut
            | BrokerNotAvailable
            | ReplicaNotAvailable
            | NetworkException
            | NotEnoughReplicas
            | NotEnoughReplicasAfterAppend
            | NotController
            | TopicAuthorizationFailed
            | ClusterAuthorizationFailed
            | KafkaStorageError
            | OutOfOrderSequenceNumber
            | UnknownProducerId
            | InvalidProducerEpoch
            | ProducerFenced
            | Fenced
            | BrokerDestroy
            | PurgeQueue
            | PurgeInflight
            | FencedLeaderEpoch
            | UnknownLeaderEpoch
            | OffsetNotAvailable
            | ThrottlingQuotaExceeded
            | OperationTimedOut
            | WaitCache
            | State
            | Fatal
            | Retry
            | SSL
            | Authentication
            | SaslAuthenticationFailed
            | CoordinatorLoadInProgress
            | CoordinatorNotAvailable
            | NotCoordinator
            | ConcurrentTransactions
            | InvalidTransactionalState
            | TransactionalIdAuthorizationFailed
            | ReassignmentInProgress
            | PreferredLeaderNotAvailable
            | RebootstrapRequired
            | DestroyBroker
            | NodeUpdate
            | ISRInsufficient
            | CriticalSystemResource,
        ) => Fault::Transient,
        Some(code) => Fault::Unclassified {
            code: format!("{code:?}"),
        },
        // Not a broker or client error code (e.g. the delivery future was dropped): transient.
        None => match e {
            KafkaError::Canceled => Fault::Transient,
            other => Fault::Unclassified {
                code: format!("{other:?}").chars().take(64).collect(),
            },
        },
    }
}

/// Whether the broker answered recently, kept fresh by a background probe.
#[derive(Clone)]
pub struct KafkaHealth {
    reachable: Arc<AtomicBool>,
    /// Probes failed in a row (Kafka is "known down" from two on: one slow answer while a
    /// broker restarts must not turn every request away).
    failures: Arc<std::sync::atomic::AtomicU32>,
    last_ok_unix_ms: Arc<AtomicI64>,
    last_error: Arc<std::sync::Mutex<Option<String>>>,
    /// The probe task: awaited at shutdown, so its clone of the producer is gone when the
    /// ingress says it stopped.
    probe: Arc<std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>>,
}

impl KafkaHealth {
    /// Starts probing the cluster behind `producer` every `every`; stops at `shutdown` (or with
    /// the runtime), letting the producer go.
    pub fn start(
        producer: FutureProducer,
        every: Duration,
        shutdown: crate::shutdown::Shutdown,
    ) -> KafkaHealth {
        let h = KafkaHealth {
            reachable: Arc::new(AtomicBool::new(false)),
            failures: Arc::new(std::sync::atomic::AtomicU32::new(0)),
            last_ok_unix_ms: Arc::new(AtomicI64::new(0)),
            last_error: Arc::new(std::sync::Mutex::new(Some("not probed yet".into()))),
            probe: Arc::default(),
        };
        let probe = h.clone();
        let task = tokio::spawn(async move {
            loop {
                let p = producer.clone();
                let timeout = every.max(Duration::from_secs(2));
                let res = tokio::task::spawn_blocking(move || {
                    p.client()
                        .fetch_metadata(None, timeout)
                        .map(|m| m.brokers().len())
                })
                .await;
                match res {
                    Ok(Ok(n)) if n > 0 => probe.set_ok(),
                    Ok(Ok(_)) => probe.set_err("metadata lists no brokers".into()),
                    Ok(Err(e)) => probe.set_err(e.to_string()),
                    Err(e) => probe.set_err(e.to_string()),
                }
                metrics::gauge!("helios_kafka_reachable").set(if probe.is_reachable() {
                    1.0
                } else {
                    0.0
                });
                tokio::select! {
                    _ = tokio::time::sleep(every) => {}
                    _ = shutdown.clone().wait() => return,
                }
            }
        });
        *h.probe.lock().unwrap_or_else(|p| p.into_inner()) = Some(task);
        h
    }

    /// Waits for the probe to end (it ends at shutdown, after its current metadata request):
    /// then it holds no client any more.
    pub async fn stopped(&self) {
        let task = self.probe.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(t) = task {
            let _ = t.await;
        }
    }

    /// A record was acknowledged: Kafka is reachable, whatever the last probes said (a probe
    /// can time out while a restarted broker is still slow to list its metadata).
    pub fn acknowledged(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 || !self.reachable.load(Ordering::Relaxed) {
            self.set_ok();
        }
    }

    fn set_ok(&self) {
        self.failures.store(0, Ordering::SeqCst);
        if !self.reachable.swap(true, Ordering::SeqCst) {
            tracing::info!("Kafka is reachable");
        }
        self.last_ok_unix_ms
            .store(chrono::Utc::now().timestamp_millis(), Ordering::SeqCst);
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn set_err(&self, e: String) {
        let failures = self.failures.fetch_add(1, Ordering::SeqCst) + 1;
        if failures >= 2 && self.reachable.swap(false, Ordering::SeqCst) {
            tracing::warn!(error = %e, "Kafka became unreachable");
        }
        *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e);
    }

    /// True unless the last two metadata probes failed (and until the first one succeeded).
    pub fn is_reachable(&self) -> bool {
        self.reachable.load(Ordering::SeqCst)
    }

    /// True when the last two probes failed: Kafka is known to be down.
    pub fn known_down(&self) -> bool {
        self.failures.load(Ordering::SeqCst) >= 2
    }

    /// JSON detail for the health endpoints.
    pub fn detail(&self) -> serde_json::Value {
        let last_ok = self.last_ok_unix_ms.load(Ordering::SeqCst);
        serde_json::json!({
            "reachable": self.is_reachable(),
            "last_ok": (last_ok > 0).then(|| chrono::DateTime::from_timestamp_millis(last_ok).map(|t| t.to_rfc3339())),
            "error": self.last_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        })
    }
}

mod group;
pub mod progress;
mod read;
mod topics;

/// The partition librdkafka's default partitioner (`consistent_random`, the one HELIOS's
/// producers use) gives a keyed record: CRC-32 (IEEE, as zlib's) of the key modulo the
/// partition count.
pub fn key_partition(key: &[u8], partitions: i32) -> i32 {
    let mut crc: u32 = 0xffff_ffff;
    for &b in key {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    ((crc ^ 0xffff_ffff) % partitions.max(1) as u32) as i32
}

pub use group::*;
pub use read::*;
pub use topics::*;

#[cfg(test)]
mod partitioner_tests {
    #[test]
    fn crc32_as_librdkafka_computes_it() {
        // The CRC-32 check value.
        assert_eq!(
            super::key_partition(b"123456789", i32::MAX),
            (0xcbf4_3926u32 % i32::MAX as u32) as i32
        );
        assert!((0..4).contains(&super::key_partition(b"O-1001", 4)));
    }
}
