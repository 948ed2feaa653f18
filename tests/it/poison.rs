//! Guarantee 5: a poison message never stalls a partition. Each hostile input is pushed through
//! the ingress (or produced straight into a raw topic, where the ingress itself would refuse it)
//! and followed by valid events on the same partition. Checked every time: the valid events are
//! stored and fanned out, the hostile one is in the DLQ with its reason (or stored faithfully,
//! where PostgreSQL can hold it), the processor never retried, and no event was fanned out twice.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use helios::source::Source;
use serde_json::json;

use crate::common::*;

const EB: &str = "/api/v1/webhooks/aws/eventbridge";
const EG: &str = "/api/v1/webhooks/azure/eventgrid";
const DIRECT: &str = "/api/v1/events/ingest";

/// An ingress and a processor on a fresh topology, store and dedup prefix.
struct Rig {
    app: TestApp,
    proc: TestProcessor,
    /// Ids of the valid events pushed so far.
    valid: Vec<String>,
}

impl Rig {
    async fn new() -> Rig {
        let app = spawn_app(|_| {}).await;
        let proc = spawn_processor(&app.topology).await;
        Rig {
            app,
            proc,
            valid: vec![],
        }
    }

    async fn push(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.app
            .client
            .post(self.app.url(path))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn push_ok(&self, path: &str, body: impl Into<reqwest::Body>) {
        let r = self.push(path, body).await;
        let s = r.status().as_u16();
        assert!(
            (200..300).contains(&s),
            "push answered {s}: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Pushes two valid OrderPlaced events through `path` (so onto the same raw partition as
    /// what came before them there).
    async fn valid_after(&mut self, path: &str) {
        for _ in 0..2 {
            let id = format!("ok-{}", self.valid.len());
            let order = format!("O-{id}");
            let body = match path {
                EB => json!({"version": "0", "id": id, "detail-type": "OrderPlaced", "source": "s",
                    "time": "2026-11-22T09:15:02Z", "detail": {"order_id": order, "customer_id": "C"}}),
                EG => json!([{"id": id, "eventType": "Contoso.Orders.OrderPlaced", "subject": "s",
                    "eventTime": "2026-11-22T09:18:00Z", "data": {"orderId": order, "customerId": "C"},
                    "dataVersion": "1", "metadataVersion": "1"}]),
                _ => json!({"event_type": "OrderPlaced", "event_id": id,
                    "data": {"order_id": order, "customer_id": "C"}}),
            };
            self.push_ok(path, body.to_string()).await;
            self.valid.push(id);
        }
    }

    /// Waits until every valid event is stored, then checks the common promises and returns
    /// the DLQ records (expecting exactly `dlq`).
    async fn settle(&self, dlq: usize) -> Vec<Record> {
        let pool = &self.proc.pool;
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id LIKE 'ok-%'")
                    .fetch_one(pool)
                    .await
                    .unwrap();
            if n as usize == self.valid.len() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "only {n} of {} valid events stored: the partition stalled",
                self.valid.len()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let bootstrap = &self.app.kafka.bootstrap_servers;
        let recs = read_exactly(bootstrap, &self.app.topology.dlq_topic(), dlq).await;
        assert_eq!(
            self.proc
                .stats
                .retries
                .load(std::sync::atomic::Ordering::Relaxed),
            0,
            "a poison record must never make the processor retry"
        );
        let out = read_records(
            bootstrap,
            &self.app.topology.event_topic("OrderPlaced"),
            10_000,
            Duration::from_secs(3),
        )
        .await;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for r in &out {
            *seen
                .entry(r.header("ce_id").unwrap().to_string())
                .or_default() += 1;
        }
        for id in &self.valid {
            assert_eq!(seen.get(id), Some(&1), "{id} fanned out once: {seen:?}");
        }
        assert!(
            seen.values().all(|n| *n == 1),
            "no event fanned out twice: {seen:?}"
        );
        // One truth: every stored row is on its topic, and nothing else is.
        let rows: Vec<String> =
            sqlx::query_scalar("SELECT event_id FROM events WHERE event_type = 'OrderPlaced'")
                .fetch_all(pool)
                .await
                .unwrap();
        let mut rows_sorted = rows.clone();
        rows_sorted.sort();
        assert_eq!(rows_sorted, seen.keys().cloned().collect::<Vec<_>>());
        recs
    }
}

fn dlq_of<'a>(recs: &'a [Record], needle: &str) -> &'a Record {
    recs.iter()
        .find(|r| String::from_utf8_lossy(&r.value).contains(needle))
        .unwrap_or_else(|| panic!("no DLQ record holds {needle}"))
}

fn reason(r: &Record) -> (&str, &str) {
    (
        r.header("helios-dlq-reason").unwrap_or("-"),
        r.header("helios-dlq-stage").unwrap_or("-"),
    )
}

#[tokio::test]
async fn characters_postgres_cannot_hold_and_unrepresentable_json_go_to_the_dlq() {
    let mut rig = Rig::new().await;
    // U+0000 in the payload (EventBridge), and in an Event Grid subject (metadata).
    let nul_data = r#"{"version":"0","id":"nul-data","detail-type":"OrderPlaced","source":"s","detail":{"order_id":"O-n","customer_id":"C","note":"a\u0000b"}}"#;
    rig.push_ok(EB, nul_data).await;
    // A lone surrogate and a number no double can hold: well-formed JSON, not representable.
    let surrogate = r#"{"version":"0","id":"lone-surrogate","detail-type":"OrderPlaced","detail":{"order_id":"\ud800","customer_id":"C"}}"#;
    rig.push_ok(EB, surrogate).await;
    let huge_number = r#"{"event_type":"OrderPlaced","event_id":"huge-number","data":{"order_id":"O","customer_id":"C","amount":1e400}}"#;
    rig.push_ok(DIRECT, huge_number).await;
    rig.valid_after(EB).await;
    rig.valid_after(DIRECT).await;
    let nul_subject = r#"[{"id":"nul-subject","eventType":"Contoso.Orders.OrderPlaced","subject":"orders/\u0000","eventTime":"2026-11-22T09:18:00Z","data":{"orderId":"O-s","customerId":"C"},"dataVersion":"1","metadataVersion":"1"}]"#;
    rig.push_ok(EG, nul_subject).await;
    rig.valid_after(EG).await;

    let dlq = rig.settle(4).await;
    let r = dlq_of(&dlq, "nul-data");
    assert_eq!(reason(r), ("sink_rejected", "store"));
    assert_eq!(r.header("helios-dlq-sink-code"), Some("22P05"));
    assert!(r.header("helios-dlq-detail").unwrap().contains("data.note"));
    let r = dlq_of(&dlq, "nul-subject");
    assert_eq!(reason(r), ("sink_rejected", "store"));
    assert!(r
        .header("helios-dlq-detail")
        .unwrap()
        .contains("metadata.subject"));
    assert_eq!(
        reason(dlq_of(&dlq, "lone-surrogate")),
        ("invalid_json", "parse")
    );
    assert_eq!(
        reason(dlq_of(&dlq, "huge-number")),
        ("invalid_json", "parse")
    );
    // Each DLQ record is the raw record unchanged, byte for byte.
    assert_eq!(dlq_of(&dlq, "nul-data").value, nul_data.as_bytes());
}

#[tokio::test]
async fn ids_and_keys_postgres_cannot_index_go_to_the_dlq() {
    let mut rig = Rig::new().await;
    let long = "x".repeat(3200);
    let bodies = [
        json!({"event_type": "OrderPlaced", "event_id": long, "data": {"order_id": "O", "customer_id": "C"}}),
        json!({"event_type": "OrderPlaced", "event_id": "long-order", "data": {"order_id": long, "customer_id": "C"}}),
        json!({"event_type": "OrderPlaced", "event_id": "object-order", "data": {"orderId": {"id": 1}, "customer_id": "C"}}),
    ];
    for b in &bodies {
        rig.push_ok(DIRECT, b.to_string()).await;
    }
    rig.valid_after(DIRECT).await;
    let dlq = rig.settle(3).await;
    let r = dlq_of(&dlq, &format!("\"event_id\":\"{long}\""));
    assert_eq!(reason(r), ("sink_rejected", "store"));
    assert_eq!(r.header("helios-dlq-field"), Some("event_id"));
    assert_eq!(r.header("helios-dlq-sink-code"), Some("54000"));
    let r = dlq_of(&dlq, "long-order");
    assert_eq!(reason(r), ("sink_rejected", "store"));
    assert_eq!(r.header("helios-dlq-field"), Some("order_id"));
    let r = dlq_of(&dlq, "object-order");
    assert_eq!(reason(r), ("invalid_payload", "validate"));
    assert_eq!(r.header("helios-dlq-field"), Some("orderId"));
}

#[tokio::test]
async fn large_records_are_stored_whole_or_dead_lettered_with_bounded_headers() {
    let mut rig = Rig::new().await;
    // A valid event of 1,020,000 bytes: under the body limit, so it is stored and fanned out.
    let filler = "f".repeat(1_020_000 - 200);
    let big = json!({"version": "0", "id": "ok-big", "detail-type": "OrderPlaced", "source": "s",
        "detail": {"order_id": "O-big", "customer_id": "C", "filler": filler}})
    .to_string();
    assert!(
        big.len() > 1_019_000 && big.len() <= 1_020_000,
        "{}",
        big.len()
    );
    rig.push_ok(EB, big).await;
    rig.valid.push("ok-big".into());
    // A 600,000-character event type: dead-lettered, and the header echoing it stays short.
    let long_type = json!({"event_type": "T".repeat(600_000), "event_id": "long-type", "data": {}});
    rig.push_ok(DIRECT, long_type.to_string()).await;
    // 300 KB of empty objects: 100,000 failing events, one DLQ record.
    let empties = format!("[{}]", vec!["{}"; 100_000].join(","));
    rig.push_ok(DIRECT, empties.clone()).await;
    rig.valid_after(DIRECT).await;
    rig.valid_after(EB).await;

    let dlq = rig.settle(2).await;
    let stored: i32 =
        sqlx::query_scalar("SELECT length(data->>'filler') FROM events WHERE event_id = 'ok-big'")
            .fetch_one(&rig.proc.pool)
            .await
            .unwrap();
    assert_eq!(stored as usize, 1_020_000 - 200);

    let r = dlq_of(&dlq, "long-type");
    assert_eq!(reason(r), ("missing_event_type", "normalize"));
    assert!(r.header("helios-dlq-detail").unwrap().len() <= 1024);
    let r = dlq
        .iter()
        .find(|r| r.value.len() == empties.len())
        .expect("the array's DLQ record");
    assert_eq!(r.header("helios-dlq-failed-count"), Some("100000"));
    let header_bytes: usize = r.headers.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(
        header_bytes < 16 * 1024,
        "DLQ headers of {header_bytes} bytes"
    );
    let (_, units, out, dups, dlq_units) = rig.proc.stats.snapshot();
    assert_eq!(units, out + dups + dlq_units, "invariant");
    assert!(dlq_units >= 100_001);
}

#[tokio::test]
async fn a_raw_record_over_the_output_limit_becomes_a_reference_record() {
    // Produced straight into the raw topic (the topic allows 2 MiB; the ingress would 413 it):
    // its fan-out record is too large, and so is its DLQ copy.
    let mut rig = Rig::new().await;
    let body = json!({"event_type": "OrderPlaced", "event_id": "too-big",
        "data": {"order_id": "O", "customer_id": "C", "filler": "z".repeat(1_500_000)}})
    .to_string()
    .into_bytes();
    produce_raw(
        &rig.app.raw_topic(Source::Direct),
        "direct",
        "ingest",
        std::slice::from_ref(&body),
    )
    .await;
    rig.valid_after(DIRECT).await;
    let dlq = rig.settle(1).await;
    let r = &dlq[0];
    assert_eq!(reason(r), ("too_large", "dlq"));
    assert_eq!(r.header("helios-dlq-original-reason"), Some("too_large"));
    assert!(r.value.is_empty(), "a reference record carries no value");
    assert_eq!(r.header("helios-dlq-raw-offset"), Some("0"));
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = 'too-big'")
        .fetch_one(&rig.proc.pool)
        .await
        .unwrap();
    assert_eq!(stored, 0, "not on its topic, so not in PostgreSQL");
}

#[tokio::test]
async fn a_mixed_event_grid_delivery_is_validated_and_keeps_its_events() {
    let mut rig = Rig::new().await;
    let mixed = json!([
        {"id": "v-1", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "subject": "",
         "eventTime": "2026-11-22T09:18:00Z", "data": {"validationCode": "CODE-42"}, "dataVersion": "1", "metadataVersion": "1"},
        {"id": "ok-mixed", "eventType": "Contoso.Orders.OrderPlaced", "subject": "s",
         "eventTime": "2026-11-22T09:18:00Z", "data": {"orderId": "O-m", "customerId": "C"}, "dataVersion": "1", "metadataVersion": "1"}
    ]);
    // A validation delivery (Event Grid says so in aeg-event-type) that also carries an event.
    let r = rig
        .app
        .client
        .post(rig.app.url(EG))
        .header("content-type", "application/json")
        .header("aeg-event-type", "SubscriptionValidation")
        .body(mixed.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["validationResponse"], "CODE-42");
    rig.valid.push("ok-mixed".into());
    rig.valid_after(EG).await;
    rig.settle(0).await;
    assert_eq!(
        rig.proc
            .stats
            .handshakes
            .load(std::sync::atomic::Ordering::Relaxed),
        1,
        "the validation event is counted as a handshake"
    );
}

#[tokio::test]
async fn a_corrected_resend_of_a_dead_lettered_event_is_stored() {
    let mut rig = Rig::new().await;
    // Missing customer_id: DLQ. The same id again, corrected: stored (no dedup mark was kept).
    let bad =
        json!({"event_type": "OrderPlaced", "event_id": "ok-resend", "data": {"order_id": "O-r"}});
    rig.push_ok(DIRECT, bad.to_string()).await;
    rig.valid_after(DIRECT).await;
    // Wait for the bad one to be processed before resending.
    read_records(
        &kafka_bootstrap(),
        &rig.app.topology.dlq_topic(),
        1,
        Duration::from_secs(60),
    )
    .await;
    let good = json!({"event_type": "OrderPlaced", "event_id": "ok-resend", "data": {"order_id": "O-r", "customer_id": "C"}});
    rig.push_ok(DIRECT, good.to_string()).await;
    rig.valid.push("ok-resend".into());
    let dlq = rig.settle(1).await;
    assert_eq!(reason(&dlq[0]), ("missing_required_field", "validate"));
}

#[tokio::test]
async fn a_redriven_direct_array_stores_each_of_its_events_once() {
    let topology = applied_topology(|_| {}).await;
    let opts = ProcOpts::default();
    // Events without ids get ids derived from their raw record's position; one sibling fails.
    let array = json!([
        {"event_type": "OrderPlaced", "data": {"order_id": "O-a", "customer_id": "C"}},
        {"event_type": "OrderPlaced", "data": {"order_id": "O-b"}},
        {"event_type": "OrderPlaced", "data": {"order_id": "O-c", "customer_id": "C"}}
    ]);
    produce_raw(
        &topology.raw_topic(Source::Direct),
        "direct",
        "ingest",
        &[array.to_string().into_bytes()],
    )
    .await;
    let first = spawn_processor_with(&topology, opts.clone()).await;
    let pool = first.pool.clone();
    expect_count(&pool, "SELECT count(*) FROM events", 2).await;
    let dlq = read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 1).await;
    assert_eq!(dlq[0].header("helios-dlq-event-index"), Some("1"));
    first.stop().await;

    // After the rule is relaxed, the DLQ record is redriven: the failing sibling is stored,
    // the two stored ones are recognised (same derived ids) and not stored or fanned out again.
    let mut fixed = topology.clone();
    fixed.event_types.get_mut("OrderPlaced").unwrap().required = vec!["order_id".into()];
    let second = spawn_processor_with(&fixed, opts.clone()).await;
    let out = run_ok(helios_cli(
        &topology,
        &opts,
        &["dlq", "redrive", "--reason", "missing_required_field"],
    ));
    assert!(out.contains("redriven 1"), "{out}");
    expect_count(&pool, "SELECT count(*) FROM events", 3).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events ORDER BY raw_index")
        .fetch_all(&pool)
        .await
        .unwrap();
    let origin = format!("raw-{}/0/0", topology.raw_topic(Source::Direct));
    assert_eq!(
        ids,
        [
            format!("{origin}/0"),
            format!("{origin}/1"),
            format!("{origin}/2")
        ]
    );
    // Wait for the redriven copy to be committed, then: three fan-out records, one each.
    let deadline = Instant::now() + Duration::from_secs(60);
    while second
        .stats
        .raw_records
        .load(std::sync::atomic::Ordering::Relaxed)
        < 1
    {
        assert!(
            Instant::now() < deadline,
            "the redriven record was not processed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let fanned = read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 3).await;
    let mut ce: Vec<String> = fanned
        .iter()
        .map(|r| r.header("ce_id").unwrap().to_string())
        .collect();
    ce.sort();
    assert_eq!(ce, ids);
    assert_eq!(
        second.stats.snapshot().3,
        2,
        "the stored siblings count as duplicates"
    );
    second.stop().await;
}

#[tokio::test]
async fn a_refusal_the_guards_do_not_predict_is_isolated_by_splitting_the_batch() {
    // An operator's CHECK constraint refuses some ids: PostgreSQL says so (SQLSTATE 23514),
    // the processor splits the batch until it finds exactly those, stores the rest.
    let topology = applied_topology(|_| {}).await;
    let opts = ProcOpts::default();
    let pool = helios::db::connect(&database_url(), Some(&opts.schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    sqlx::query("ALTER TABLE events ADD CONSTRAINT no_poison CHECK (event_id NOT LIKE 'poison-%')")
        .execute(&pool)
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..60)
        .map(|i| {
            let id = if i == 17 || i == 41 { format!("poison-{i}") } else { format!("ok-{i}") };
            json!({"event_type": "OrderPlaced", "event_id": id, "data": {"order_id": format!("O-{i}"), "customer_id": "C"}})
                .to_string()
                .into_bytes()
        })
        .collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    let proc = spawn_processor_with(&topology, opts).await;
    expect_count(&pool, "SELECT count(*) FROM events", 58).await;
    let dlq = read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 2).await;
    for r in &dlq {
        assert_eq!(reason(r), ("sink_rejected", "store"));
        assert_eq!(r.header("helios-dlq-sink-code"), Some("23514"));
    }
    let out = read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 58).await;
    assert!(out
        .iter()
        .all(|r| r.header("ce_id").unwrap().starts_with("ok-")));
    assert_eq!(
        proc.stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    proc.stop().await;
}

#[tokio::test]
async fn a_postgres_outage_longer_than_max_poll_interval_causes_no_rebalance_and_no_duplicate() {
    let topology = applied_topology(|_| {}).await;
    let pg = FlakyProxy::start("127.0.0.1:5432".parse().unwrap()).await;
    let schema = unique_schema();
    let direct = helios::db::connect(&database_url(), Some(&schema))
        .await
        .unwrap();
    let opts = ProcOpts {
        schema,
        database_url: database_url().replace("127.0.0.1:5432", &pg.addr.to_string()),
        kafka_properties: vec![
            ("session.timeout.ms".into(), "6000".into()),
            ("max.poll.interval.ms".into(), "7000".into()),
        ],
        ..ProcOpts::default()
    };
    let proc = spawn_processor_with(&topology, opts).await;
    let events = |from: usize, to: usize| -> Vec<Vec<u8>> {
        (from..to)
            .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("o-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
            .collect()
    };
    produce_direct_to(&kafka_bootstrap(), &topology, &events(0, 10)).await;
    expect_count(&direct, "SELECT count(*) FROM events", 10).await;
    let rebalances = proc
        .stats
        .rebalances
        .load(std::sync::atomic::Ordering::Relaxed);

    pg.set_down(true);
    produce_direct_to(&kafka_bootstrap(), &topology, &events(10, 20)).await;
    // Down for twice max.poll.interval.ms: the batch is retried with the consumer polling.
    let deadline = Instant::now() + Duration::from_secs(14);
    while Instant::now() < deadline {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
            .fetch_one(&direct)
            .await
            .unwrap();
        assert_eq!(n, 10, "nothing can be stored while PostgreSQL is down");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        proc.stats
            .retries
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
    pg.set_down(false);
    expect_count(&direct, "SELECT count(*) FROM events", 20).await;
    assert_eq!(
        proc.stats
            .rebalances
            .load(std::sync::atomic::Ordering::Relaxed),
        rebalances,
        "the instance stayed in the group through the outage"
    );
    let out = read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 20).await;
    let mut ids: Vec<&str> = out.iter().map(|r| r.header("ce_id").unwrap()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(
        ids.len(),
        20,
        "each event fanned out once, retries included"
    );
    proc.stop().await;
}

#[tokio::test]
async fn a_batch_of_large_records_stays_under_the_byte_budget() {
    // 80 records of ~900 KB in one partition, batches of up to 1000 records but 4 MiB: the
    // processor (the binary) must never hold more than a few of them at once.
    let topology = applied_topology(|_| {}).await;
    let bodies: Vec<Vec<u8>> = (0..80)
        .map(|i| {
            json!({"event_type": "OrderPlaced", "event_id": format!("big-{i}"),
                "data": {"order_id": format!("O-{i}"), "customer_id": "C", "filler": "b".repeat(900_000)}})
            .to_string()
            .into_bytes()
        })
        .collect();
    for chunk in bodies.chunks(10) {
        produce_direct_to(&kafka_bootstrap(), &topology, chunk).await;
    }
    let (schema, prefix, pool) = scratch_store().await;
    let mut child = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_BATCH_SIZE", "1000")
        .env("HELIOS_BATCH_MAX_BYTES", (4 * 1024 * 1024).to_string())
        .spawn()
        .expect("helios process");
    let n = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        80,
        Duration::from_secs(180),
    )
    .await;
    let status = std::fs::read_to_string(format!("/proc/{}/status", child.id())).unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(n, 80);
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    eprintln!(
        "peak RSS of helios process over 80 x 900 KB records: {} MiB",
        peak_kb / 1024
    );
    // Measured here: 116–117 MiB with the 4 MiB budget (129–135 here and 144 on CI when the next
    // batch was polled and parsed while deliveries holding 3.6 MB were still in flight), ~190 MiB
    // without a budget (then a batch holds whatever the 16 MiB prefetch queue delivers, several
    // copies of each record).
    assert!(
        peak_kb < 140 * 1024,
        "peak RSS {} MiB: the batch byte budget did not bound memory",
        peak_kb / 1024
    );
}
