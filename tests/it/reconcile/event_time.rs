//! Event time after an outage: what holds it back (the slowest cloud, the processor's raw
//! backlog), what it trusts (reception time over a clock too far ahead), retractions, the outbox
//! (topic and table agree across a crash), and flows as users write them (terminal, optional and
//! relative steps, field checks), and bounded state (the open-instance cap, results retention).

use super::*;

/// A fresh topology with one flow (`yaml`) and `extra` event types declared.
async fn topology_with(yaml: &str, extra: &[&str]) -> Topology {
    let yaml = yaml.to_string();
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    applied_topology(move |t| {
        t.event_topics.partitions = 1;
        for e in &extra {
            t.event_types.insert(
                e.clone(),
                serde_norway::from_str("required: [order_id]").unwrap(),
            );
        }
        t.flows.clear();
        t.flows.insert(
            "order_lifecycle".into(),
            serde_norway::from_str(&yaml).unwrap(),
        );
        t.reconciler_group = format!("{}helios-reconciler", t.topic_prefix);
    })
    .await
}

async fn watermark_held_by(pool: &sqlx::PgPool) -> Vec<String> {
    sqlx::query_scalar("SELECT held_by FROM reconcile_watermarks")
        .fetch_all(pool)
        .await
        .unwrap_or_default()
}

#[tokio::test]
async fn steps_acknowledged_during_a_sink_outage_longer_than_the_deadline_are_not_missing() {
    let topology = topology_with(
        "steps: [OrderPlaced, {PaymentProcessed: {within: 10s}}, {InventoryReserved: {within: 10s}}]\nallowed_lateness: 1s",
        &[],
    )
    .await;
    let opts = ProcOpts::default();
    let proc = spawn_processor_with(&topology, opts.clone()).await;
    // Idle after 2 s: without the backlog, wall-clock time would fire the deadlines mid-outage.
    let rec = spawn_reconciler(&topology, &opts.schema, Duration::from_secs(2)).await;
    let t = Utc::now();
    let body = |ty: &str, id: &str, at: DateTime<Utc>, data: serde_json::Value| {
        json!({"event_type": ty, "event_id": id, "occurred_at": at.to_rfc3339(), "data": data})
            .to_string()
            .into_bytes()
    };
    produce_direct_to(
        &kafka_bootstrap(),
        &topology,
        &[body(
            "OrderPlaced",
            "so-1",
            t,
            json!({"order_id": "SO-1", "customer_id": "C"}),
        )],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sqlx::query_scalar::<_, i64>("SELECT count(*) FROM flow_state WHERE flow_key = 'SO-1'")
        .fetch_one(&rec.pool)
        .await
        .unwrap_or(0)
        == 0
    {
        assert!(
            Instant::now() < deadline,
            "the first step never reached the reconciler"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The sink goes away (the processor retries, guarantee 5); the other two steps are
    // acknowledged (landed in the raw topic) a second later, well before their deadline.
    sqlx::query("ALTER TABLE events RENAME TO events_away")
        .execute(&proc.pool)
        .await
        .unwrap();
    produce_direct_to(
        &kafka_bootstrap(),
        &topology,
        &[
            body(
                "PaymentProcessed",
                "so-2",
                t + chrono::Duration::seconds(1),
                json!({"order_id": "SO-1", "amount": 5}),
            ),
            body(
                "InventoryReserved",
                "so-3",
                t + chrono::Duration::seconds(2),
                json!({"order_id": "SO-1"}),
            ),
        ],
    )
    .await;
    // The outage lasts past deadline + lateness + idle window (10 + 1 + 2 s) with margin:
    // nothing may be reported meanwhile, and event time says why it waits.
    let mut held_by_backlog = false;
    while Utc::now() < t + chrono::Duration::seconds(18) {
        assert_eq!(
            outcomes_of(&rec.pool, "SO-1").await,
            BTreeSet::new(),
            "an outcome during the outage"
        );
        held_by_backlog |= watermark_held_by(&rec.pool)
            .await
            .iter()
            .any(|h| h.contains("raw backlog"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        held_by_backlog,
        "the watermark was never shown held by the raw backlog: {:?}",
        watermark_held_by(&rec.pool).await
    );
    sqlx::query("ALTER TABLE events_away RENAME TO events")
        .execute(&proc.pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while outcomes_of(&rec.pool, "SO-1").await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "SO-1 never completed after the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "SO-1").await,
        set(&[("completed", "", false)])
    );
    rec.stop().await;
    proc.stop().await;
}

#[tokio::test]
async fn a_cloud_delayed_past_another_clouds_newer_events_causes_no_false_missing() {
    let topology = flow_topology(1).await;
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    let t0 = t0();
    // GCP delivers payments and reservations (X-1 at t0); D-1 is placed through AWS at t0.
    let mut steps: Vec<(String, &str, String, String, i64)> = vec![
        ("OrderPlaced".into(), "aws", "x-1".into(), "X-1".into(), 0),
        (
            "PaymentProcessed".into(),
            "gcp",
            "x-2".into(),
            "X-1".into(),
            0,
        ),
        (
            "InventoryReserved".into(),
            "gcp",
            "x-3".into(),
            "X-1".into(),
            0,
        ),
        ("OrderPlaced".into(), "aws", "d-1".into(), "D-1".into(), 0),
    ];
    // Then GCP retries (HELIOS answered 503): AWS goes on, ten minutes past D-1's deadlines.
    for i in 0..20 {
        steps.push((
            "OrderPlaced".into(),
            "aws",
            format!("f-{i}"),
            format!("F-{i}"),
            30 * (i + 1),
        ));
    }
    let list: Vec<Step<'_>> = steps
        .iter()
        .map(|(t, c, id, k, at)| (t.as_str(), *c, id.as_str(), k.as_str(), *at))
        .collect();
    produce_steps(&topology, t0, &list).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.stats.events.load(std::sync::atomic::Ordering::Relaxed) < list.len() as u64
        || !watermark_held_by(&rec.pool)
            .await
            .iter()
            .any(|h| h.contains("gcp"))
    {
        assert!(
            Instant::now() < deadline,
            "the AWS traffic was not counted, or the watermark not held by gcp: {:?}",
            watermark_held_by(&rec.pool).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        outcomes_of(&rec.pool, "D-1").await,
        BTreeSet::new(),
        "D-1 reported while GCP was retrying"
    );
    // GCP's retry comes through, stamped well within D-1's deadlines.
    produce_steps(
        &topology,
        t0,
        &[
            ("PaymentProcessed", "gcp", "d-2", "D-1", 40),
            ("InventoryReserved", "gcp", "d-3", "D-1", 90),
        ],
    )
    .await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&rec.pool).await;
    assert_eq!(
        outcomes_of(&rec.pool, "D-1").await,
        set(&[("completed", "", false)])
    );
    rec.stop().await;
}

#[tokio::test]
async fn an_event_stamped_2099_does_not_poison_its_partition() {
    let topology = flow_topology(1).await;
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    let t0 = t0();
    let year_2099 = (DateTime::parse_from_rfc3339("2099-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
        - t0)
        .num_seconds();
    // The 2099 event, and eight orders placed after it, counted before their other steps come:
    // were event time taken from 2099, their deadlines would fire the moment they are read.
    let mut placed: Vec<(String, String, i64)> = vec![("fp-1".into(), "FP-1".into(), year_2099)];
    let mut rest: Vec<(String, String, String, i64)> = vec![];
    for i in 0..8 {
        let k = format!("G-{i}");
        let at = i;
        placed.push((format!("g{i}-1"), k.clone(), at));
        rest.push((
            "PaymentProcessed".into(),
            format!("g{i}-2"),
            k.clone(),
            at + 20,
        ));
        rest.push((
            "InventoryReserved".into(),
            format!("g{i}-3"),
            k.clone(),
            at + 40,
        ));
    }
    // Each received at its event time (history two hours back); the 2099 one at t0 + 5 s.
    produce_received(
        &topology,
        t0,
        &[("OrderPlaced", "aws", "fp-1", "FP-1", year_2099)],
        t0 + chrono::Duration::seconds(5),
    )
    .await;
    for (id, k, at) in &placed[1..] {
        produce_received(
            &topology,
            t0,
            &[("OrderPlaced", "aws", id.as_str(), k.as_str(), *at)],
            t0 + chrono::Duration::seconds(*at),
        )
        .await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.stats.events.load(std::sync::atomic::Ordering::Relaxed) < 9 {
        assert!(Instant::now() < deadline, "the orders were never counted");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let list: Vec<Step<'_>> = rest
        .iter()
        .map(|(t, id, k, at)| (t.as_str(), "gcp", id.as_str(), k.as_str(), *at))
        .collect();
    produce_steps(&topology, t0, &list).await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&rec.pool).await;
    for i in 0..8 {
        assert_eq!(
            outcomes_of(&rec.pool, &format!("G-{i}")).await,
            set(&[("completed", "", false)]),
            "G-{i}"
        );
    }
    // The 2099 event counted at its reception, its claim kept and flagged.
    let state: serde_json::Value =
        sqlx::query_scalar("SELECT state::jsonb FROM flow_state WHERE flow_key = 'FP-1'")
            .fetch_one(&rec.pool)
            .await
            .unwrap();
    let s = &state["sightings"][0];
    assert!(
        s["untrusted_occurred_at"]
            .as_str()
            .unwrap()
            .starts_with("2099-01-01"),
        "{state}"
    );
    let counted = DateTime::parse_from_rfc3339(s["occurred_at"].as_str().unwrap()).unwrap();
    assert_eq!(counted, t0 + chrono::Duration::seconds(5), "{state}");
    // Nothing stored ahead of the wall clock for the next owner to take over.
    let ahead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM reconcile_sources WHERE newest_event_time > now() + interval '1 minute'",
    )
    .fetch_one(&rec.pool)
    .await
    .unwrap();
    assert_eq!(ahead, 0);
    rec.stop().await;
}

/// Outcome rows not published yet: above their partition's outbox mark.
#[cfg(feature = "failpoints")]
const ABOVE_THE_MARKS: &str = "SELECT count(*) FROM reconciliation_results r
     LEFT JOIN reconcile_outbox o ON o.part = r.part WHERE r.id > COALESCE(o.published_through, 0)";

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn a_crash_between_the_outcome_write_and_its_publication_leaves_topic_and_table_agreeing() {
    let topology = flow_topology(1).await;
    let schema = unique_schema();
    let out_topic = topology.reconciliation_topic();
    // Every publication fails, as a process killed right after its transaction would leave it.
    helios::failpoint::arm(&format!("reconcile.publish:{out_topic}"), u64::MAX);
    let first = spawn_reconciler(&topology, &schema, HOUR).await;
    let t0 = t0();
    produce_steps(
        &topology,
        t0,
        &[
            ("OrderPlaced", "aws", "cw-1", "CW-1", 0),
            ("PaymentProcessed", "gcp", "cw-2", "CW-1", 10),
            ("InventoryReserved", "azure", "cw-3", "CW-1", 20),
            ("OrderPlaced", "aws", "cx-1", "CX-1", 0),
        ],
    )
    .await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&first.pool).await;
    let unpublished: i64 = sqlx::query_scalar(ABOVE_THE_MARKS)
        .fetch_one(&first.pool)
        .await
        .unwrap();
    assert!(unpublished >= 4, "{unpublished} unpublished");
    first.stop().await;
    read_exactly(&kafka_bootstrap(), &out_topic, 0).await;
    // The next instance takes the partition over and publishes from the rows.
    helios::failpoint::arm(&format!("reconcile.publish:{out_topic}"), 0);
    let second = spawn_reconciler(&topology, &schema, HOUR).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar(ABOVE_THE_MARKS)
            .fetch_one(&second.pool)
            .await
            .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} outcomes never published");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let rows: BTreeSet<(String, String, String, String)> =
        sqlx::query_as("SELECT id::text, flow_key, outcome, step FROM reconciliation_results")
            .fetch_all(&second.pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let records = read_exactly(&kafka_bootstrap(), &out_topic, rows.len()).await;
    let published: BTreeSet<(String, String, String, String)> = records
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
            assert_eq!(
                r.header("helios-outcome-id"),
                Some(v["id"].to_string().as_str())
            );
            (
                v["id"].to_string(),
                v["key"].as_str().unwrap().to_string(),
                v["outcome"].as_str().unwrap().to_string(),
                v["step"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        published, rows,
        "the topic says exactly what the table says"
    );
    assert!(rows.iter().any(|r| r.1 == "CX-1" && r.2 == "missing"));
    second.stop().await;
}

/// Writes events with their own `data` (for `match` fields).
async fn produce_with_data(
    topology: &Topology,
    t0: DateTime<Utc>,
    events: &[(Step<'_>, serde_json::Value)],
) {
    let producer: FutureProducer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_bootstrap())
        .create()
        .unwrap();
    for (i, ((ty, cloud, id, order, at), data)) in events.iter().enumerate() {
        let mut data = data.clone();
        data["order_id"] = json!(order);
        let e = helios::model::CanonicalEvent {
            event_id: id.to_string(),
            event_type: ty.to_string(),
            source: helios::source::Source::parse(cloud).unwrap(),
            occurred_at: t0 + chrono::Duration::seconds(*at),
            ingested_at: Utc::now(),
            order_id: Some(order.to_string()),
            customer_id: None,
            data,
            metadata: Default::default(),
            raw: helios::model::RawRef {
                topic: format!("helios.raw.{cloud}"),
                partition: 0,
                offset: i as i64,
                index: 0,
            },
        };
        let payload = helios::pipeline::fanout::json_payload(&e);
        producer
            .send(
                FutureRecord::to(&topology.event_topic(ty))
                    .key(order.as_bytes())
                    .partition(0)
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

#[tokio::test]
async fn terminal_optional_and_relative_steps_and_a_field_mismatch() {
    let topology = topology_with(
        "steps: [OrderPlaced, {PaymentProcessed: {within: 1m}}, {InventoryReserved: {within: 30s, after: previous}}, {GiftWrapped: {within: 1m, optional: true}}]\nends_on: [OrderCancelled]\nmatch: [amount]\nallowed_lateness: 5s",
        &["OrderCancelled", "GiftWrapped"],
    )
    .await;
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    let t0 = t0();
    let none = json!({});
    produce_with_data(
        &topology,
        t0,
        &[
            // Cancelled before payment was due: ended, never missing.
            (("OrderPlaced", "aws", "tc-1", "TC-1", 0), none.clone()),
            (("OrderCancelled", "aws", "tc-x", "TC-1", 30), none.clone()),
            // Reserved 25 s after a payment at 50 s: in time (relative), though 75 s after
            // the order; the optional gift wrap never comes.
            (("OrderPlaced", "aws", "rl-1", "RL-1", 0), none.clone()),
            (
                ("PaymentProcessed", "gcp", "rl-2", "RL-1", 50),
                none.clone(),
            ),
            (
                ("InventoryReserved", "azure", "rl-3", "RL-1", 75),
                none.clone(),
            ),
            // Reserved 65 s after its payment: late.
            (("OrderPlaced", "aws", "lt-1", "LT-1", 0), none.clone()),
            (
                ("PaymentProcessed", "gcp", "lt-2", "LT-1", 10),
                none.clone(),
            ),
            (
                ("InventoryReserved", "azure", "lt-3", "LT-1", 75),
                none.clone(),
            ),
            // Charged 90 for an order of 100, then charged again through another cloud with a
            // different amount (told apart from a redelivery).
            (
                ("OrderPlaced", "aws", "mm-1", "MM-1", 0),
                json!({"amount": 100}),
            ),
            (
                ("PaymentProcessed", "gcp", "mm-2", "MM-1", 10),
                json!({"amount": 90}),
            ),
            (
                ("PaymentProcessed", "azure", "mm-2b", "MM-1", 12),
                json!({"amount": 75}),
            ),
            (
                ("InventoryReserved", "gcp", "mm-3", "MM-1", 20),
                none.clone(),
            ),
        ],
    )
    .await;
    advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&rec.pool).await;
    assert_eq!(
        outcomes_of(&rec.pool, "TC-1").await,
        set(&[("ended", "OrderCancelled", false)])
    );
    assert_eq!(
        outcomes_of(&rec.pool, "RL-1").await,
        set(&[("completed", "", false)])
    );
    assert_eq!(
        outcomes_of(&rec.pool, "LT-1").await,
        set(&[
            ("late", "InventoryReserved", false),
            ("completed", "", false)
        ])
    );
    assert_eq!(
        outcomes_of(&rec.pool, "MM-1").await,
        set(&[
            ("mismatch", "PaymentProcessed", false),
            ("duplicate_step", "PaymentProcessed", false),
            ("completed", "", false)
        ])
    );
    let detail = |outcome: &'static str| {
        let pool = rec.pool.clone();
        async move {
            sqlx::query_scalar::<_, serde_json::Value>(
                "SELECT detail FROM reconciliation_results WHERE flow_key = 'MM-1' AND outcome = $1",
            )
            .bind(outcome)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    let m = detail("mismatch").await;
    assert_eq!(m["field"], "amount", "{m}");
    assert_eq!(m["expected"]["value"], 100, "{m}");
    assert_eq!(m["found"]["value"], 90, "{m}");
    let d = detail("duplicate_step").await;
    assert_eq!(d["same_fields"], false, "{d}");
    assert_eq!(d["differs"][0]["again"], 75, "{d}");
    rec.stop().await;
}

#[cfg(feature = "failpoints")]
#[tokio::test]
async fn new_orders_past_the_cap_are_skipped_and_expired_rows_are_pruned_in_chunks() {
    let topology = topology_with(
        "steps: [OrderPlaced, {PaymentProcessed: {within: 1m}}, {InventoryReserved: {within: 2m}}]\nallowed_lateness: 5s\nmax_open_per_partition: 3\nresults_retention: 2s",
        &[],
    )
    .await;
    // Nothing this instance could publish goes out (the row left unpublished below stays so).
    helios::failpoint::arm(
        &format!("reconcile.publish:{}", topology.reconciliation_topic()),
        u64::MAX,
    );
    let rec = spawn_reconciler(&topology, &unique_schema(), HOUR).await;
    // 12,000 published outcome rows from yesterday (more than two prune chunks: at or below
    // their partition's outbox mark), and one not published (above it), which retention never
    // deletes.
    sqlx::query(
        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, detected_at, part)
         SELECT 'order_lifecycle', 'old-' || g, 'completed', '', now() - interval '1 day', 0
         FROM generate_series(1, 12000) g",
    )
    .execute(&rec.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reconcile_outbox (part, published_through) SELECT 0, max(id) FROM reconciliation_results
         ON CONFLICT (part) DO UPDATE SET published_through = EXCLUDED.published_through",
    )
    .execute(&rec.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO reconciliation_results (flow, flow_key, outcome, step, detected_at, part)
         VALUES ('order_lifecycle', 'old-unpublished', 'completed', '', now() - interval '1 day', 0)",
    )
    .execute(&rec.pool)
    .await
    .unwrap();
    let t0 = t0();
    let owned: Vec<(String, String, i64)> = (0..5)
        .map(|i| (format!("cap-{i}"), format!("CAP-{i}"), i))
        .collect();
    let list: Vec<Step<'_>> = owned
        .iter()
        .map(|(id, k, at)| ("OrderPlaced", "aws", id.as_str(), k.as_str(), *at))
        .collect();
    produce_steps(&topology, t0, &list).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while rec.stats.skipped.load(std::sync::atomic::Ordering::Relaxed) < 2 {
        assert!(Instant::now() < deadline, "the cap never refused anything");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let open: Vec<String> = sqlx::query_scalar("SELECT flow_key FROM flow_state ORDER BY flow_key")
        .fetch_all(&rec.pool)
        .await
        .unwrap();
    assert_eq!(
        open,
        vec!["CAP-0", "CAP-1", "CAP-2"],
        "three open, the rest skipped"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'old-%'",
        )
        .fetch_one(&rec.pool)
        .await
        .unwrap();
        if left == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} expired rows left");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let kept: String = sqlx::query_scalar(
        "SELECT flow_key FROM reconciliation_results WHERE flow_key LIKE 'old-%'",
    )
    .fetch_one(&rec.pool)
    .await
    .unwrap();
    assert_eq!(kept, "old-unpublished");
    rec.stop().await;
}

#[tokio::test]
async fn show_says_when_a_missing_step_was_dead_lettered() {
    let topology = topology_with(
        "steps: [OrderPlaced, {PaymentProcessed: {within: 2s}}, {InventoryReserved: {within: 3s}}]\nallowed_lateness: 1s",
        &[],
    )
    .await;
    let opts = ProcOpts::default();
    let proc = spawn_processor_with(&topology, opts.clone()).await;
    let rec = spawn_reconciler(&topology, &opts.schema, Duration::from_millis(500)).await;
    let now = Utc::now().to_rfc3339();
    let bodies: Vec<Vec<u8>> = [
        (
            "OrderPlaced",
            "dq-1",
            json!({"order_id": "DQ-1", "customer_id": "C"}),
        ),
        // No amount: dead-lettered (missing_required_field), so the payment is "missing".
        ("PaymentProcessed", "dq-2", json!({"order_id": "DQ-1"})),
        ("InventoryReserved", "dq-3", json!({"order_id": "DQ-1"})),
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
    while !outcomes_of(&rec.pool, "DQ-1").await.contains(&(
        "missing".into(),
        "PaymentProcessed".into(),
        false,
    )) {
        assert!(
            Instant::now() < deadline,
            "the payment was never reported missing"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let show = run_ok(helios_cli(&topology, &opts, &["reconcile", "show", "DQ-1"]));
    for want in [
        "DLQ: 1 dead-lettered record(s) mention `DQ-1`",
        "missing_required_field",
        &format!("{}/0/", topology.dlq_topic()),
    ] {
        assert!(show.contains(want), "`{want}` not in:\n{show}");
    }
    let none = run_ok(helios_cli(
        &topology,
        &opts,
        &["reconcile", "show", "DQ-1", "--no-dlq"],
    ));
    assert!(!none.contains("DLQ"), "{none}");
    rec.stop().await;
    proc.stop().await;
}
