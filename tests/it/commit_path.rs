//! The commit path (DESIGN.md guarantee 8): nothing is committed past a record that did not
//! resolve, whatever happens to its batch — a shutdown during its retry, a panic in its delivery,
//! a cooperative rebalance that moves another partition — and the fan-out carries exactly what
//! the store took.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use helios::source::Source;
use serde_json::json;

use crate::common::*;

fn valid(i: usize, tag: &str) -> Vec<u8> {
    json!({"event_type": "OrderPlaced", "event_id": format!("{tag}-ok-{i}"),
        "data": {"order_id": format!("O-{tag}-{i}"), "customer_id": "C"}})
    .to_string()
    .into_bytes()
}

fn invalid(i: usize, tag: &str) -> Vec<u8> {
    // No customer_id: refused by the builtin rules (missing_required_field).
    json!({"event_type": "OrderPlaced", "event_id": format!("{tag}-bad-{i}"),
        "data": {"order_id": format!("O-{tag}-bad-{i}")}})
    .to_string()
    .into_bytes()
}

/// 50 valid events, then 50 invalid ones, on the direct raw topic's one partition: with batches
/// of 50, batch N needs PostgreSQL and batch N+1 only the DLQ.
async fn n_then_n_plus_one(topology: &helios::topology::Topology, tag: &str) -> HashSet<String> {
    let mut bodies: Vec<Vec<u8>> = (0..50).map(|i| valid(i, tag)).collect();
    bodies.extend((0..50).map(|i| invalid(i, tag)));
    produce_direct_to(&kafka_bootstrap(), topology, &bodies).await;
    (0..50).map(|i| format!("{tag}-ok-{i}")).collect()
}

/// Every id of `ids` on the OrderPlaced topic (at least once), and the raw records of the
/// invalid events in the DLQ.
async fn assert_all_delivered(
    topology: &helios::topology::Topology,
    ids: &HashSet<String>,
    dlq: usize,
) {
    let expected = ids.clone();
    let out = read_until(
        &kafka_bootstrap(),
        &topology.event_topic("OrderPlaced"),
        Duration::from_secs(60),
        move |recs| {
            let seen: HashSet<&str> = recs.iter().filter_map(|r| r.header("ce_id")).collect();
            expected.iter().all(|id| seen.contains(id.as_str()))
        },
    )
    .await;
    let seen: HashSet<String> = out
        .iter()
        .filter_map(|r| r.header("ce_id").map(str::to_string))
        .collect();
    let missing: Vec<&String> = ids.difference(&seen).collect();
    assert!(missing.is_empty(), "not on the fan-out topic: {missing:?}");
    let recs = read_until(
        &kafka_bootstrap(),
        &topology.dlq_topic(),
        Duration::from_secs(30),
        move |r| r.len() >= dlq,
    )
    .await;
    let offsets: HashSet<String> = recs
        .iter()
        .filter_map(|r| r.header("helios-dlq-raw-offset").map(str::to_string))
        .collect();
    assert_eq!(offsets.len(), dlq, "each invalid raw record in the DLQ");
}

#[tokio::test]
async fn sigterm_while_a_batch_retries_commits_nothing_past_it() {
    let topology = applied_topology(|_| {}).await;
    let (schema, prefix, pool) = scratch_store().await;
    helios::db::migrate(&pool).await.unwrap();
    // A transient failure for batch N only: the table is gone (42P01), the DLQ works.
    sqlx::query("ALTER TABLE events RENAME TO events_away")
        .execute(&pool)
        .await
        .unwrap();
    let ids = n_then_n_plus_one(&topology, "term").await;
    let metrics = free_addr();
    let mut first = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &metrics)
        .spawn()
        .unwrap();
    // Batch N is retrying, and batch N+1 (only DLQ work) is planned behind it.
    let retries = wait_metric(
        &metrics,
        "helios_processor_retries_total{stage=\"postgres\"}",
        2.0,
        Duration::from_secs(60),
    )
    .await;
    let planned = wait_metric(
        &metrics,
        "helios_processor_batches_overlapped_total",
        1.0,
        Duration::from_secs(30),
    )
    .await;
    assert!(
        retries >= 2.0 && planned >= 1.0,
        "retries {retries}, planned behind {planned}"
    );
    let (stopped, status) = terminate(&mut first, Duration::from_secs(30));
    assert!(stopped, "the processor did not stop on SIGTERM within 30 s");
    assert!(
        status.is_some_and(|s| s.success()),
        "exit status {status:?}"
    );
    sqlx::query("ALTER TABLE events_away RENAME TO events")
        .execute(&pool)
        .await
        .unwrap();

    let mut second = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .spawn()
        .unwrap();
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        50,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        rows, 50,
        "every event of the batch that was retrying at the SIGTERM is stored after the restart"
    );
    assert_all_delivered(&topology, &ids, 50).await;
    terminate(&mut second, Duration::from_secs(30));
}

#[tokio::test]
async fn a_panicking_delivery_is_read_again_and_nothing_past_it_is_committed() {
    let topology = applied_topology(|_| {}).await;
    let (schema, prefix, pool) = scratch_store().await;
    let ids = n_then_n_plus_one(&topology, "panic").await;
    let metrics = free_addr();
    // The first delivery panics after PostgreSQL took its rows, before any fan-out record.
    let mut child = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &metrics)
        .env("HELIOS_FAILPOINTS", "deliver.after_store=1*panic")
        .spawn()
        .unwrap();
    let rewinds = wait_metric(
        &metrics,
        "helios_processor_rewinds_total",
        1.0,
        Duration::from_secs(60),
    )
    .await;
    assert!(
        rewinds >= 1.0,
        "the failpoint never fired (is the `failpoints` feature on? scripts/test.sh turns it on)"
    );
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        50,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(rows, 50);
    assert_all_delivered(&topology, &ids, 50).await;
    // And the group's offset moved past everything once it all resolved.
    let committed = wait_metric(
        &metrics,
        "helios_processor_committed_offset",
        100.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(committed, 100.0);
    terminate(&mut child, Duration::from_secs(30));
}

#[tokio::test]
async fn a_cooperative_rebalance_drops_only_the_revoked_partitions_work() {
    let topology = applied_topology(|t| t.raw_topics.direct.partitions = 2).await;
    let n = 1500;
    let bodies: Vec<Vec<u8>> = (0..n).map(|i| valid(i, "coop")).collect();
    let ids: HashSet<String> = (0..n).map(|i| format!("coop-ok-{i}")).collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    let opts = ProcOpts {
        kafka_properties: vec![(
            "partition.assignment.strategy".into(),
            "cooperative-sticky".into(),
        )],
        batch_records: 50,
        ..ProcOpts::default()
    };
    // Each batch's write takes 400 ms longer: there is always a batch planned behind the one
    // being written when the group rebalances.
    let a = spawn_processor_with(&topology, opts.clone()).await;
    for sql in [
        "CREATE FUNCTION slow_write() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.4); RETURN NULL; END $$",
        "CREATE TRIGGER slow_write AFTER INSERT ON events FOR EACH STATEMENT EXECUTE FUNCTION slow_write()",
    ] {
        sqlx::query(sql).execute(&a.pool).await.unwrap();
    }
    wait_count(
        &a.pool,
        "SELECT count(*) FROM events",
        200,
        Duration::from_secs(90),
    )
    .await;
    let a_rebalances = a
        .stats
        .rebalances
        .load(std::sync::atomic::Ordering::Relaxed);
    let b = spawn_processor_with(&topology, opts).await;
    // B joins: under cooperative-sticky A gives up some of its partitions (whichever the
    // assignor picks) and keeps the others, whose work goes on untouched.
    let deadline = Instant::now() + Duration::from_secs(90);
    while b
        .stats
        .rebalances
        .load(std::sync::atomic::Ordering::Relaxed)
        == 0
        || a.stats
            .rebalances
            .load(std::sync::atomic::Ordering::Relaxed)
            == a_rebalances
    {
        assert!(
            Instant::now() < deadline,
            "the group never rebalanced onto the second member"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let at_rebalance: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&a.pool)
        .await
        .unwrap();
    assert!(
        at_rebalance < n as i64,
        "the stream was done before the rebalance: the test proves nothing"
    );
    let rows = wait_count(
        &a.pool,
        "SELECT count(*) FROM events",
        n as i64,
        Duration::from_secs(180),
    )
    .await;
    let stored: HashSet<String> = sqlx::query_scalar::<_, String>("SELECT event_id FROM events")
        .fetch_all(&a.pool)
        .await
        .unwrap()
        .into_iter()
        .collect();
    let missing: Vec<&String> = ids.difference(&stored).take(10).collect();
    assert_eq!(
        rows, n as i64,
        "events lost across the rebalance, e.g. {missing:?}"
    );
    assert_all_delivered(&topology, &ids, 0).await;
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_redelivery_after_its_dedup_mark_expired_is_neither_stored_nor_fanned_out_twice() {
    let topology = applied_topology(|_| {}).await;
    let opts = ProcOpts {
        dedup_ttl: Duration::from_secs(1),
        ..ProcOpts::default()
    };
    let prefix = opts.dedup_prefix.clone();
    let p = spawn_processor_with(&topology, opts).await;
    let body = valid(1, "ttl");
    let raw = topology.raw_topic(Source::Direct);
    produce_raw(&raw, "direct", "ingest", std::slice::from_ref(&body)).await;
    expect_count(&p.pool, "SELECT count(*) FROM events", 1).await;
    // The mark expires (as after 24 h, a Redis flush or a failover) before the cloud's copy.
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let key = format!("{prefix}direct:ttl-ok-1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let exists: bool = redis::cmd("EXISTS")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .unwrap();
        if !exists {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the dedup mark {key} never expired"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    produce_raw(&raw, "direct", "ingest", std::slice::from_ref(&body)).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while p
        .stats
        .raw_records
        .load(std::sync::atomic::Ordering::Relaxed)
        < 2
    {
        assert!(
            Instant::now() < deadline,
            "the redelivery was never processed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, units, outs, dups, dlq) = p.stats.snapshot();
    assert_eq!(
        (units, outs, dups, dlq),
        (2, 1, 1, 0),
        "the store's duplicate is counted, not fanned out"
    );
    expect_count(&p.pool, "SELECT count(*) FROM events", 1).await;
    read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 1).await;
    p.stop().await;
}

#[tokio::test]
async fn an_unclassified_error_of_some_events_sends_them_to_the_dlq_and_of_all_is_an_outage() {
    let topology = applied_topology(|_| {}).await;
    let metrics = free_addr();
    let (schema, prefix, pool) = scratch_store().await;
    helios::db::migrate(&pool).await.unwrap();
    // RAISE (SQLSTATE P0001) is in no list: unclassified. For one customer only, it is about the
    // data; for everyone, it is an outage.
    sqlx::query(
        "CREATE FUNCTION picky() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data->>'customer_id' = 'REFUSED' OR EXISTS (SELECT 1 FROM refuse_all) THEN RAISE EXCEPTION 'refused by a trigger'; END IF;
           RETURN NEW; END $$",
    )
    .execute(&pool)
    .await
    .unwrap();
    for sql in [
        "CREATE TABLE refuse_all (x int)",
        "CREATE TRIGGER picky BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION picky()",
    ] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let mut bodies: Vec<Vec<u8>> = (0..20).map(|i| valid(i, "unc")).collect();
    bodies.insert(
        7,
        json!({"event_type": "OrderPlaced", "event_id": "unc-refused", "data": {"order_id": "O-r", "customer_id": "REFUSED"}})
            .to_string()
            .into_bytes(),
    );
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    let mut child = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &metrics)
        .spawn()
        .unwrap();
    expect_count(&pool, "SELECT count(*) FROM events", 20).await;
    let dlq = read_records(
        &kafka_bootstrap(),
        &topology.dlq_topic(),
        1,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(dlq.len(), 1);
    assert_eq!(dlq[0].header("helios-dlq-reason"), Some("sink_rejected"));
    assert_eq!(dlq[0].header("helios-dlq-sink-code"), Some("P0001"));

    // Now every row fails: nothing is dead-lettered, the processor stalls and says so.
    sqlx::query("INSERT INTO refuse_all VALUES (1)")
        .execute(&pool)
        .await
        .unwrap();
    let more: Vec<Vec<u8>> = (100..110).map(|i| valid(i, "unc")).collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &more).await;
    let stalled = wait_metric(
        &metrics,
        "helios_processor_stalled_seconds",
        3.0,
        Duration::from_secs(60),
    )
    .await;
    assert!(stalled >= 3.0, "the stall gauge never rose ({stalled})");
    read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 1).await;
    sqlx::query("DELETE FROM refuse_all")
        .execute(&pool)
        .await
        .unwrap();
    expect_count(&pool, "SELECT count(*) FROM events", 30).await;
    read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 1).await;
    let stalled = metric_value(&metrics, "helios_processor_stalled_seconds").await;
    assert_eq!(
        stalled, 0.0,
        "the stall gauge goes back to 0 once the batch went through"
    );
    terminate(&mut child, Duration::from_secs(30));
}

#[tokio::test]
async fn the_kip848_protocol_on_a_broker_without_it_is_refused_with_a_clear_error() {
    let topology = applied_topology(|_| {}).await;
    let (schema, prefix, _pool) = scratch_store().await;
    let mut child = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("KAFKA_GROUP_PROTOCOL", "consumer")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut err, &mut s);
        s
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the processor kept running with a group protocol the broker does not serve");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let stderr = reader.join().unwrap();
    assert!(
        !status.success(),
        "the processor ran with a protocol the broker lacks"
    );
    assert!(
        stderr.contains("KIP-848") && stderr.contains("KAFKA_GROUP_PROTOCOL"),
        "the error does not say what to change: {stderr}"
    );
}

#[tokio::test]
async fn the_fan_out_keeps_each_orders_order_when_the_broker_fails_mid_batch() {
    // A private broker, killed while a batch's fan-out is under way: the records in flight
    // fail (after a short message timeout) while earlier ones were acknowledged, and the retry
    // must not put a later step of an order before an earlier one.
    let mut broker = Broker::start(scratch_dir("order"), free_port());
    let bootstrap = broker.bootstrap();
    let topology = test_topology();
    helios::kafka::apply_topology(
        &helios::config::KafkaSettings::new(bootstrap.clone()),
        &topology,
        false,
    )
    .await
    .unwrap();
    let (orders, steps) = (40, 5);
    // Step by step across the orders: every batch holds several steps of each order.
    let mut bodies = vec![];
    for step in 1..=steps {
        for o in 0..orders {
            bodies.push(
                json!({"event_type": "OrderPlaced", "event_id": format!("ord-{o}-{step}"),
                    "data": {"order_id": format!("O-{o}"), "customer_id": "C", "seq": step}})
                .to_string()
                .into_bytes(),
            );
        }
    }
    produce_direct_to(&bootstrap, &topology, &bodies).await;
    let (schema, prefix, pool) = scratch_store().await;
    let mut child = helios_process_command(&bootstrap, &topology, &schema, &prefix)
        .env("HELIOS_BATCH_SIZE", "200")
        .env("KAFKA_MESSAGE_TIMEOUT_MS", "1500")
        // Tansu 0.6.0's storage panics on an idempotent producer that outlives a restart
        // ("more or less than one row" in its idempotence check, then every produce fails): the
        // fan-out keeps order here with one request in flight instead.
        .env("KAFKA_ENABLE_IDEMPOTENCE", "false")
        // One record per produce request: the fan-out of a batch takes a while.
        .env("KAFKA_BATCH_NUM_MESSAGES", "1")
        .env("KAFKA_LINGER_MS", "0")
        .spawn()
        .unwrap();
    let topic = topology.event_topic("OrderPlaced");
    let reader = helios::kafka::reader(
        &helios::config::KafkaSettings::new(bootstrap.clone()),
        "order-test",
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let high = rdkafka::consumer::Consumer::fetch_watermarks(
            &reader,
            &topic,
            0,
            Duration::from_secs(5),
        )
        .map(|(_, h)| h)
        .unwrap_or(0);
        if high > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the fan-out never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(reader);
    broker.stop();
    tokio::time::sleep(Duration::from_secs(3)).await;
    broker.restart();
    let n = (orders * steps) as i64;
    let rows = wait_count(
        &pool,
        "SELECT count(*) FROM events",
        n,
        Duration::from_secs(120),
    )
    .await;
    assert_eq!(rows, n);
    let out = read_until(&bootstrap, &topic, Duration::from_secs(90), move |r| {
        r.iter()
            .filter_map(|x| x.header("ce_id"))
            .collect::<HashSet<_>>()
            .len()
            >= n as usize
    })
    .await;
    terminate(&mut child, Duration::from_secs(30));
    assert_orders_kept(&out, n as usize);
}

#[tokio::test]
async fn the_fan_out_keeps_each_orders_order_when_produce_requests_are_retried() {
    use crate::exactly_once::{mock_cluster, mock_topics, MockCmd};
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
    // Failing one produce request now and then needs librdkafka's mock cluster (Tansu cannot);
    // PostgreSQL and Redis are the real ones. The mock's idempotence accepts sequences out of
    // order (a retried request after a later one is taken for a duplicate and dropped), so the
    // producer runs without it here: order is then kept by one request in flight.
    let topology = test_topology();
    let (bootstrap, mock) = mock_cluster(mock_topics(&topology, 1));
    let (orders, steps) = (40, 5);
    let mut bodies = vec![];
    for step in 1..=steps {
        for o in 0..orders {
            bodies.push(
                json!({"event_type": "OrderPlaced", "event_id": format!("ordr-{o}-{step}"),
                    "data": {"order_id": format!("O-{o}"), "customer_id": "C", "seq": step}})
                .to_string()
                .into_bytes(),
            );
        }
    }
    produce_direct_to(&bootstrap, &topology, &bodies).await;
    // The processor's produce requests fail now and then with errors librdkafka retries
    // itself: with several requests of a partition in flight, a retried one lands after later
    // ones.
    let errors: Vec<RDKafkaRespErr> = (0..60)
        .map(|i| match i % 3 {
            0 => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NOT_LEADER_FOR_PARTITION,
            _ => RDKafkaRespErr::RD_KAFKA_RESP_ERR_NO_ERROR,
        })
        .collect();
    mock.send(MockCmd::RequestErrors(RDKafkaApiKey::Produce, errors))
        .unwrap();
    let (schema, prefix, pool) = scratch_store().await;
    let mut child = helios_process_command(&bootstrap, &topology, &schema, &prefix)
        .env("HELIOS_BATCH_SIZE", "200")
        .env("KAFKA_ENABLE_IDEMPOTENCE", "false")
        // One record per produce request.
        .env("KAFKA_BATCH_NUM_MESSAGES", "1")
        .env("KAFKA_LINGER_MS", "0")
        .spawn()
        .unwrap();
    let n = (orders * steps) as usize;
    expect_count(&pool, "SELECT count(*) FROM events", n as i64).await;
    let out = read_until(
        &bootstrap,
        &topology.event_topic("OrderPlaced"),
        Duration::from_secs(60),
        move |r| {
            r.iter()
                .filter_map(|x| x.header("ce_id"))
                .collect::<HashSet<_>>()
                .len()
                >= n
        },
    )
    .await;
    terminate(&mut child, Duration::from_secs(30));
    drop(mock);
    assert_orders_kept(&out, n);
}

/// On the fan-out topic, each order's steps first appear in order, and all `n` are there.
fn assert_orders_kept(out: &[Record], n: usize) {
    let mut last: std::collections::HashMap<String, i64> = Default::default();
    let mut seen = HashSet::new();
    for r in out {
        let id = r.header("ce_id").unwrap().to_string();
        if !seen.insert(id) {
            continue; // a re-sent copy: only first occurrences count
        }
        let v: serde_json::Value = serde_json::from_slice(&r.value).unwrap();
        let key = String::from_utf8(r.key.clone().unwrap()).unwrap();
        let seq = v["data"]["seq"].as_i64().unwrap();
        let before = last.insert(key.clone(), seq).unwrap_or(0);
        assert!(
            seq > before,
            "order {key}: step {seq} came after step {before} on the fan-out topic"
        );
    }
    assert_eq!(seen.len(), n, "every event on its topic");
}

#[tokio::test]
async fn a_duplicate_in_the_same_batch_goes_through_when_the_first_copy_is_refused() {
    let topology = applied_topology(|_| {}).await;
    let p = spawn_processor(&topology).await;
    // PostgreSQL refuses the first copy for its data (check_violation, class 23); the second
    // copy of the same event id, corrected, follows it in the same batch.
    for sql in [
        "CREATE FUNCTION no_bad() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN
           IF NEW.data->>'bad' = 'yes' THEN RAISE EXCEPTION 'bad row' USING ERRCODE = 'check_violation'; END IF;
           RETURN NEW; END $$",
        "CREATE TRIGGER no_bad BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION no_bad()",
    ] {
        sqlx::query(sql).execute(&p.pool).await.unwrap();
    }
    let copy = |bad: &str| {
        json!({"event_type": "OrderPlaced", "event_id": "twice-1",
            "data": {"order_id": "O-t", "customer_id": "C", "bad": bad}})
        .to_string()
        .into_bytes()
    };
    produce_direct_to(&kafka_bootstrap(), &topology, &[copy("yes"), copy("no")]).await;
    expect_count(&p.pool, "SELECT count(*) FROM events", 1).await;
    let bad: String = sqlx::query_scalar("SELECT data->>'bad' FROM events")
        .fetch_one(&p.pool)
        .await
        .unwrap();
    assert_eq!(bad, "no", "the corrected copy is the one stored");
    let dlq = read_exactly(&kafka_bootstrap(), &topology.dlq_topic(), 1).await;
    assert_eq!(dlq[0].header("helios-dlq-sink-code"), Some("23514"));
    read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 1).await;
    let (raw, units, outs, dups, dlq_units) = p.stats.snapshot();
    assert_eq!((raw, units, outs, dups, dlq_units), (2, 2, 1, 0, 1));
    p.stop().await;
}
