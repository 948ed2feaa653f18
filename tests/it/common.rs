//! Test helpers: start the real ingress on an ephemeral port with its own topic prefix (so tests
//! run in parallel without sharing state), and read records back with a plain Kafka consumer.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use helios::config::{IngressConfig, KafkaSettings};
use helios::ingress::RunningIngress;
use helios::shutdown::{Shutdown, ShutdownTrigger};
use helios::source::Source;
use helios::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// The broker the test script started.
pub fn kafka_bootstrap() -> String {
    std::env::var("HELIOS_TEST_KAFKA").expect(
        "HELIOS_TEST_KAFKA is not set: run the tests with scripts/test.sh, which starts the Tansu broker",
    )
}

/// A topology with a unique prefix and one partition per topic (fast on Tansu's sqlite engine).
pub fn test_topology() -> Topology {
    let mut t = Topology::builtin();
    t.topic_prefix = format!("t{}.", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    for spec in [
        &mut t.raw_topics.aws,
        &mut t.raw_topics.gcp,
        &mut t.raw_topics.azure,
        &mut t.raw_topics.direct,
        &mut t.dlq,
    ] {
        spec.partitions = 1;
    }
    t.event_topics.partitions = 1;
    t
}

/// A running ingress for one test.
pub struct TestApp {
    pub addr: std::net::SocketAddr,
    pub topology: Topology,
    pub kafka: KafkaSettings,
    pub client: reqwest::Client,
    stop: Option<ShutdownTrigger>,
    running: Option<RunningIngress>,
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn raw_topic(&self, s: Source) -> String {
        self.topology.raw_topic(s)
    }

    /// Stops the server gracefully (drain + flush) and waits for it.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            s.trigger();
        }
        if let Some(r) = self.running.take() {
            r.wait().await.expect("ingress stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.trigger();
        }
    }
}

/// Applies a fresh topology and starts the ingress with `configure` applied to its config.
pub async fn spawn_app(configure: impl FnOnce(&mut IngressConfig)) -> TestApp {
    spawn_app_on(KafkaSettings::new(kafka_bootstrap()), configure).await
}

/// Same as [`spawn_app`] against a specific broker.
pub async fn spawn_app_on(
    kafka: KafkaSettings,
    configure: impl FnOnce(&mut IngressConfig),
) -> TestApp {
    helios::telemetry::init();
    let topology = test_topology();
    helios::kafka::apply_topology(&kafka, &topology, false)
        .await
        .expect("topology apply");
    let mut cfg = IngressConfig::new(kafka.clone(), topology.clone());
    configure(&mut cfg);
    let (stop, shutdown) = Shutdown::new();
    let running = helios::ingress::start(cfg, shutdown)
        .await
        .expect("ingress start");
    let app = TestApp {
        addr: running.addr,
        topology,
        kafka,
        client: reqwest::Client::new(),
        stop: Some(stop),
        running: Some(running),
    };
    // Ready = Kafka reachable.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = app.client.get(app.url("/api/v1/health")).send().await;
        if r.is_ok_and(|r| r.status() == 200) {
            break;
        }
        assert!(Instant::now() < deadline, "ingress never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app
}

/// A record read back from Kafka.
#[allow(dead_code)] // partition/offset/key are for the processor tests
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: BTreeMap<String, Vec<u8>>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .and_then(|v| std::str::from_utf8(v).ok())
    }
}

/// Reads up to `n` records of `topic` from the beginning, waiting at most `timeout`.
pub async fn read_records(
    bootstrap: &str,
    topic: &str,
    n: usize,
    timeout: Duration,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            .create()
            .expect("consumer");
        let md = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for t in md.topics() {
            for p in t.partitions() {
                tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)
                    .expect("partition");
            }
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + timeout;
        let mut out = vec![];
        while out.len() < n && Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let mut headers = BTreeMap::new();
                if let Some(h) = m.headers() {
                    for hd in h.iter() {
                        headers.insert(hd.key.to_string(), hd.value.unwrap_or_default().to_vec());
                    }
                }
                out.push(Record {
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(|k| k.to_vec()),
                    value: m.payload().unwrap_or_default().to_vec(),
                    headers,
                });
            }
        }
        out
    })
    .await
    .expect("reader task")
}

/// Reads exactly the records present (expects `n`, and checks none more arrive).
pub async fn read_exactly(bootstrap: &str, topic: &str, n: usize) -> Vec<Record> {
    let recs = read_records(
        bootstrap,
        topic,
        n + 1,
        Duration::from_secs(if n == 0 { 3 } else { 8 }),
    )
    .await;
    assert_eq!(
        recs.len(),
        n,
        "expected {n} record(s) in {topic}, found {}",
        recs.len()
    );
    recs
}

/// Asserts the contract headers of a raw record.
pub fn assert_raw_headers(r: &Record, source: &str, endpoint: &str, kind: &str) {
    assert_eq!(r.header("helios-source"), Some(source));
    assert_eq!(r.header("helios-endpoint"), Some(endpoint));
    assert_eq!(r.header("helios-kind"), Some(kind));
    let received = r.header("helios-received-at").expect("helios-received-at");
    chrono::DateTime::parse_from_rfc3339(received).expect("received-at is RFC 3339");
    assert!(!r.header("helios-request-id").unwrap_or("").is_empty());
    assert!(
        !r.headers.contains_key("authorization"),
        "authorization must never be landed"
    );
}
