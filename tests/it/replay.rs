//! `helios replay` and `helios dlq` (the binary, against the real broker, Redis and PostgreSQL).

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use helios::source::Source;
use serde_json::json;
use sqlx::Row;

use crate::common::*;

struct Env {
    topology: helios::topology::Topology,
    opts: ProcOpts,
    pool: sqlx::PgPool,
}

async fn env() -> Env {
    let topology = applied_topology(|_| {}).await;
    let opts = ProcOpts::default();
    let pool = helios::db::connect(&database_url(), Some(&opts.schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    Env {
        topology,
        opts,
        pool,
    }
}

fn helios(e: &Env, args: &[&str]) -> Command {
    helios_cli(&e.topology, &e.opts, args)
}

fn orders(from: usize, to: usize) -> Vec<Vec<u8>> {
    (from..to)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("r-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect()
}

async fn last_history(pool: &sqlx::PgPool) -> (String, bool, serde_json::Value) {
    let r = sqlx::query("SELECT outcome, dry_run, counts::text FROM replay_history ORDER BY started_at DESC LIMIT 1")
        .fetch_one(pool)
        .await
        .unwrap();
    (
        r.get(0),
        r.get(1),
        serde_json::from_str(&r.get::<String, _>(2)).unwrap(),
    )
}

async fn count(pool: &sqlx::PgPool) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn replay_by_time_range_processes_exactly_the_records_in_it() {
    let e = env().await;
    let topic = e.topology.raw_topic(Source::Direct);
    produce_raw(&topic, "direct", "ingest", &orders(0, 10)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let from = chrono::Utc::now();
    produce_raw(&topic, "direct", "ingest", &orders(10, 17)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let to = chrono::Utc::now();
    produce_raw(&topic, "direct", "ingest", &orders(17, 22)).await;

    // Unclear input is refused with what to write instead.
    for (args, want) in [
        (vec!["replay"], "say what to replay"),
        (
            vec![
                "replay",
                "--from",
                "2026-11-22T10:00:00Z",
                "--to",
                "2026-11-22T09:00:00Z",
            ],
            "swap them",
        ),
        (
            vec![
                "replay",
                "--topic",
                "nope",
                "--from",
                "2026-11-22T09:00:00Z",
            ],
            "unknown topic `nope`",
        ),
        (vec!["replay", "--from", "yesterday"], "RFC 3339"),
        (
            vec![
                "replay",
                "--topic",
                "direct",
                "--from",
                "2001-01-01T00:00:00Z",
                "--to",
                "2001-01-02T00:00:00Z",
            ],
            "holds no records",
        ),
    ] {
        let out = helios(&e, &args).output().unwrap();
        assert!(!out.status.success(), "{args:?} should fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(want), "{args:?}: {err}");
    }

    let f = from.to_rfc3339();
    let t = to.to_rfc3339();
    run_ok(helios(
        &e,
        &["replay", "--topic", "direct", "--from", &f, "--to", &t],
    ));
    let ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events ORDER BY event_id")
        .fetch_all(&e.pool)
        .await
        .unwrap();
    let mut want: Vec<String> = (10..17).map(|i| format!("r-{i}")).collect();
    want.sort();
    assert_eq!(ids, want, "exactly the records between --from and --to");
    let (outcome, _, counts) = last_history(&e.pool).await;
    assert_eq!(outcome, "completed");
    assert_eq!(counts["raw_records"], 7);
}

#[tokio::test]
async fn respect_changes_nothing_and_bypass_renormalizes_with_marked_fan_out() {
    let e = env().await;
    let topic = e.topology.raw_topic(Source::Direct);
    produce_raw(&topic, "direct", "ingest", &orders(0, 10)).await;
    let live = spawn_processor_with(&e.topology, e.opts.clone()).await;
    expect_count(&e.pool, "SELECT count(*) FROM events", 10).await;
    live.stop().await;
    let out_topic = e.topology.event_topic("OrderPlaced");
    read_exactly(&kafka_bootstrap(), &out_topic, 10).await;
    let before: Vec<String> =
        sqlx::query_scalar("SELECT processed_at::text FROM events ORDER BY event_id")
            .fetch_all(&e.pool)
            .await
            .unwrap();

    run_ok(helios(
        &e,
        &["replay", "--topic", "direct", "--offsets", "direct:0:0-10"],
    ));
    let (outcome, _, counts) = last_history(&e.pool).await;
    assert_eq!(
        (
            outcome.as_str(),
            &counts["duplicates"],
            &counts["events_out"]
        ),
        ("completed", &json!(10), &json!(0))
    );
    let after: Vec<String> =
        sqlx::query_scalar("SELECT processed_at::text FROM events ORDER BY event_id")
            .fetch_all(&e.pool)
            .await
            .unwrap();
    assert_eq!(before, after, "respect-dedup replay changed rows");
    read_exactly(&kafka_bootstrap(), &out_topic, 10).await;

    // Pretend an older normalization wrote these rows; bypass puts today's back.
    sqlx::query("UPDATE events SET event_type = 'OldName', data = '{\"stale\": true}'::jsonb")
        .execute(&e.pool)
        .await
        .unwrap();
    run_ok(helios(
        &e,
        &["replay", "--offsets", "direct:0:0-10", "--dedup", "bypass"],
    ));
    let rows = sqlx::query("SELECT event_type, order_id, replay_id FROM events ORDER BY event_id")
        .fetch_all(&e.pool)
        .await
        .unwrap();
    assert_eq!(rows.len(), 10);
    let replay_id: String = rows[0].get(2);
    assert!(replay_id.starts_with("replay-"));
    for r in &rows {
        assert_eq!(r.get::<String, _>(0), "OrderPlaced");
        assert!(r.get::<Option<String>, _>(1).is_some());
        assert_eq!(r.get::<String, _>(2), replay_id);
    }
    let fan = read_exactly(&kafka_bootstrap(), &out_topic, 20).await;
    assert_eq!(
        fan.iter()
            .filter(|r| r.header("helios-replay-id") == Some(replay_id.as_str()))
            .count(),
        10
    );
}

#[tokio::test]
async fn dry_run_writes_nothing() {
    let e = env().await;
    let topic = e.topology.raw_topic(Source::Direct);
    let mut bodies = orders(0, 6);
    bodies.push(
        json!({"event_type": "OrderPlaced", "event_id": "bad", "data": {"order_id": "O"}})
            .to_string()
            .into_bytes(),
    );
    produce_raw(&topic, "direct", "ingest", &bodies).await;
    let out = run_ok(helios(
        &e,
        &["replay", "--offsets", "direct:0:0-7", "--dry-run"],
    ));
    assert!(out.contains("would be processed"), "{out}");
    let (outcome, dry, counts) = last_history(&e.pool).await;
    assert_eq!((outcome.as_str(), dry), ("completed", true));
    assert_eq!(counts["events_out"], 6);
    assert_eq!(counts["dlq_by_reason"]["missing_required_field"], 1);
    assert_eq!(count(&e.pool).await, 0, "no rows");
    read_exactly(
        &kafka_bootstrap(),
        &e.topology.event_topic("OrderPlaced"),
        0,
    )
    .await;
    read_exactly(&kafka_bootstrap(), &e.topology.dlq_topic(), 0).await;
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{}*", e.opts.dedup_prefix))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(keys.is_empty(), "no dedup marks: {keys:?}");
}

#[tokio::test]
async fn an_interrupted_replay_says_so_and_running_it_again_is_safe() {
    let e = env().await;
    let topic = e.topology.raw_topic(Source::Direct);
    produce_raw(&topic, "direct", "ingest", &orders(0, 120)).await;
    let mut child = helios(
        &e,
        &["replay", "--offsets", "direct:0:0-120", "--max-rate", "20"],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    // Wait until it has started processing, then interrupt it like an operator would (SIGINT).
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&e.pool).await == 0 {
        assert!(Instant::now() < deadline, "replay never started");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = child.wait().unwrap();
    assert!(!code.success(), "an interrupted replay exits non-zero");
    let (outcome, _, _) = last_history(&e.pool).await;
    assert_eq!(outcome, "interrupted");
    assert!(count(&e.pool).await < 120);
    run_ok(helios(&e, &["replay", "--offsets", "direct:0:0-120"]));
    assert_eq!(count(&e.pool).await, 120);
    let (outcome, _, _) = last_history(&e.pool).await;
    assert_eq!(outcome, "completed");
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM replay_history")
        .fetch_one(&e.pool)
        .await
        .unwrap();
    assert_eq!(runs, 2);
}

#[tokio::test]
async fn redrive_after_a_rule_fix_turns_dlq_records_into_events_and_failures_come_back_counted() {
    let e = env().await;
    let topic = e.topology.raw_topic(Source::Direct);
    let fixed_later =
        json!({"event_type": "OrderPlaced", "event_id": "fix-1", "data": {"order_id": "O-1"}});
    let still_bad =
        json!({"event_type": "InventoryReserved", "event_id": "bad-1", "data": {"sku": "S"}});
    produce_raw(
        &topic,
        "direct",
        "ingest",
        &[
            fixed_later.to_string().into_bytes(),
            still_bad.to_string().into_bytes(),
        ],
    )
    .await;
    let first = spawn_processor_with(&e.topology, e.opts.clone()).await;
    let dlq = read_records(
        &kafka_bootstrap(),
        &e.topology.dlq_topic(),
        2,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dlq.len(), 2);
    first.stop().await;

    let summary = run_ok(helios(&e, &["dlq", "summary"]));
    assert!(
        summary.contains("missing_required_field") && summary.contains("2"),
        "{summary}"
    );
    let list = run_ok(helios(
        &e,
        &["dlq", "list", "--reason", "missing_required_field"],
    ));
    assert!(
        list.contains("field=customer_id") && list.contains("field=order_id"),
        "{list}"
    );

    // The rule is fixed: OrderPlaced no longer needs customer_id.
    let mut fixed = e.topology.clone();
    fixed.event_types.get_mut("OrderPlaced").unwrap().required = vec!["order_id".into()];
    let second = spawn_processor_with(&fixed, e.opts.clone()).await;
    let out = run_ok(helios(
        &e,
        &["dlq", "redrive", "--reason", "missing_required_field"],
    ));
    assert!(out.contains("redriven 2"), "{out}");
    expect_count(&e.pool, "SELECT count(*) FROM events", 1).await;
    let id: String = sqlx::query_scalar("SELECT event_id FROM events")
        .fetch_one(&e.pool)
        .await
        .unwrap();
    assert_eq!(id, "fix-1");
    let dlq = read_records(
        &kafka_bootstrap(),
        &e.topology.dlq_topic(),
        3,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dlq.len(), 3, "the one that still fails is back in the DLQ");
    let back = &dlq[2];
    assert!(String::from_utf8_lossy(&back.value).contains("bad-1"));
    assert_eq!(back.header("helios-redrive-count"), Some("1"));
    // Running it again does not redrive the same DLQ records twice.
    let again = run_ok(helios(
        &e,
        &[
            "dlq",
            "redrive",
            "--reason",
            "missing_required_field",
            "--max-redrives",
            "1",
        ],
    ));
    assert!(
        again.contains("redriven 0, refused 1") && again.contains("skipped 2"),
        "{again}"
    );
    second.stop().await;
}
