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
        backlog_every: Duration::from_millis(300),
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

/// Writes fan-out records exactly as the processor does (headers, key, JSON value), received
/// now.
async fn produce_steps(topology: &Topology, t0: DateTime<Utc>, steps: &[Step<'_>]) {
    produce_received(topology, t0, steps, Utc::now()).await
}

/// As [`produce_steps`], received by the ingress at `received`.
async fn produce_received(
    topology: &Topology,
    t0: DateTime<Utc>,
    steps: &[Step<'_>],
    received: DateTime<Utc>,
) {
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
            ingested_at: received,
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

/// The clouds tests send from (each one is an input of event time on every topic it uses).
const CLOUDS: [&str; 4] = ["aws", "gcp", "azure", "direct"];

/// Every event type of the topology's flows (steps, then terminal types).
fn flow_types(topology: &Topology) -> Vec<String> {
    let mut v: Vec<String> = vec![];
    for f in topology.flows().unwrap() {
        for t in f.event_types() {
            if !v.contains(&t) {
                v.push(t);
            }
        }
    }
    v
}

/// A key on partition `p` (of `parts`) starting with `prefix`.
fn key_on(prefix: &str, p: i32, parts: i32) -> String {
    (0..)
        .map(|i| format!("{prefix}-{i}"))
        .find(|k| partition_of(k, parts) == p)
        .unwrap()
}

/// Moves event time on every input (each cloud on each flow topic-partition) to `at`: one clock
/// order per cloud and partition with every event type of the flows, all at `at` (it
/// completes). Returns the events written.
async fn clock_every_input(topology: &Topology, t0: DateTime<Utc>, at: i64) -> u64 {
    let parts = topology.event_topics.partitions;
    let types = flow_types(topology);
    let mut owned: Vec<(String, &str, String, String)> = vec![];
    for cloud in CLOUDS {
        for p in 0..parts {
            let key = key_on(&format!("clock-{at}-{cloud}"), p, parts);
            for ty in &types {
                owned.push((ty.clone(), cloud, format!("{key}-{ty}"), key.clone()));
            }
        }
    }
    let list: Vec<Step<'_>> = owned
        .iter()
        .map(|(ty, cloud, id, key)| (ty.as_str(), *cloud, id.as_str(), key.as_str(), at))
        .collect();
    produce_steps(topology, t0, &list).await;
    list.len() as u64
}

/// The marker orders (OrderPlaced half an hour after t0, nothing else, one per partition), then
/// every input clocked an hour after t0: once the markers' `missing` outcomes are written, every
/// deadline of the test has been looked at. Returns the events written.
async fn advance_past_every_deadline(topology: &Topology, t0: DateTime<Utc>) -> u64 {
    let parts = topology.event_topics.partitions;
    let markers: Vec<String> = (0..parts).map(|p| key_on("marker", p, parts)).collect();
    let owned: Vec<(String, String)> = markers
        .iter()
        .map(|m| (format!("{m}-placed"), m.clone()))
        .collect();
    let list: Vec<Step<'_>> = owned
        .iter()
        .map(|(id, key)| ("OrderPlaced", "direct", id.as_str(), key.as_str(), 1800))
        .collect();
    produce_steps(topology, t0, &list).await;
    MARKERS.with(|m| *m.borrow_mut() = markers);
    list.len() as u64 + clock_every_input(topology, t0, 3600).await
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
    assert_eq!(
        rec.stats
            .misplaced
            .load(std::sync::atomic::Ordering::Relaxed),
        0,
        "the processor's fan-out puts each record on its key's partition"
    );
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
async fn a_step_after_its_reported_missing_is_one_retraction_and_the_report_counts_one_order() {
    let topology = flow_topology(1).await;
    let schema = unique_schema();
    let rec = spawn_reconciler(&topology, &schema, HOUR).await;
    let t0 = t0();
    produce_steps(
        &topology,
        t0,
        &[
            ("OrderPlaced", "aws", "m-1", "M-1", 0),
            ("PaymentProcessed", "gcp", "m-2", "M-1", 20),
        ],
    )
    .await;
    // Every input 5 minutes on: event time passes M-1's 2-minute deadline.
    clock_every_input(&topology, t0, 300).await;
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
    // It arrives after all: one `arrived_late` that resolves the missing (on record), not a
    // `late` beside it.
    produce_steps(
        &topology,
        t0,
        &[("InventoryReserved", "azure", "m-3", "M-1", 100)],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while outcomes_of(&rec.pool, "M-1").await.len() < 3 {
        assert!(Instant::now() < deadline, "no arrived_late outcome");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "M-1").await,
        set(&[
            ("missing", "InventoryReserved", true),
            ("arrived_late", "InventoryReserved", false),
            ("completed", "", false),
        ])
    );
    let detail: serde_json::Value = sqlx::query_scalar(
        "SELECT detail FROM reconciliation_results WHERE flow_key = 'M-1' AND outcome = 'arrived_late'",
    )
    .fetch_one(&rec.pool)
    .await
    .unwrap();
    assert_eq!(detail["late_by_ms"], 0, "on time by event time: {detail}");
    // The report counts orders by their final state: M-1 once, as completed.
    let opts = ProcOpts {
        schema,
        ..ProcOpts::default()
    };
    let report: serde_json::Value = serde_json::from_str(&run_ok(helios_cli(
        &topology,
        &opts,
        &["reconcile", "report", "--json"],
    )))
    .unwrap();
    let orders = &report["flows"][0]["orders"];
    assert_eq!(orders["missing"], 0, "{report}");
    assert_eq!(
        orders["completed"].as_i64().unwrap(),
        1 + CLOUDS.len() as i64,
        "M-1 and the clock orders: {report}"
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

mod event_time;
mod group;
mod outbox;
