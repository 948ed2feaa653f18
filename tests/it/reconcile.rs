//! `helios reconcile` against the real broker and PostgreSQL: each outcome of the flow
//! OrderPlaced → PaymentProcessed (within 1m) → InventoryReserved (within 2m), lateness 5s.
//!
//! Most tests write fan-out records the way the processor does (same headers, same JSON) with
//! event times in the past, and run on event time alone (idle_after 1h). A test ends when a
//! marker order's `missing` outcomes appear: the watermark is then past every deadline of the
//! test, so whatever was not reported by then never will be.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use base64::Engine;
use chrono::{DateTime, Utc};
use helios::reconcile::{
    ReconStore, ReconcileStats, Reconciler, ReconcilerConfig, DEFAULT_REJOIN_AFTER,
};
use helios::shutdown::{Shutdown, ShutdownTrigger};
use helios::topology::Topology;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::json;
use sqlx::Row;

use crate::common::*;

/// The test flow on a fresh topology with `partitions` per fan-out topic.
async fn flow_topology(partitions: i32) -> Topology {
    applied_topology(|t| {
        t.event_topics.partitions = partitions;
        t.flows.clear();
        t.flows.insert(
            "order_lifecycle".into(),
            serde_norway::from_str(
                "steps: [OrderPlaced, {PaymentProcessed: {within: 1m}}, {InventoryReserved: {within: 2m}}]\nallowed_lateness: 5s",
            )
            .unwrap(),
        );
        t.reconciler_group = format!("{}helios-reconciler", t.topic_prefix);
    })
    .await
}

struct TestReconciler {
    pool: sqlx::PgPool,
    stats: std::sync::Arc<ReconcileStats>,
    stop: ShutdownTrigger,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestReconciler {
    async fn stop(self) {
        self.stop.trigger();
        self.task
            .await
            .expect("reconciler task")
            .expect("reconciler ended cleanly");
    }
}

async fn spawn_reconciler(
    topology: &Topology,
    schema: &str,
    idle_after: Duration,
) -> TestReconciler {
    spawn_reconciler_with(topology, schema, idle_after, DEFAULT_REJOIN_AFTER, None).await
}

/// `client_id` orders the members: the range assignor gives partitions to the member ids that
/// sort first, and both brokers make member ids `<client.id>-<uuid>`.
async fn spawn_reconciler_with(
    topology: &Topology,
    schema: &str,
    idle_after: Duration,
    rejoin_after: Duration,
    client_id: Option<&str>,
) -> TestReconciler {
    init_logs();
    let pool = helios::db::connect(&database_url(), Some(schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    let mut kafka = helios::config::KafkaSettings::new(kafka_bootstrap());
    if let Some(id) = client_id {
        kafka.properties.insert("client.id".into(), id.into());
    }
    let cfg = ReconcilerConfig {
        kafka,
        topology: topology.clone(),
        group: topology.reconciler_group.clone(),
        batch_size: 500,
        idle_after,
        state_retention: Duration::from_secs(8 * 86_400),
        rejoin_after,
    };
    let r = Reconciler::new(cfg, ReconStore::Pg(pool.clone())).expect("reconciler");
    let stats = r.stats.clone();
    let (stop, shutdown) = Shutdown::new();
    let task = tokio::spawn(r.run(shutdown));
    TestReconciler {
        pool,
        stats,
        stop,
        task,
    }
}

/// One fan-out event: (type, cloud, event id, order id, seconds after `t0`).
type Step<'a> = (&'a str, &'a str, &'a str, &'a str, i64);

fn t0() -> DateTime<Utc> {
    // Two hours ago, on a whole second: far enough back that wall-clock time never matters.
    DateTime::from_timestamp(Utc::now().timestamp() - 7200, 0).unwrap()
}

/// The partition of a key, the same on every topic (as the processor's keyed fan-out gives).
fn partition_of(key: &str, partitions: i32) -> i32 {
    (key.bytes()
        .fold(7u32, |h, b| h.wrapping_mul(31).wrapping_add(b as u32))
        % partitions as u32) as i32
}

/// Writes fan-out records exactly as the processor does (headers, key, JSON value).
async fn produce_steps(topology: &Topology, t0: DateTime<Utc>, steps: &[Step<'_>]) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap();
    let partitions = topology.event_topics.partitions;
    for (i, (ty, cloud, id, order, at)) in steps.iter().enumerate() {
        let e = helios::model::CanonicalEvent {
            event_id: id.to_string(),
            event_type: ty.to_string(),
            source: helios::source::Source::parse(cloud).unwrap(),
            occurred_at: t0 + chrono::Duration::seconds(*at),
            ingested_at: Utc::now(),
            order_id: Some(order.to_string()),
            customer_id: None,
            data: json!({"order_id": order}),
            metadata: Default::default(),
            raw: helios::model::RawRef {
                topic: format!("helios.raw.{cloud}"),
                partition: 0,
                offset: i as i64,
                index: 0,
            },
        };
        let topic = topology.event_topic(ty);
        let payload = helios::pipeline::fanout::json_payload(&e);
        producer
            .send(
                FutureRecord::to(&topic)
                    .key(order.as_bytes())
                    .partition(partition_of(order, partitions))
                    .payload(&payload)
                    .headers(helios::pipeline::fanout::headers(
                        &e,
                        "application/json",
                        None,
                        None,
                    )),
                Duration::from_secs(30),
            )
            .await
            .map_err(|(e, _)| e)
            .expect("fan-out record");
    }
}

/// The marker order (OrderPlaced half an hour after t0, nothing else) and a clock order an
/// hour after t0, on every partition: once the marker's two `missing` outcomes are written,
/// every deadline of the test has been looked at.
async fn advance_past_every_deadline(topology: &Topology, t0: DateTime<Utc>) {
    let parts = topology.event_topics.partitions;
    let mut markers: Vec<String> = vec![];
    let mut clocks: Vec<String> = vec![];
    for i in 0.. {
        let k = format!("marker-{i}");
        let p = partition_of(&k, parts) as usize;
        if markers.len() == p {
            markers.push(k.clone());
        }
        let c = format!("clock-{i}");
        if clocks.len() == partition_of(&c, parts) as usize {
            clocks.push(c);
        }
        if markers.len() == parts as usize && clocks.len() == parts as usize {
            break;
        }
    }
    let mut steps: Vec<(String, String)> = vec![];
    for m in &markers {
        steps.push((format!("{m}-placed"), m.clone()));
    }
    // The markers after every test event's time (their deadlines need the clock orders).
    let owned: Vec<(String, String, i64)> = markers
        .iter()
        .map(|m| (format!("{m}-placed"), m.clone(), 1800))
        .chain(
            clocks
                .iter()
                .map(|c| (format!("{c}-placed"), c.clone(), 3600)),
        )
        .collect();
    let list: Vec<Step<'_>> = owned
        .iter()
        .map(|(id, key, at)| ("OrderPlaced", "direct", id.as_str(), key.as_str(), *at))
        .collect();
    produce_steps(topology, t0, &list).await;
    MARKERS.with(|m| *m.borrow_mut() = markers);
}

thread_local! {
    static MARKERS: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(vec![]) };
}

/// Waits until every marker order has both of its `missing` outcomes.
async fn wait_for_markers(pool: &sqlx::PgPool) {
    let markers = MARKERS.with(|m| m.borrow().clone());
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reconciliation_results WHERE outcome = 'missing' AND flow_key = ANY($1)",
        )
        .bind(&markers)
        .fetch_one(pool)
        .await
        .unwrap_or(0);
        if n == 2 * markers.len() as i64 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the markers' missing outcomes never came ({n} of {})",
            2 * markers.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// (outcome, step, resolved) of a key.
async fn outcomes_of(pool: &sqlx::PgPool, key: &str) -> BTreeSet<(String, String, bool)> {
    sqlx::query(
        "SELECT outcome, step, resolved_at IS NOT NULL FROM reconciliation_results WHERE flow_key = $1",
    )
    .bind(key)
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

fn set(items: &[(&str, &str, bool)]) -> BTreeSet<(String, String, bool)> {
    items
        .iter()
        .map(|(o, s, r)| (o.to_string(), s.to_string(), *r))
        .collect()
}

const HOUR: Duration = Duration::from_secs(3600);

#[tokio::test]
async fn a_complete_order_across_three_clouds_is_completed_once_with_its_timeline() {
    let topology = flow_topology(1).await;
    let app = {
        let t = topology.clone();
        spawn_app(move |c| c.topology = t).await
    };
    let proc = spawn_processor(&topology).await;
    let schema = proc_schema(&proc.pool).await;
    let rec = spawn_reconciler(&topology, &schema, HOUR).await;
    let now = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    let at = |s: i64| (now + chrono::Duration::seconds(s)).to_rfc3339();
    // OrderPlaced through EventBridge (AWS), PaymentProcessed as a CloudEvent through Event
    // Grid (Azure), InventoryReserved through a Pub/Sub push (GCP).
    let eb = json!({"version": "0", "id": "rc-eb-1", "detail-type": "OrderPlaced", "source": "shop",
        "account": "1", "time": at(-20), "region": "eu-west-1", "resources": [],
        "detail": {"order_id": "RC-1", "customer_id": "C-1"}});
    let ce = json!({"specversion": "1.0", "type": "PaymentProcessed", "source": "/payments", "id": "rc-ce-1",
        "time": at(-10), "datacontenttype": "application/json", "data": {"order_id": "RC-1", "amount": 10}});
    let inv =
        base64::engine::general_purpose::STANDARD.encode(json!({"order_id": "RC-1"}).to_string());
    let ps = json!({"message": {"data": inv, "messageId": "rc-ps-1", "publishTime": at(-5),
        "attributes": {"eventType": "InventoryReserved"}}, "subscription": "projects/p/subscriptions/s"});
    for (path, ct, body) in [
        ("/api/v1/webhooks/aws/eventbridge", "application/json", eb),
        (
            "/api/v1/webhooks/azure/eventgrid",
            "application/cloudevents+json",
            ce,
        ),
        ("/api/v1/webhooks/gcp/pubsub", "application/json", ps),
    ] {
        let r = app
            .client
            .post(app.url(path))
            .header("content-type", ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.status());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "RC-1").await.is_empty() {
        assert!(Instant::now() < deadline, "no outcome for RC-1");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "RC-1").await,
        set(&[("completed", "", false)])
    );
    let (duration, clouds): (i64, serde_json::Value) = {
        let r = sqlx::query("SELECT duration_ms, detail->'clouds' FROM reconciliation_results WHERE flow_key = 'RC-1'")
            .fetch_one(&rec.pool)
            .await
            .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(duration, 15_000, "first step to last, in event time");
    assert_eq!(clouds, json!(["aws", "azure", "gcp"]));
    // The outcome record, keyed by the order id.
    let out = read_exactly(&kafka_bootstrap(), &topology.reconciliation_topic(), 1).await;
    assert_eq!(out[0].key.as_deref(), Some(&b"RC-1"[..]));
    assert_eq!(out[0].header("helios-outcome"), Some("completed"));
    let v: serde_json::Value = serde_json::from_slice(&out[0].value).unwrap();
    assert_eq!(v["flow"], "order_lifecycle");

    // `helios reconcile show` and `report` read it back.
    let opts = ProcOpts {
        schema: schema.clone(),
        ..ProcOpts::default()
    };
    let show = run_ok(helios_cli(&topology, &opts, &["reconcile", "show", "RC-1"]));
    for want in [
        "order_lifecycle / RC-1  (completed",
        "OrderPlaced",
        "PaymentProcessed",
        "InventoryReserved",
        "aws",
        "azure",
        "gcp",
        "+10.0s",
        "+5.0s",
        "outcome: completed in 15.0s",
    ] {
        assert!(show.contains(want), "`{want}` not in:\n{show}");
    }
    let json_show: serde_json::Value = serde_json::from_str(&run_ok(helios_cli(
        &topology,
        &opts,
        &["reconcile", "show", "RC-1", "--json"],
    )))
    .unwrap();
    let raw = json_show["flows"][0]["timeline"][0]["raw"]
        .as_str()
        .unwrap();
    assert!(
        raw.starts_with(&topology.raw_topic(helios::source::Source::Aws)),
        "{raw}"
    );
    let report = run_ok(helios_cli(&topology, &opts, &["reconcile", "report"]));
    assert!(
        report.contains("order_lifecycle") && report.contains("completed"),
        "{report}"
    );
    rec.stop().await;
    proc.stop().await;
    app.stop().await;
}

/// The schema a pool works in.
async fn proc_schema(pool: &sqlx::PgPool) -> String {
    sqlx::query_scalar("SELECT current_schema()")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_missing_step_is_reported_after_its_deadline_then_resolved_as_late() {
    let topology = flow_topology(1).await;
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    let t0 = t0();
    produce_steps(
        &topology,
        t0,
        &[
            ("OrderPlaced", "aws", "m-1", "M-1", 0),
            ("PaymentProcessed", "gcp", "m-2", "M-1", 20),
            // Another order 5 minutes on: event time passes M-1's 2-minute deadline.
            ("OrderPlaced", "aws", "n-1", "N-1", 300),
        ],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "M-1").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "M-1's missing step never reported"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "M-1").await,
        set(&[("missing", "InventoryReserved", false)])
    );
    // It arrives after all: late, and the missing is resolved (it stays on record).
    produce_steps(
        &topology,
        t0,
        &[("InventoryReserved", "azure", "m-3", "M-1", 200)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "M-1").await.len() < 3 {
        assert!(Instant::now() < deadline, "no late outcome");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "M-1").await,
        set(&[
            ("missing", "InventoryReserved", true),
            ("late", "InventoryReserved", false),
            ("completed", "", false),
        ])
    );
    rec.stop().await;
}

/// A reconciler on a fresh topology after `steps` (event time from two hours ago) and every
/// deadline they could have.
async fn settled(steps: &[Step<'_>]) -> TestReconciler {
    let topology = flow_topology(1).await;
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    let t0 = t0();
    produce_steps(&topology, t0, steps).await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&rec.pool).await;
    rec
}

#[tokio::test]
async fn arrival_out_of_order_completes_while_event_time_out_of_order_is_reported() {
    let rec = settled(&[
        // A-1 arrives last step first, within the lateness: it simply completes.
        ("InventoryReserved", "gcp", "a-3", "A-1", 40),
        ("PaymentProcessed", "azure", "a-2", "A-1", 20),
        ("OrderPlaced", "aws", "a-1", "A-1", 0),
        // B-1's payment happened (event time) before the order was placed.
        ("OrderPlaced", "aws", "b-1", "B-1", 30),
        ("PaymentProcessed", "gcp", "b-2", "B-1", 10),
        ("InventoryReserved", "gcp", "b-3", "B-1", 50),
    ])
    .await;
    assert_eq!(
        outcomes_of(&rec.pool, "A-1").await,
        set(&[("completed", "", false)])
    );
    assert_eq!(
        outcomes_of(&rec.pool, "B-1").await,
        set(&[
            ("out_of_order", "PaymentProcessed", false),
            ("completed", "", false)
        ])
    );
    rec.stop().await;
}

#[tokio::test]
async fn a_step_paid_twice_through_two_clouds_is_a_duplicate_step_and_a_lone_payment_an_orphan() {
    let rec = settled(&[
        ("OrderPlaced", "aws", "d-1", "D-1", 0),
        ("PaymentProcessed", "aws", "d-2", "D-1", 10),
        ("PaymentProcessed", "azure", "d-2b", "D-1", 12),
        ("InventoryReserved", "gcp", "d-3", "D-1", 30),
        // O-1: a payment for an order that was never placed.
        ("PaymentProcessed", "gcp", "o-2", "O-1", 10),
    ])
    .await;
    assert_eq!(
        outcomes_of(&rec.pool, "D-1").await,
        set(&[
            ("duplicate_step", "PaymentProcessed", false),
            ("completed", "", false)
        ])
    );
    assert_eq!(
        outcomes_of(&rec.pool, "O-1").await,
        set(&[("orphan", "OrderPlaced", false)])
    );
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_results WHERE flow_key = 'D-1' AND outcome = 'duplicate_step'",
    )
    .fetch_one(&rec.pool)
    .await
    .unwrap();
    assert_eq!(detail["first"]["source"], "aws");
    assert_eq!(detail["again"]["source"], "azure");
    rec.stop().await;
}

#[tokio::test]
async fn an_idle_partition_still_reports_a_missing_step_on_wall_clock_time() {
    let topology = applied_topology(|t| {
        t.flows.clear();
        t.flows.insert(
            "order_lifecycle".into(),
            serde_norway::from_str(
                "steps: [OrderPlaced, {PaymentProcessed: {within: 2s}}, {InventoryReserved: {within: 3s}}]\nallowed_lateness: 1s",
            )
            .unwrap(),
        );
        t.reconciler_group = format!("{}helios-reconciler", t.topic_prefix);
    })
    .await;
    let rec = spawn_reconciler(&topology, &unique_schema(), Duration::from_millis(500)).await;
    // Placed now; then no traffic at all.
    produce_steps(
        &topology,
        Utc::now(),
        &[("OrderPlaced", "aws", "i-1", "I-1", 0)],
    )
    .await;
    let started = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "I-1").await.len() < 2 {
        assert!(Instant::now() < deadline, "the idle partition never fired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "not before the deadline plus lateness"
    );
    assert_eq!(
        outcomes_of(&rec.pool, "I-1").await,
        set(&[
            ("missing", "PaymentProcessed", false),
            ("missing", "InventoryReserved", false)
        ])
    );
    rec.stop().await;
}

/// Owned [`Step`]s.
type OwnedStep = (String, String, String, String, i64);
/// (key, outcome, step).
type Expected = BTreeSet<(String, String, String)>;

/// Orders of the stream tests: every third completes, every third misses its inventory step,
/// every third is paid twice (and completes). Returns the steps and the expected outcomes.
fn stream(n: usize) -> (Vec<OwnedStep>, Expected) {
    let mut steps = vec![];
    let mut expected = BTreeSet::new();
    for i in 0..n {
        let key = format!("S-{i}");
        // Event time moves on with the stream (an order a second): a step is never behind
        // the watermark by more than the lateness.
        let base = i as i64;
        steps.push((
            "OrderPlaced".into(),
            "aws".into(),
            format!("s{i}-1"),
            key.clone(),
            base,
        ));
        steps.push((
            "PaymentProcessed".into(),
            "gcp".into(),
            format!("s{i}-2"),
            key.clone(),
            base + 10,
        ));
        match i % 3 {
            0 => {
                steps.push((
                    "InventoryReserved".into(),
                    "azure".into(),
                    format!("s{i}-3"),
                    key.clone(),
                    base + 20,
                ));
                expected.insert((key, "completed".into(), String::new()));
            }
            1 => {
                expected.insert((key, "missing".into(), "InventoryReserved".into()));
            }
            _ => {
                steps.push((
                    "PaymentProcessed".into(),
                    "azure".into(),
                    format!("s{i}-2b"),
                    key.clone(),
                    base + 11,
                ));
                steps.push((
                    "InventoryReserved".into(),
                    "azure".into(),
                    format!("s{i}-3"),
                    key.clone(),
                    base + 20,
                ));
                expected.insert((
                    key.clone(),
                    "duplicate_step".into(),
                    "PaymentProcessed".into(),
                ));
                expected.insert((key, "completed".into(), String::new()));
            }
        }
    }
    (steps, expected)
}

async fn produce_stream(topology: &Topology, t0: DateTime<Utc>, steps: &[OwnedStep]) {
    let list: Vec<Step<'_>> = steps
        .iter()
        .map(|(a, b, c, d, e)| (a.as_str(), b.as_str(), c.as_str(), d.as_str(), *e))
        .collect();
    produce_steps(topology, t0, &list).await;
}

/// Every (key, outcome, step) of the stream orders.
async fn stream_outcomes(pool: &sqlx::PgPool) -> BTreeSet<(String, String, String)> {
    sqlx::query(
        "SELECT flow_key, outcome, step FROM reconciliation_results WHERE flow_key LIKE 'S-%'",
    )
    .fetch_all(pool)
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1), r.get(2)))
    .collect()
}

/// A child process killed when the test ends, passed or not.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn killing_the_reconciler_mid_stream_then_restarting_writes_each_outcome_once() {
    let topology = flow_topology(1).await;
    let (steps, expected) = stream(600);
    let t0 = t0();
    produce_stream(&topology, t0, &steps).await;
    advance_past_every_deadline(&topology, t0).await;
    let dir = scratch_dir("reconcile-crash");
    let file = dir.join("topology.yaml");
    std::fs::write(&file, serde_norway::to_string(&topology).unwrap()).unwrap();
    let schema = unique_schema();
    let pool = helios::db::connect(&database_url(), Some(&schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    let spawn = || {
        std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
            .arg("reconcile")
            .env("HELIOS_TOPOLOGY", &file)
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
            .env("DATABASE_URL", database_url())
            .env("HELIOS_DB_SCHEMA", &schema)
            .env("HELIOS_RECONCILE_BATCH_SIZE", "50")
            .env("HELIOS_RECONCILE_IDLE_AFTER", "1h")
            .env("HELIOS_RECONCILE_METRICS_ADDR", "127.0.0.1:0")
            // Dynamic membership (the default). On Tansu 0.6.0 the restarted member is sometimes
            // formed into the group with nothing assigned (README, Scaling); it then joins the
            // group again after DEFAULT_REJOIN_AFTER, which this test goes through too.
            // HELIOS_TEST_CHILD_LOG: the child's log filter when diagnosing this test.
            .env(
                "RUST_LOG",
                std::env::var("HELIOS_TEST_CHILD_LOG").unwrap_or("warn".into()),
            )
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("helios reconcile")
    };
    let mut first = KillOnDrop(spawn());
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM flow_state")
            .fetch_one(&pool)
            .await
            .unwrap_or(0);
        if n >= 100 {
            break;
        }
        assert!(Instant::now() < deadline, "the reconciler never got going");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.0.kill().unwrap(); // SIGKILL, mid-stream
    first.0.wait().unwrap();
    let done_before: i64 = sqlx::query_scalar("SELECT count(*) FROM flow_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        done_before < 600,
        "the kill came too late to test anything ({done_before} orders done)"
    );
    let _second = KillOnDrop(spawn());
    wait_for_markers(&pool).await;
    assert_eq!(stream_outcomes(&pool).await, expected);
    // Exactly one row each (the set above would hide a second one).
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'S-%'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, expected.len());
    // Every outcome reached the topic at least once (a batch redone after the kill may have
    // sent some twice).
    let topic = topology.reconciliation_topic();
    let stream_set = |records: &[Record]| -> Expected {
        records
            .iter()
            .filter_map(|r| {
                let v: serde_json::Value = serde_json::from_slice(&r.value).ok()?;
                let key = v["key"].as_str()?.to_string();
                key.starts_with("S-").then(|| {
                    (
                        key,
                        v["outcome"].as_str().unwrap_or("").to_string(),
                        v["step"].as_str().unwrap_or("").to_string(),
                    )
                })
            })
            .collect()
    };
    let want = expected.len();
    let records = read_until(
        &kafka_bootstrap(),
        &topic,
        Duration::from_secs(60),
        move |r| stream_set(r).len() >= want,
    )
    .await;
    let on_topic = stream_set(&records);
    assert_eq!(on_topic, expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_restarted_reconciler_goes_on_from_the_event_time_reached_before() {
    // Records read before a restart are not read again: the event time they reached is taken
    // over from the store, or deadlines already passed would wait for new records to pass them
    // a second time (the crash test above stalled so when a topic was read to its end first).
    let topology = flow_topology(1).await;
    let schema = unique_schema();
    let t0 = t0();
    produce_steps(&topology, t0, &[("OrderPlaced", "aws", "w-1", "W-1", 3600)]).await;
    let first = spawn_reconciler(&topology, &schema, HOUR).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while first
        .stats
        .events
        .load(std::sync::atomic::Ordering::Relaxed)
        < 1
    {
        assert!(Instant::now() < deadline, "W-1 never counted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pool = first.pool.clone();
    first.stop().await;
    let stored: Vec<(String, DateTime<Utc>)> =
        sqlx::query_as(
            "SELECT topic, newest_event_time FROM reconcile_progress WHERE newest_event_time IS NOT NULL",
        )
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(
        stored,
        vec![(
            topology.event_topic("OrderPlaced"),
            t0 + chrono::Duration::seconds(3600)
        )]
    );
    // An order placed an hour of event time before: both its deadlines passed already.
    produce_steps(&topology, t0, &[("OrderPlaced", "aws", "r-1", "R-1", 0)]).await;
    let second = spawn_reconciler(&topology, &schema, HOUR).await;
    let want = set(&[
        ("missing", "PaymentProcessed", false),
        ("missing", "InventoryReserved", false),
    ]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&second.pool, "R-1").await != want {
        assert!(
            Instant::now() < deadline,
            "R-1's deadlines never fired after the restart: {:?}",
            outcomes_of(&second.pool, "R-1").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(outcomes_of(&second.pool, "W-1").await.is_empty());
    second.stop().await;
}

#[tokio::test]
async fn a_write_from_an_instance_whose_partition_was_claimed_since_changes_nothing() {
    // A reconciler paused past its session (or whose write was still on its way when its
    // partitions moved) must not overwrite what the new owner wrote.
    use helios::reconcile::store::{Fence, StateRow};
    let pool = helios::db::connect(&database_url(), Some(&unique_schema()))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    let store = ReconStore::Pg(pool.clone());
    let tp = ("helios.events.OrderPlaced".to_string(), 0);
    let old = store.claim("g", std::slice::from_ref(&tp)).await.unwrap()[&tp].1;
    let new = store.claim("g", std::slice::from_ref(&tp)).await.unwrap()[&tp].1;
    assert!(new > old);
    let state = |key: &str| StateRow {
        flow: "order_lifecycle".into(),
        key: key.into(),
        part: 0,
        state: Default::default(),
        next_due: None,
        completed: false,
    };
    let fence = |generation| Fence {
        topic: tp.0.clone(),
        part: 0,
        generation,
        newest: Some(t0()),
        next_offset: Some(10),
    };
    let taken = store
        .save(&[state("late")], &[], &[], "g", &[fence(old)])
        .await
        .unwrap();
    assert_eq!(taken, vec![tp.clone()]);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM flow_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "the refused write changed nothing");
    let taken = store
        .save(&[state("owner")], &[], &[], "g", &[fence(new)])
        .await
        .unwrap();
    assert!(taken.is_empty());
    let (key, newest): (String, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT s.flow_key, p.newest_event_time FROM flow_state s, reconcile_progress p",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((key.as_str(), newest), ("owner", Some(t0())));
}

/// Waits until both instances are members of the group with partition p of every step topic
/// each (3 topics × 2 partitions).
async fn wait_split(a: &TestReconciler, b: &TestReconciler) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (x, y) = (
            a.stats.assigned.load(std::sync::atomic::Ordering::Relaxed),
            b.stats.assigned.load(std::sync::atomic::Ordering::Relaxed),
        );
        if (x, y) == (3, 3) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the group never split: {x} and {y} assigned"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The events two instances counted once their last writes landed (a write's counts are taken
/// when the loop sees it landed, a moment after its rows are visible): each event once.
async fn events_counted(a: &TestReconciler, b: &TestReconciler, want: u64) -> (u64, u64) {
    let read = || {
        (
            a.stats.events.load(std::sync::atomic::Ordering::Relaxed),
            b.stats.events.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while read().0 + read().1 < want && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (ea, eb) = read();
    assert_eq!(ea + eb, want, "each event counted once ({ea} + {eb})");
    (ea, eb)
}

#[tokio::test]
async fn two_reconcilers_split_the_partitions_and_agree() {
    let topology = flow_topology(2).await;
    let schema = unique_schema();
    let a = spawn_reconciler(&topology, &schema, HOUR).await;
    let b = spawn_reconciler(&topology, &schema, HOUR).await;
    wait_split(&a, &b).await;
    let (steps, expected) = stream(120);
    let t0 = t0();
    produce_stream(&topology, t0, &steps).await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&a.pool).await;
    assert_eq!(stream_outcomes(&a.pool).await, expected);
    let parts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT part FROM flow_state ORDER BY part")
        .fetch_all(&a.pool)
        .await
        .unwrap();
    assert_eq!(parts, vec![0, 1]);
    let (ea, eb) = events_counted(&a, &b, steps.len() as u64 + 4).await;
    assert!(ea > 0 && eb > 0, "both worked: {ea} and {eb} events");
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn writes_refused_by_postgres_are_retried_with_everything_counted_since() {
    // The results table is away for a while: each write fails and goes back in front of what
    // was counted since; once it is back, every outcome is written once.
    let topology = flow_topology(1).await;
    let schema = unique_schema();
    let rec = spawn_reconciler(&topology, &schema, HOUR).await;
    sqlx::query("ALTER TABLE reconciliation_results RENAME TO reconciliation_results_away")
        .execute(&rec.pool)
        .await
        .unwrap();
    let (steps, expected) = stream(150);
    let t0 = t0();
    produce_stream(&topology, t0, &steps).await;
    advance_past_every_deadline(&topology, t0).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.stats.retries.load(std::sync::atomic::Ordering::Relaxed) < 3 {
        assert!(Instant::now() < deadline, "no write was refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query("ALTER TABLE reconciliation_results_away RENAME TO reconciliation_results")
        .execute(&rec.pool)
        .await
        .unwrap();
    wait_for_markers(&rec.pool).await;
    assert_eq!(stream_outcomes(&rec.pool).await, expected);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'S-%'")
            .fetch_one(&rec.pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, expected.len(), "one row per outcome");
    // One partition: one marker and one clock order besides the stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while rec.stats.events.load(std::sync::atomic::Ordering::Relaxed) < steps.len() as u64 + 2 {
        assert!(
            Instant::now() < deadline,
            "not every event was counted: {} of {}",
            rec.stats.events.load(std::sync::atomic::Ordering::Relaxed),
            steps.len() + 2
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rec.stats.events.load(std::sync::atomic::Ordering::Relaxed),
        steps.len() as u64 + 2,
        "each event counted once"
    );
    rec.stop().await;
}

#[tokio::test]
async fn a_reconciler_joining_mid_stream_takes_its_partitions_over_without_loss_or_double() {
    // The rebalance revokes the first instance's partitions while it reads: what it counted but
    // did not write is dropped and read again (by whichever instance owns it now), what it
    // wrote is found already counted, and the new owner claims the partition before reading
    // its states.
    let topology = flow_topology(2).await;
    let schema = unique_schema();
    let (steps, expected) = stream(240);
    let (early, late) = steps.split_at(steps.len() / 2);
    let t0 = t0();
    let a = spawn_reconciler(&topology, &schema, HOUR).await;
    produce_stream(&topology, t0, early).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.stats.events.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(
            Instant::now() < deadline,
            "the first instance never counted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let b = spawn_reconciler(&topology, &schema, HOUR).await;
    wait_split(&a, &b).await;
    produce_stream(&topology, t0, late).await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&a.pool).await;
    assert_eq!(stream_outcomes(&a.pool).await, expected);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'S-%'")
            .fetch_one(&a.pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, expected.len(), "one row per outcome");
    let (_, eb) = events_counted(&a, &b, steps.len() as u64 + 4).await;
    assert!(eb > 0, "the second instance took its share");
    let generations: Vec<i64> = sqlx::query_scalar(
        "SELECT generation FROM reconcile_progress WHERE part = 1 ORDER BY topic",
    )
    .fetch_all(&a.pool)
    .await
    .unwrap();
    assert!(
        generations.len() == 3 && generations.iter().all(|g| *g >= 2),
        "partition 1 was claimed again by its new owner: {generations:?}"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_bypass_replay_changes_nothing() {
    let topology = flow_topology(1).await;
    let opts = ProcOpts::default();
    let proc = spawn_processor_with(&topology, opts.clone()).await;
    let rec = spawn_reconciler(&topology, &opts.schema, HOUR).await;
    let now = Utc::now().to_rfc3339();
    let bodies: Vec<Vec<u8>> = [
        (
            "OrderPlaced",
            "rp-1",
            json!({"order_id": "RP-1", "customer_id": "C"}),
        ),
        (
            "PaymentProcessed",
            "rp-2",
            json!({"order_id": "RP-1", "amount": 5}),
        ),
        ("InventoryReserved", "rp-3", json!({"order_id": "RP-1"})),
    ]
    .iter()
    .map(|(t, id, d)| {
        json!({"event_type": t, "event_id": id, "occurred_at": now, "data": d})
            .to_string()
            .into_bytes()
    })
    .collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "RP-1").await.is_empty() {
        assert!(Instant::now() < deadline, "RP-1 never completed");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let before: (String, DateTime<Utc>) = {
        let r =
            sqlx::query("SELECT state::text, updated_at FROM flow_state WHERE flow_key = 'RP-1'")
                .fetch_one(&rec.pool)
                .await
                .unwrap();
        (r.get(0), r.get(1))
    };
    let counted = rec
        .stats
        .already_counted
        .load(std::sync::atomic::Ordering::Relaxed);
    run_ok(helios_cli(
        &topology,
        &opts,
        &["replay", "--offsets", "direct:0:0-3", "--dedup", "bypass"],
    ));
    // The replay re-emitted three fan-out records (marked); the reconciler saw them all.
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec
        .stats
        .already_counted
        .load(std::sync::atomic::Ordering::Relaxed)
        < counted + 3
    {
        assert!(
            Instant::now() < deadline,
            "the replayed records never reached the reconciler"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let after: (String, DateTime<Utc>) = {
        let r =
            sqlx::query("SELECT state::text, updated_at FROM flow_state WHERE flow_key = 'RP-1'")
                .fetch_one(&rec.pool)
                .await
                .unwrap();
        (r.get(0), r.get(1))
    };
    assert_eq!(before, after, "the order's state was not touched");
    assert_eq!(
        outcomes_of(&rec.pool, "RP-1").await,
        set(&[("completed", "", false)])
    );
    rec.stop().await;
    proc.stop().await;
}

#[tokio::test]
async fn an_instance_left_without_partitions_joins_its_group_again_once() {
    // One partition, two instances: the second (its member id sorts after the first's, so the
    // range assignor never gives it the partition) has nothing to read. After its
    // rejoin_after it leaves the group and joins again, once for as long as it stays without
    // partitions (what gets a member its partitions when Tansu formed the group with an empty
    // assignment); the first instance keeps the partition and the flow goes through.
    let topology = flow_topology(1).await;
    let schema = unique_schema();
    let load = |r: &TestReconciler| {
        (
            r.stats.assigned.load(std::sync::atomic::Ordering::Relaxed),
            r.stats.rejoins.load(std::sync::atomic::Ordering::Relaxed),
        )
    };
    let a = spawn_reconciler_with(
        &topology,
        &schema,
        HOUR,
        DEFAULT_REJOIN_AFTER,
        Some("reconciler-a"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while load(&a).0 != 3 {
        assert!(Instant::now() < deadline, "the first instance got nothing");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // (The first instance may have gone through a rejoin already: Tansu sometimes forms even a
    // lone first member with nothing assigned.)
    let a_rejoins = load(&a).1;
    let b = spawn_reconciler_with(
        &topology,
        &schema,
        HOUR,
        Duration::from_secs(2),
        Some("reconciler-b"),
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    while !(load(&b).1 >= 1 && load(&a).0 == 3) {
        assert!(
            Instant::now() < deadline,
            "no rejoin, or the partitions never came back: {:?} and {:?} (assigned, rejoins)",
            load(&a),
            load(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (steps, expected) = stream(30);
    let t0 = t0();
    produce_stream(&topology, t0, &steps).await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&a.pool).await;
    assert_eq!(stream_outcomes(&a.pool).await, expected);
    // Seconds later (well past its 2 s), still without partitions: no second rejoin.
    assert_eq!(load(&b), (0, 1), "the second instance: (assigned, rejoins)");
    assert_eq!(
        load(&a).1,
        a_rejoins,
        "the instance with partitions rejoined"
    );
    a.stop().await;
    b.stop().await;
}
