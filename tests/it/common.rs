//! Test helpers: start the real ingress on an ephemeral port with its own topic prefix (so tests
//! run in parallel without sharing state), and read records back with a plain Kafka consumer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use helios::config::KafkaSettings;
use helios::ingress::IngressConfig;
use helios::ingress::RunningIngress;
use helios::shutdown::{Shutdown, ShutdownTrigger};
use helios::source::Source;
use helios::topology::Topology;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio::net::{TcpListener, TcpStream};

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
    t.consumer_group = format!("{}helios-processor", t.topic_prefix);
    t.reconciler_group = format!("{}helios-reconciler", t.topic_prefix);
    t
}

/// A fresh test topology, adjusted by `configure`, with its topics created on the test broker.
pub async fn applied_topology(configure: impl FnOnce(&mut Topology)) -> Topology {
    let mut t = test_topology();
    configure(&mut t);
    helios::kafka::apply_topology(&KafkaSettings::new(kafka_bootstrap()), &t, false)
        .await
        .expect("topology apply");
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

/// Logs of the in-process ingress and processors go to the test's captured output (shown
/// only when a test fails), at `RUST_LOG` (default `warn`), as text.
pub fn init_logs() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// Same as [`spawn_app`] against a specific broker.
pub async fn spawn_app_on(
    kafka: KafkaSettings,
    configure: impl FnOnce(&mut IngressConfig),
) -> TestApp {
    init_logs();
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
    /// The producer's create time, ms since the epoch.
    pub timestamp: Option<i64>,
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
    read_until(bootstrap, topic, timeout, move |r| r.len() >= n).await
}

/// Reads `topic` from the beginning until `done(records so far)` or `timeout`.
pub async fn read_until(
    bootstrap: &str,
    topic: &str,
    timeout: Duration,
    done: impl Fn(&[Record]) -> bool + Send + 'static,
) -> Vec<Record> {
    let bootstrap = bootstrap.to_string();
    let topic = topic.to_string();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("group.id", format!("reader-{}", uuid::Uuid::new_v4()))
            .set("enable.auto.commit", "false")
            // Transactional fan-out (exactly-once mode) must be read as a consumer would.
            .set("isolation.level", "read_committed")
            .create()
            .expect("consumer");
        let deadline = Instant::now() + timeout;
        // A busy broker may answer a metadata request without the topic's partitions (an error
        // on the topic): ask again rather than read nothing.
        let mut tpl = TopicPartitionList::new();
        loop {
            // A broker busy with the rest of the suite may not answer in time: ask again.
            let md = match consumer.fetch_metadata(Some(&topic), Duration::from_secs(10)) {
                Ok(md) => md,
                Err(e) if Instant::now() < deadline + Duration::from_secs(30) => {
                    eprintln!("read_records({topic}): metadata: {e}; asking again");
                    continue;
                }
                Err(e) => panic!("read_records({topic}): metadata: {e}"),
            };
            for t in md.topics() {
                if let Some(e) = t.error() {
                    eprintln!("read_records({topic}): metadata error {e:?}");
                }
                for p in t.partitions() {
                    tpl.add_partition_offset(&topic, p.id(), Offset::Beginning)
                        .expect("partition");
                }
            }
            if tpl.count() > 0 || Instant::now() > deadline + Duration::from_secs(30) {
                break;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = vec![];
        let mut errors = 0;
        while !done(&out) && Instant::now() < deadline {
            let polled = consumer.poll(Duration::from_millis(200));
            if let Some(Err(e)) = &polled {
                errors += 1;
                if errors <= 3 {
                    eprintln!("read_records({topic}): {e}");
                }
            }
            if let Some(Ok(m)) = polled {
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
                    timestamp: m.timestamp().to_millis(),
                });
            }
        }
        if out.is_empty() {
            // Nothing read: say whether the topic holds records (a reader problem) or not.
            for e in tpl.elements() {
                let w = consumer.fetch_watermarks(&topic, e.partition(), Duration::from_secs(5));
                if !matches!(w, Ok((low, high)) if low == high) {
                    eprintln!(
                        "read_records({topic}): read nothing; partition {} watermarks {w:?}",
                        e.partition()
                    );
                }
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

/// The PostgreSQL server the test script provides.
pub fn database_url() -> String {
    std::env::var("HELIOS_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

/// The Redis server the test script provides.
pub fn redis_url() -> String {
    std::env::var("HELIOS_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A fresh schema name for one test.
pub fn unique_schema() -> String {
    format!("t_{}", &uuid::Uuid::new_v4().simple().to_string()[..12])
}

/// A processor running in this process, with its own schema and dedup prefix.
pub struct TestProcessor {
    pub pool: sqlx::PgPool,
    pub stats: std::sync::Arc<helios::pipeline::stats::ProcessorStats>,
    stop: Option<ShutdownTrigger>,
    task: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl TestProcessor {
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            s.trigger();
        }
        if let Some(t) = self.task.take() {
            t.await
                .expect("processor task")
                .expect("processor ended cleanly");
        }
    }
}

impl Drop for TestProcessor {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            s.trigger();
        }
    }
}

/// Options for [`spawn_processor_with`].
#[derive(Clone)]
pub struct ProcOpts {
    pub schema_registry_url: Option<String>,
    pub schema: String,
    pub dedup_prefix: String,
    pub database_url: String,
    pub redis_url: String,
    /// librdkafka properties for the processor's clients.
    pub kafka_properties: Vec<(String, String)>,
    /// How long a dedup mark lives.
    pub dedup_ttl: Duration,
    /// Most raw records per batch.
    pub batch_records: usize,
}

impl Default for ProcOpts {
    fn default() -> Self {
        ProcOpts {
            schema_registry_url: None,
            schema: unique_schema(),
            dedup_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
            database_url: database_url(),
            redis_url: redis_url(),
            kafka_properties: vec![],
            dedup_ttl: Duration::from_secs(3600),
            batch_records: 200,
        }
    }
}

/// Starts a processor on `topology` (migrations applied).
pub async fn spawn_processor(topology: &Topology) -> TestProcessor {
    spawn_processor_with(topology, ProcOpts::default()).await
}

pub async fn spawn_processor_with(topology: &Topology, o: ProcOpts) -> TestProcessor {
    init_logs();
    let pool = helios::db::connect(&o.database_url, Some(&o.schema))
        .await
        .expect("postgres");
    helios::db::migrate(&pool).await.expect("migrate");
    let dedup =
        helios::pipeline::dedup::RedisDedup::connect(&o.redis_url, &o.dedup_prefix, o.dedup_ttl)
            .await
            .expect("redis");
    let mut kafka = KafkaSettings::new(kafka_bootstrap());
    kafka.properties.extend(o.kafka_properties.iter().cloned());
    let mut cfg = helios::pipeline::processor::ProcessorConfig::new(kafka, topology.clone());
    cfg.batch.records = o.batch_records;
    cfg.schema_registry_url = o.schema_registry_url.clone();
    let p = helios::pipeline::processor::Processor::new(
        cfg,
        dedup,
        helios::db::PgStore::new(pool.clone()),
    )
    .expect("processor");
    let stats = p.stats();
    let (stop, shutdown) = Shutdown::new();
    let task = tokio::spawn(p.run(shutdown));
    TestProcessor {
        pool,
        stats,
        stop: Some(stop),
        task: Some(task),
    }
}

/// Waits until `sql` (a count query) returns at least `n`; returns the last value.
pub async fn wait_count(pool: &sqlx::PgPool, sql: &'static str, n: i64, timeout: Duration) -> i64 {
    let deadline = Instant::now() + timeout;
    loop {
        let c: i64 = sqlx::query_scalar(sql).fetch_one(pool).await.unwrap_or(-1);
        if c >= n || Instant::now() > deadline {
            return c;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Direct-ingest raw records (as the ingress lands them) into the topology's direct raw topic.
pub async fn produce_direct_to(bootstrap: &str, topology: &Topology, bodies: &[Vec<u8>]) {
    produce_raw_to(
        bootstrap,
        &topology.raw_topic(Source::Direct),
        "direct",
        "ingest",
        bodies,
    )
    .await
}

/// A fresh PostgreSQL schema, a fresh dedup key prefix, and a pool on that schema: what a
/// processor started as a separate process writes to.
pub async fn scratch_store() -> (String, String, sqlx::PgPool) {
    let schema = unique_schema();
    let prefix = format!("test:{}:", uuid::Uuid::new_v4().simple());
    let pool = helios::db::connect(&database_url(), Some(&schema))
        .await
        .unwrap();
    (schema, prefix, pool)
}

/// Waits (up to 60 s) until `sql` counts `n`, and asserts it is exactly `n`.
pub async fn expect_count(pool: &sqlx::PgPool, sql: &'static str, n: i64) {
    assert_eq!(
        wait_count(pool, sql, n, Duration::from_secs(60)).await,
        n,
        "{sql}"
    );
}

/// Produces raw records straight into a raw topic, as the ingress would have landed them.
pub async fn produce_raw(topic: &str, source: &str, endpoint: &str, bodies: &[Vec<u8>]) {
    produce_raw_to(&kafka_bootstrap(), topic, source, endpoint, bodies).await
}

/// [`produce_raw`] to a specific broker.
pub async fn produce_raw_to(
    bootstrap: &str,
    topic: &str,
    source: &str,
    endpoint: &str,
    bodies: &[Vec<u8>],
) {
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "20")
        // Raw topics allow 2 MiB: tests may land records larger than the ingress would.
        .set("message.max.bytes", "2000000")
        .create()
        .expect("producer");
    let now = chrono::Utc::now().to_rfc3339();
    let mut futs = vec![];
    for (i, b) in bodies.iter().enumerate() {
        let rid = format!("raw-{i}");
        let source = Source::parse(source).expect("a source name");
        let h = helios::http::landing::event_record_headers(source, endpoint, &rid, &now);
        let rec: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(topic).payload(b.as_slice()).headers(h);
        futs.push(producer.send(rec, Duration::from_secs(30)));
    }
    for f in futs {
        if let Err((e, _)) = f.await {
            panic!("producing a raw record failed: {e}");
        }
    }
}

/// `helios process` (the binary) on `topology`, with its own schema and dedup prefix, small
/// batches and migrations at start-up. Callers add what their test needs and spawn it.
pub fn helios_process_command(
    bootstrap: &str,
    topology: &Topology,
    schema: &str,
    dedup_prefix: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_helios"));
    c.arg("process")
        .env(
            "HELIOS_TOPOLOGY",
            concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", bootstrap)
        .env("HELIOS_TOPIC_PREFIX", &topology.topic_prefix)
        .env("HELIOS_CONSUMER_GROUP", &topology.consumer_group)
        .env("DATABASE_URL", database_url())
        .env("HELIOS_DB_SCHEMA", schema)
        .env("HELIOS_MIGRATE", "true")
        .env("REDIS_URL", redis_url())
        .env("HELIOS_DEDUP_PREFIX", dedup_prefix)
        .env("HELIOS_BATCH_SIZE", "50")
        .env("HELIOS_METRICS_ADDR", "127.0.0.1:0")
        .env(
            "RUST_LOG",
            std::env::var("HELIOS_TEST_CHILD_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    c
}

/// A child process killed (and reaped) when the test ends, however it ends; with a log file,
/// its last 80 lines are printed when the test fails.
pub struct KillOnDrop(pub std::process::Child, pub Option<std::path::PathBuf>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        if let Some(path) = self.1.as_ref().filter(|_| std::thread::panicking()) {
            let log = std::fs::read_to_string(path).unwrap_or_default();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "--- {} (last {} lines)\n{}",
                path.display(),
                tail.len(),
                tail.join("\n")
            );
        }
    }
}

/// A fresh directory under the system's temp dir, `helios-<tag>-<uuid>`.
pub fn scratch_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("helios-{tag}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A TCP forwarder that can be cut: while down it closes every connection and refuses new ones.
pub struct FlakyProxy {
    pub addr: SocketAddr,
    down: Arc<AtomicBool>,
    conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl FlakyProxy {
    pub async fn start(target: SocketAddr) -> FlakyProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let down = Arc::new(AtomicBool::new(false));
        let conns: Arc<Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (d, c) = (down.clone(), conns.clone());
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if d.load(Ordering::SeqCst) {
                    continue; // dropped: connection refused in effect
                }
                let h = tokio::spawn(async move {
                    if let Ok(mut out) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
                c.lock().unwrap().push(h.abort_handle());
            }
        });
        FlakyProxy { addr, down, conns }
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for h in self.conns.lock().unwrap().drain(..) {
                h.abort();
            }
        }
    }
}

/// `helios <args>` (the binary) on `topology`, with the store and dedup prefix of `opts`.
pub fn helios_cli(topology: &Topology, opts: &ProcOpts, args: &[&str]) -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_helios"));
    c.args(args)
        .env(
            "HELIOS_TOPOLOGY",
            concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
        .env("HELIOS_TOPIC_PREFIX", &topology.topic_prefix)
        .env("HELIOS_CONSUMER_GROUP", &topology.consumer_group)
        .env("DATABASE_URL", &opts.database_url)
        .env("HELIOS_DB_SCHEMA", &opts.schema)
        .env("REDIS_URL", &opts.redis_url)
        .env("HELIOS_DEDUP_PREFIX", &opts.dedup_prefix)
        .env("RUST_LOG", "warn")
        .stdin(std::process::Stdio::null());
    c
}

/// Runs a command, asserts it succeeded, returns its stdout.
pub fn run_ok(mut c: std::process::Command) -> String {
    let out = c.output().expect("run helios");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Waits (30 s at most) until the ingress at `base` answers its health endpoint with 200.
pub async fn wait_ready(client: &reqwest::Client, base: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("{base}/api/v1/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the ingress never became ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `helios ingress` (the binary) on `topology` with `env` added; returns the child and its
/// base URL.
pub fn ingress_binary(
    topology: &helios::topology::Topology,
    env: &[(&str, &str)],
) -> (std::process::Child, String) {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
        .arg("ingress")
        .env(
            "HELIOS_TOPOLOGY",
            concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
        )
        .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
        .env("HELIOS_TOPIC_PREFIX", &topology.topic_prefix)
        .env("API_HOST", "127.0.0.1")
        .env("API_PORT", "0")
        .env("RUST_LOG", "error")
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("helios ingress");
    let mut line = String::new();
    let mut out = std::io::BufReader::new(child.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut out, &mut line).unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, url)
}

/// Reads one series of a process's `/metrics`, summed over its labels when `name` is a bare
/// metric name (0 while unreachable or not yet counted).
pub async fn metric_value(addr: &str, name: &str) -> f64 {
    let Ok(resp) = reqwest::get(format!("http://{addr}/metrics")).await else {
        return 0.0;
    };
    let text = resp.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter(|l| {
            // `name` must be the whole metric name (or the name with some labels).
            let rest = &l[name.len()..];
            rest.starts_with(' ')
                || rest.starts_with('{')
                || name.ends_with('}')
                || name.ends_with(',')
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `metric_value(addr, name) >= at_least` (or `timeout`); returns the last value.
pub async fn wait_metric(addr: &str, name: &str, at_least: f64, timeout: Duration) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric_value(addr, name).await;
        if v >= at_least || Instant::now() > deadline {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A free loopback address for a child's metrics endpoint.
pub fn free_addr() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Asks a child process to stop (SIGTERM) and waits up to `timeout` for it to exit; kills it if
/// it did not. Returns whether it exited by itself, and its status.
pub fn terminate(
    child: &mut std::process::Child,
    timeout: Duration,
) -> (bool, Option<std::process::ExitStatus>) {
    // SAFETY: kill(2) on the child's pid; no memory is involved.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            return (true, Some(status));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    (false, child.wait().ok())
}

/// A private Tansu broker (sqlite engine) in its own directory, on its own port: a test can
/// stop it and start it again on the same data.
pub struct Broker {
    child: Option<std::process::Child>,
    pub dir: std::path::PathBuf,
    pub port: u16,
}

impl Broker {
    pub fn start(dir: std::path::PathBuf, port: u16) -> Broker {
        let bin = std::env::var("TANSU_BIN").expect(
            "TANSU_BIN is not set: run the tests with scripts/test.sh, which installs Tansu",
        );
        std::fs::create_dir_all(&dir).unwrap();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = std::process::Command::new(bin)
            .current_dir(&dir)
            .env_remove("STORAGE_ENGINE")
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "sqlite://broker.db", "--silent"])
            .stdout(std::process::Stdio::null())
            .stderr(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(dir.join("broker.log"))
                    .unwrap(),
            )
            .spawn()
            .expect("start tansu");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tansu did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Broker {
            child: Some(child),
            dir,
            port,
        }
    }

    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the broker again on the same data and port (after [`Broker::stop`]).
    pub fn restart(&mut self) {
        self.stop();
        let again = Broker::start(self.dir.clone(), self.port);
        self.child = again.into_child();
    }

    fn into_child(mut self) -> Option<std::process::Child> {
        let c = self.child.take();
        // The data directory stays: it is the caller's broker's.
        self.dir = std::path::PathBuf::new();
        c
    }

    /// The bootstrap address.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.stop();
        if !self.dir.as_os_str().is_empty() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
