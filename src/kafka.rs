//! Kafka plumbing shared by every command: the raw-landing producer, the broker health probe,
//! and `topology apply` through the admin API. Producer settings are plain librdkafka
//! properties; HELIOS only pins the one its guarantee depends on (`acks=all`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::config::KafkaSettings;
use crate::limits::{SizeLimits, TopicKind};
use crate::model::Fault;
use crate::topology::{PlannedTopic, Topology};

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
        for (k, v) in [
            ("client.id", "helios-ingress"),
            ("linger.ms", "2"),
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
        };
        let probe = h.clone();
        tokio::spawn(async move {
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
        h
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

/// What `topology apply` did (or, for `--dry-run`, would do) to one topic.
#[derive(Debug, Clone, PartialEq)]
pub enum TopicAction {
    Created,
    WouldCreate,
    Exists { partitions: i32 },
}

/// One line of the `topology apply` report.
#[derive(Debug, Clone)]
pub struct TopicReport {
    pub topic: PlannedTopic,
    pub action: TopicAction,
    pub warning: Option<String>,
}

/// Existing topics and their partition counts.
pub fn existing_topics(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Result<BTreeMap<String, i32>, KafkaError> {
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let md = admin.inner().fetch_metadata(None, timeout)?;
    Ok(md
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| (t.name().to_string(), t.partitions().len() as i32))
        .collect())
}

/// Creates every topic of the topology that is missing. Idempotent: existing topics are left
/// alone (a partition-count difference is reported, never "fixed" silently).
pub async fn apply_topology(
    settings: &KafkaSettings,
    topology: &Topology,
    dry_run: bool,
) -> anyhow::Result<Vec<TopicReport>> {
    let timeout = Duration::from_secs(15);
    let s = settings.clone();
    let existing = tokio::task::spawn_blocking(move || existing_topics(&s, timeout))
        .await?
        .map_err(|e| {
            anyhow::anyhow!(
                "cannot read the topic list from Kafka at {}: {e}",
                settings.bootstrap_servers
            )
        })?;
    let mut reports = vec![];
    let mut to_create = vec![];
    for t in topology.planned_topics() {
        match existing.get(&t.name) {
            Some(&partitions) => {
                let warning = (partitions != t.partitions).then(|| {
                    format!(
                        "has {partitions} partitions, topology declares {}; HELIOS does not change partition counts",
                        t.partitions
                    )
                });
                reports.push(TopicReport {
                    topic: t,
                    action: TopicAction::Exists { partitions },
                    warning,
                });
            }
            None => to_create.push(t),
        }
    }
    if dry_run {
        for t in to_create {
            reports.push(TopicReport {
                topic: t,
                action: TopicAction::WouldCreate,
                warning: None,
            });
        }
        return Ok(reports);
    }
    if !to_create.is_empty() {
        let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
        let new: Vec<NewTopic<'_>> = to_create
            .iter()
            .map(|t| {
                let mut n = NewTopic::new(
                    &t.name,
                    t.partitions,
                    TopicReplication::Fixed(t.replication_factor),
                );
                for (k, v) in &t.config {
                    n = n.set(k, v);
                }
                n
            })
            .collect();
        let opts = AdminOptions::new().operation_timeout(Some(timeout));
        let results = admin.create_topics(new.iter(), &opts).await?;
        let mut failures = vec![];
        for (t, r) in to_create.into_iter().zip(results) {
            match r {
                Ok(_) => reports.push(TopicReport {
                    topic: t,
                    action: TopicAction::Created,
                    warning: None,
                }),
                // Another `apply` (or a test) created it in between: that is the goal reached.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => reports.push(TopicReport {
                    action: TopicAction::Exists {
                        partitions: t.partitions,
                    },
                    topic: t,
                    warning: None,
                }),
                Err((name, code)) => failures.push(format!("{name}: {code}")),
            }
        }
        if !failures.is_empty() {
            anyhow::bail!("could not create topics: {}", failures.join("; "));
        }
    }
    Ok(reports)
}

/// Checks that every topic of `kinds` allows the records HELIOS writes to it (see
/// [`crate::limits`]): the broker's `max.message.bytes` for topics that exist (asked with
/// DescribeConfigs), else the value topology.yaml declares for the topics `topology apply` will
/// create. A broker that cannot describe configs is reported and the declared values are used.
pub async fn check_topic_sizes(
    settings: &KafkaSettings,
    topology: &Topology,
    limits: &SizeLimits,
    kinds: &[TopicKind],
) -> anyhow::Result<()> {
    use rdkafka::admin::ResourceSpecifier;
    let planned: Vec<(PlannedTopic, TopicKind)> = topology
        .planned_topics()
        .into_iter()
        .map(|t| {
            let kind = if t.role.starts_with("raw") {
                TopicKind::Raw
            } else {
                TopicKind::Output
            };
            (t, kind)
        })
        .filter(|(_, k)| kinds.contains(k))
        .collect();
    let admin: AdminClient<DefaultClientContext> = settings.client_config().create()?;
    let specs: Vec<ResourceSpecifier<'_>> = planned
        .iter()
        .map(|(t, _)| ResourceSpecifier::Topic(&t.name))
        .collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let described = match tokio::time::timeout(
        Duration::from_secs(12),
        admin.describe_configs(&specs, &opts),
    )
    .await
    {
        Ok(Ok(r)) => Some(r),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read topic configs from the broker; checking topology.yaml's max.message.bytes only");
            None
        }
        Err(_) => {
            tracing::warn!("the broker did not answer DescribeConfigs; checking topology.yaml's max.message.bytes only");
            None
        }
    };
    let mut problems = vec![];
    for (i, (t, kind)) in planned.iter().enumerate() {
        let from_broker = described
            .as_ref()
            .and_then(|d| d.get(i))
            .and_then(|r| r.as_ref().ok())
            .and_then(|c| c.get("max.message.bytes"))
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.parse::<usize>().ok())
            .map(|v| (v, "on the broker"));
        let declared = t
            .config
            .get("max.message.bytes")
            .and_then(|v| v.parse::<usize>().ok())
            .map(|v| (v, "declared in topology.yaml"));
        if let Some((found, origin)) = from_broker.or(declared) {
            if let Err(p) = limits.check_topic(&t.name, *kind, found, origin) {
                problems.push(p);
            }
        }
    }
    if !problems.is_empty() {
        anyhow::bail!(
            "record size settings disagree:\n  - {}",
            problems.join("\n  - ")
        );
    }
    Ok(())
}

/// Warns for each raw topic whose `min.insync.replicas` is below 2: with `acks=all` a 2xx then
/// means one broker has the record, and losing that broker loses acknowledged events.
pub async fn warn_min_insync(settings: &KafkaSettings, topology: &Topology) {
    use rdkafka::admin::ResourceSpecifier;
    let Ok(admin) = settings
        .client_config()
        .create::<AdminClient<DefaultClientContext>>()
    else {
        return;
    };
    let topics: Vec<String> = crate::source::Source::ALL
        .iter()
        .map(|s| topology.raw_topic(*s))
        .collect();
    let specs: Vec<ResourceSpecifier<'_>> =
        topics.iter().map(|t| ResourceSpecifier::Topic(t)).collect();
    let opts = AdminOptions::new().request_timeout(Some(Duration::from_secs(10)));
    let Ok(Ok(described)) = tokio::time::timeout(
        Duration::from_secs(12),
        admin.describe_configs(&specs, &opts),
    )
    .await
    else {
        tracing::warn!("cannot read the raw topics' min.insync.replicas from the broker");
        return;
    };
    for (t, r) in topics.iter().zip(described) {
        let value = r
            .ok()
            .and_then(|c| c.get("min.insync.replicas").and_then(|e| e.value.clone()))
            .and_then(|v| v.parse::<i64>().ok());
        if value.is_some_and(|v| v < 2) {
            tracing::warn!(topic = %t, min_insync_replicas = value, "min.insync.replicas is below 2: an acknowledged event may live on one broker only (set it to 2 with 3 replicas)");
        }
    }
}

/// A consumer for reading topics directly (assigned partitions, a throw-away group id that is
/// never joined, no commits): `purpose` names it in the broker's logs (`helios-<purpose>-<uuid>`).
pub fn reader(
    settings: &KafkaSettings,
    purpose: &str,
) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    settings
        .client_config()
        .set(
            "group.id",
            format!("helios-{purpose}-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
}

/// Timestamp (ms) of the record at `offset`. Assigns `c` to that partition.
fn record_timestamp(
    c: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<i64>, KafkaError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if m.offset() == offset {
                return Ok(m.timestamp().to_millis());
            }
        }
    }
    Ok(None)
}

/// For each time in `at_ms`, the first offset of `topic`/`partition` (whose offsets run
/// `low..high`) at or after it, with the broker's offsets-for-times; `high` when no record is that
/// recent. Some brokers answer offset 0 for a time after the last record, so each time is checked
/// against the last record's timestamp (read once). Leaves `c` assigned to the partition: assign
/// it afterwards.
pub fn offsets_at_times(
    c: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
    at_ms: &[i64],
) -> Result<Vec<i64>, KafkaError> {
    use rdkafka::consumer::Consumer;
    if high <= low {
        return Ok(vec![high; at_ms.len()]);
    }
    let last = record_timestamp(c, topic, partition, high - 1)?.unwrap_or(i64::MAX);
    at_ms
        .iter()
        .map(|&at| {
            if at > last {
                return Ok(high);
            }
            let mut q = rdkafka::TopicPartitionList::new();
            q.add_partition_offset(topic, partition, rdkafka::Offset::Offset(at))?;
            let found = c
                .offsets_for_times(q, Duration::from_secs(15))?
                .find_partition(topic, partition)
                .map(|e| e.offset());
            Ok(match found {
                Some(rdkafka::Offset::Offset(o)) if o >= 0 => o.clamp(low, high),
                _ => high,
            })
        })
        .collect()
}

/// When a group member left without partitions should leave its group and join it again.
///
/// A stretch without partitions starts when the group has answered with an assignment (not
/// while joining); after `wait` of it the member rejoins, once for as long as the stretch
/// lasts, and the next stretch waits twice as long (up to an hour: two members in excess
/// cannot keep taking one partition from each other). On Kafka that is one more rebalance for
/// a member in excess of the partitions; on Tansu 0.6.0 it is what gets a member its
/// partitions when the broker formed the group with an empty assignment (a dead leader
/// expiring between a new member's JoinGroup and SyncGroup: README, Reconciliation, Scaling).
#[derive(Debug, Clone)]
pub struct RejoinWatch {
    since: Option<std::time::Instant>,
    rejoined: bool,
    wait: Duration,
}

/// Three session timeouts (HELIOS's consumers use 15 s): a member that died is expired by then.
pub const DEFAULT_REJOIN_AFTER: Duration = Duration::from_secs(45);

impl RejoinWatch {
    pub fn new(wait: Duration) -> Self {
        RejoinWatch {
            since: None,
            rejoined: false,
            wait,
        }
    }

    /// Takes the member's state now (`none`: it owns no partition; `answered`: the group has
    /// answered with an assignment at least once). Some(how long it has owned nothing) when it
    /// is time to rejoin.
    pub fn observe(&mut self, none: bool, answered: bool) -> Option<Duration> {
        self.observe_at(none, answered, std::time::Instant::now())
    }

    fn observe_at(
        &mut self,
        none: bool,
        answered: bool,
        now: std::time::Instant,
    ) -> Option<Duration> {
        if !none {
            self.since = None;
            self.rejoined = false;
            return None;
        }
        match self.since {
            None if answered => {
                self.since = Some(now);
                self.rejoined = false;
                None
            }
            Some(since) if !self.rejoined && now.duration_since(since) >= self.wait => {
                self.rejoined = true;
                self.wait = (self.wait * 2).min(Duration::from_secs(3600));
                Some(now.duration_since(since))
            }
            _ => None,
        }
    }
}

/// Leaves the group and joins it again on `topics` (a member [`RejoinWatch`] found without
/// partitions for `after`), saying so in a warning.
pub fn rejoin_group<C: rdkafka::consumer::ConsumerContext + 'static>(
    consumer: &rdkafka::consumer::StreamConsumer<C>,
    topics: &[&str],
    role: &str,
    after: Duration,
) {
    use rdkafka::consumer::Consumer;
    tracing::warn!(
        role,
        seconds = after.as_secs(),
        "no partition assigned to this instance: joining its consumer group again (once). \
         Either there are more instances than partitions, or the group coordinator left this \
         member out (seen on Tansu 0.6.0 after an instance was killed)"
    );
    let mut topics = topics.to_vec();
    topics.sort_unstable();
    consumer.unsubscribe();
    if let Err(e) = consumer.subscribe(&topics) {
        tracing::warn!(role, error = %e, "subscribing again failed");
    }
}

/// Kafka's API key of ConsumerGroupHeartbeat (the KIP-848 consumer group protocol).
pub const API_CONSUMER_GROUP_HEARTBEAT: i16 = 68;

/// The API keys a broker serves (ApiVersions v0, asked over a plain TCP connection to the first
/// bootstrap server that answers). `None` when it cannot be asked this way: the cluster uses TLS
/// (`security.protocol` SSL or SASL_SSL), or no bootstrap server answered within `timeout`.
/// ApiVersions is answered before any SASL handshake, so SASL_PLAINTEXT clusters can be asked.
pub fn broker_api_keys(
    settings: &KafkaSettings,
    timeout: Duration,
) -> Option<std::collections::HashSet<i16>> {
    use std::io::{Read, Write};
    let protocol = settings
        .properties
        .get("security.protocol")
        .map(|p| p.to_ascii_lowercase())
        .unwrap_or_else(|| "plaintext".into());
    if protocol != "plaintext" && protocol != "sasl_plaintext" {
        return None;
    }
    for server in settings.bootstrap_servers.split(',') {
        let server = server.trim().trim_start_matches("PLAINTEXT://");
        let Ok(addrs) = std::net::ToSocketAddrs::to_socket_addrs(server) else {
            continue;
        };
        for addr in addrs {
            let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, timeout) else {
                continue;
            };
            let _ = s.set_read_timeout(Some(timeout));
            let _ = s.set_write_timeout(Some(timeout));
            // Request header v1: api_key 18 (ApiVersions), version 0, correlation id, client id.
            let client = b"helios-probe";
            let mut req = Vec::with_capacity(32);
            req.extend_from_slice(&18i16.to_be_bytes());
            req.extend_from_slice(&0i16.to_be_bytes());
            req.extend_from_slice(&7i32.to_be_bytes());
            req.extend_from_slice(&(client.len() as i16).to_be_bytes());
            req.extend_from_slice(client);
            let mut frame = (req.len() as i32).to_be_bytes().to_vec();
            frame.extend_from_slice(&req);
            if s.write_all(&frame).is_err() {
                continue;
            }
            let mut len = [0u8; 4];
            if s.read_exact(&mut len).is_err() {
                continue;
            }
            let len = i32::from_be_bytes(len);
            if !(10..=1 << 20).contains(&len) {
                continue;
            }
            let mut body = vec![0u8; len as usize];
            if s.read_exact(&mut body).is_err() {
                continue;
            }
            // correlation id (4), error code (2), array length (4), then (key, min, max) × n.
            let error = i16::from_be_bytes([body[4], body[5]]);
            let n = i32::from_be_bytes([body[6], body[7], body[8], body[9]]);
            if error != 0 || n < 0 || body.len() < 10 + 6 * n as usize {
                continue;
            }
            return Some(
                (0..n as usize)
                    .map(|i| i16::from_be_bytes([body[10 + 6 * i], body[11 + 6 * i]]))
                    .collect(),
            );
        }
    }
    None
}

#[cfg(test)]
mod rejoin_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn a_member_rejoins_once_per_stretch_without_partitions_and_waits_longer_each_time() {
        let s = Duration::from_secs;
        let t = Instant::now();
        let mut w = RejoinWatch::new(s(45));
        // Joining (no answer yet): no stretch.
        assert_eq!(w.observe_at(true, false, t), None);
        assert_eq!(w.observe_at(true, false, t + s(100)), None);
        // Answered with nothing: the stretch starts now.
        assert_eq!(w.observe_at(true, true, t + s(100)), None);
        assert_eq!(w.observe_at(true, true, t + s(144)), None);
        assert_eq!(w.observe_at(true, true, t + s(145)), Some(s(45)));
        // Once per stretch.
        assert_eq!(w.observe_at(true, true, t + s(500)), None);
        // Partitions, then none again: a new stretch, twice as long.
        assert_eq!(w.observe_at(false, true, t + s(501)), None);
        assert_eq!(w.observe_at(true, true, t + s(502)), None);
        assert_eq!(w.observe_at(true, true, t + s(502 + 89)), None);
        assert_eq!(w.observe_at(true, true, t + s(502 + 90)), Some(s(90)));
        // Capped at an hour.
        let mut w = RejoinWatch::new(s(3000));
        w.observe_at(true, true, t);
        assert!(w.observe_at(true, true, t + s(3000)).is_some());
        w.observe_at(false, true, t + s(3001));
        w.observe_at(true, true, t + s(3002));
        assert_eq!(w.observe_at(true, true, t + s(3002 + 3599)), None);
        assert_eq!(w.observe_at(true, true, t + s(3002 + 3600)), Some(s(3600)));
    }
}
