//! Overlapping deliveries (`HELIOS_DELIVERIES_IN_FLIGHT`, 2 by default): batch N+1 is written
//! to PostgreSQL while batch N fans out, and fans out only after N's delivery ended. Batch N is
//! held at its fan-out by a failpoint (`deliver.before_fanout:<group>`) until the test has seen
//! N+1's rows, then let go — or made to fail.

use std::time::{Duration, Instant};

use helios::failpoint::Release;
use serde_json::json;

use crate::common::*;

/// 50 events in batch N, 50 in batch N+1, event `i` and `i + 50` of the same order; with
/// `refused`, event 10 of N is refused by PostgreSQL (a trigger: check_violation) and N+1's
/// event 60 is a corrected copy of it (same event id).
fn two_batches(tag: &str, refused: bool) -> Vec<Vec<u8>> {
    (0..100)
        .map(|i| {
            let order = format!("O-{tag}-{}", i % 50);
            let (id, bad) = match (refused, i) {
                (true, 10) => (format!("{tag}-twice"), "yes"),
                (true, 60) => (format!("{tag}-twice"), "no"),
                _ => (format!("{tag}-{i}"), "no"),
            };
            json!({"event_type": "OrderPlaced", "event_id": id,
                "data": {"order_id": order, "customer_id": "C", "bad": bad, "i": i}})
            .to_string()
            .into_bytes()
        })
        .collect()
}

/// A processor (batches of 50) on a migrated schema, with `sql` run on it before it starts.
async fn processor_on(
    topology: &helios::topology::Topology,
    sql: &[&'static str],
) -> TestProcessor {
    let opts = ProcOpts {
        batch_records: 50,
        ..ProcOpts::default()
    };
    let pool = helios::db::connect(&opts.database_url, Some(&opts.schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    for s in sql {
        sqlx::query(*s).execute(&pool).await.unwrap();
    }
    spawn_processor_with(topology, opts).await
}

fn refuse_bad() -> [&'static str; 2] {
    [
        "CREATE FUNCTION no_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data->>'bad' = 'yes' THEN RAISE EXCEPTION 'bad row' USING ERRCODE = 'check_violation'; END IF;
           RETURN NEW; END $$",
        "CREATE TRIGGER no_bad BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION no_bad()",
    ]
}

/// Waits until batch N is held before its fan-out and `rows` events are stored (N's and N+1's:
/// N+1 was written while N waited), and checks nothing is on the fan-out topic yet.
async fn held_with_rows(
    p: &TestProcessor,
    topology: &helios::topology::Topology,
    point: &str,
    rows: i64,
) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !helios::failpoint::is_held(point) {
        assert!(Instant::now() < deadline, "no delivery reached {point}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stored = wait_count(
        &p.pool,
        "SELECT count(*) FROM events",
        rows,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        stored, rows,
        "batch N+1 is written to PostgreSQL while batch N waits before its fan-out"
    );
    let reader = helios::kafka::reader(
        &helios::config::KafkaSettings::new(kafka_bootstrap()),
        "overlap-test",
    )
    .unwrap();
    let (_, high) = rdkafka::consumer::Consumer::fetch_watermarks(
        &reader,
        &topology.event_topic("OrderPlaced"),
        0,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(
        high, 0,
        "nothing is fanned out while the first batch waits: batch N+1 fans out after it"
    );
}

/// Each order's event of batch N comes before its event of batch N+1 on the topic, and each
/// event id is there once.
fn assert_in_order_once(out: &[Record], tag: &str) {
    let mut seen = std::collections::HashSet::new();
    let mut first_of_order = std::collections::HashMap::new();
    for r in out {
        let id = r.header("ce_id").unwrap().to_string();
        assert!(seen.insert(id.clone()), "{id} fanned out twice");
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        let i = v["data"]["i"].as_u64().unwrap();
        let order = v["data"]["order_id"].as_str().unwrap().to_string();
        if i < 50 {
            assert!(
                first_of_order.insert(order.clone(), r.offset).is_none(),
                "{order}"
            );
        } else if let Some(first) = first_of_order.get(&order) {
            assert!(*first < r.offset, "{order}: N+1's event before N's");
        } else {
            // Only the corrected copy's order has no event of N on the topic (N's was refused).
            assert_eq!(
                id,
                format!("{tag}-twice"),
                "{order}: N+1's event before N's"
            );
        }
    }
}

/// The processor's counts once all 100 raw records are counted (raw, units, out, dup, dlq).
async fn counted(p: &TestProcessor) -> (u64, u64, u64, u64, u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while p.stats.snapshot().0 < 100 {
        assert!(Instant::now() < deadline, "not every record was counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stats.snapshot()
}

#[tokio::test]
async fn a_batch_is_written_while_the_one_before_fans_out_and_takes_over_its_refused_event() {
    let topology = applied_topology(|_| {}).await;
    let point = format!("deliver.before_fanout:{}", topology.consumer_group);
    helios::failpoint::arm_hold(&point);
    produce_direct_to(&kafka_bootstrap(), &topology, &two_batches("ov", true)).await;
    let p = processor_on(&topology, &refuse_bad()).await;
    // N: 49 stored (its copy of `ov-twice` refused); N+1: 49 stored, its copy of `ov-twice`
    // held aside as a duplicate of N's (whose mark N still owns).
    held_with_rows(&p, &topology, &point, 98).await;
    helios::failpoint::release(&point, Release::Go);
    // N dead-letters its copy and releases the mark; N+1 takes it at its gate and goes through.
    expect_count(&p.pool, "SELECT count(*) FROM events", 99).await;
    let bad: String =
        sqlx::query_scalar("SELECT data->>'bad' FROM events WHERE event_id = 'ov-twice'")
            .fetch_one(&p.pool)
            .await
            .unwrap();
    assert_eq!(
        bad, "no",
        "the corrected copy of batch N+1 is the one stored"
    );
    let out = read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 99).await;
    assert_in_order_once(&out, "ov");
    let dlq = read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 1).await;
    assert_eq!(dlq[0].header("helios-dlq-sink-code"), Some("23514"));
    assert_eq!(counted(&p).await, (100, 100, 99, 0, 1));
    p.stop().await;
}

#[tokio::test]
async fn a_batch_overlapping_one_that_fails_is_given_up_with_it_and_both_are_delivered_once() {
    let topology = applied_topology(|_| {}).await;
    let point = format!("deliver.before_fanout:{}", topology.consumer_group);
    helios::failpoint::arm_hold(&point);
    produce_direct_to(&kafka_bootstrap(), &topology, &two_batches("ovf", false)).await;
    let p = processor_on(&topology, &[]).await;
    held_with_rows(&p, &topology, &point, 100).await;
    // N's delivery panics before its fan-out: N+1, waiting at its gate, is given up with it;
    // both partitions' records are read again from N's first and delivered (rows found again
    // with their own lineage, fanned out then), each once and in order.
    helios::failpoint::release(&point, Release::Panic);
    let out = read_exactly(
        &kafka_bootstrap(),
        &topology.event_topic("OrderPlaced"),
        100,
    )
    .await;
    assert_in_order_once(&out, "ovf");
    expect_count(&p.pool, "SELECT count(*) FROM events", 100).await;
    // Counted once each: a batch given up counts nothing (its records are read again).
    assert_eq!(counted(&p).await, (100, 100, 100, 0, 0));
    p.stop().await;
}
