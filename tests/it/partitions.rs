//! The partitioned `events` table (topology.yaml `events_table`): the take-over of an
//! unpartitioned table, partitions created ahead and dropped past retention, the default
//! partition, the write path's idempotency on the partitioned key, and a replay after a drop.

use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use helios::db::partitions::{self, TableKind};
use helios::db::{EventStore, PgStore};
use helios::model::event::{CanonicalEvent, RawRef};
use helios::source::Source;
use helios::topology::{EventsTableSpec, Partitioning, Period};
use serde_json::json;

use crate::common::*;

fn event(
    id: &str,
    occurred: DateTime<Utc>,
    ingested: DateTime<Utc>,
    offset: i64,
) -> CanonicalEvent {
    let data = json!({"order_id": format!("O-{id}"), "customer_id": "C"});
    CanonicalEvent {
        event_id: id.into(),
        event_type: "OrderPlaced".into(),
        source: Source::Aws,
        occurred_at: occurred,
        ingested_at: ingested,
        order_id: helios::model::event::id_field(&data, "order_id", "orderId"),
        customer_id: helios::model::event::id_field(&data, "customer_id", "customerId"),
        data,
        metadata: Default::default(),
        raw: RawRef {
            topic: "helios.raw.aws".into(),
            partition: 0,
            offset,
            index: 0,
        },
    }
}

/// Where each stored row is: `(event_id, partition)`, by event id.
async fn placement(pool: &sqlx::PgPool) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT event_id, tableoid::regclass::text FROM events ORDER BY event_id, occurred_at",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

fn day(p: &Partitioning, t: DateTime<Utc>) -> String {
    p.partition_name(p.floor(t))
}

#[tokio::test]
async fn take_over_retention_the_default_partition_and_idempotent_writes() {
    let (_schema, _prefix, pool) = scratch_store().await;
    helios::db::migrate(&pool).await.unwrap();
    let store = PgStore::new(pool.clone());
    let now = Utc.with_ymd_and_hms(2026, 12, 4, 12, 0, 0).unwrap();
    let days = |n: i64| now + chrono::Duration::days(n);
    let p = Partitioning {
        period: Period::Daily,
        retention: Some(Duration::from_secs(10 * 86_400)),
        create_ahead: 3,
    };

    // An unpartitioned table with rows of six days, one far past retention and one 9 days ahead.
    let mut rows: Vec<CanonicalEvent> = (0..6)
        .map(|i| event(&format!("d-{i}"), days(-5 + i), days(-5 + i), i))
        .collect();
    rows.push(event("old", days(-400), days(-400), 10));
    rows.push(event("ahead", days(9), now, 11));
    assert_eq!(store.insert_events(&rows).await.unwrap(), 8);
    assert_eq!(
        partitions::table_kind(&pool).await.unwrap(),
        TableKind::Plain
    );

    // The take-over keeps every row, each in the partition of its day; idempotent.
    assert_eq!(
        partitions::take_over(&pool, &p, now).await.unwrap(),
        Some(8)
    );
    assert_eq!(partitions::take_over(&pool, &p, now).await.unwrap(), None);
    assert_eq!(
        partitions::table_kind(&pool).await.unwrap(),
        TableKind::Partitioned
    );
    let placed = placement(&pool).await;
    assert_eq!(placed.len(), 8);
    for (id, part) in &placed {
        let want = match id.as_str() {
            "old" | "ahead" => "events_default".to_string(),
            d => day(&p, days(-5 + d[2..].parse::<i64>().unwrap())),
        };
        assert_eq!(part, &want, "row {id}");
    }
    let parts = partitions::list(&pool).await.unwrap();
    let names: Vec<&str> = parts.iter().map(|x| x.name.as_str()).collect();
    // From now − 10 days (2026-11-24) through 3 days ahead (2026-12-07), then the default.
    assert_eq!(names.len(), 15, "{names:?}");
    assert_eq!(names[0], "events_p20261124");
    assert_eq!(names[13], "events_p20261207");
    assert_eq!(names[14], "events_default");
    assert_eq!(
        parts[0].from,
        Some(Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap())
    );

    // Maintenance now: nothing to create or drop; the row past retention leaves the default
    // partition, the one ahead of every partition stays there and is counted.
    let m = partitions::maintain(&pool, &p, now).await.unwrap();
    assert_eq!(
        (
            m.created.len(),
            m.dropped.len(),
            m.expired_in_default,
            m.default_rows
        ),
        (0, 0, 1, 1),
        "{m:?}"
    );
    assert_eq!(m.partitions, 14);
    // An event written now but older than every partition lands in the default partition, and
    // the next run deletes it as past retention (counted).
    let late = event("late", days(-30), now, 12);
    assert_eq!(store.write_events(&[&late], None).await.unwrap().rows, 1);
    let placed = placement(&pool).await;
    assert!(
        placed.contains(&("late".to_string(), "events_default".to_string())),
        "{placed:?}"
    );
    let m = partitions::maintain(&pool, &p, now).await.unwrap();
    assert_eq!((m.expired_in_default, m.default_rows), (1, 1), "{m:?}");

    // Writes stay idempotent on the partitioned key. (A store that saw the table unpartitioned
    // reads the layout again within 10 s; this one is new, as a processor started after the
    // take-over is.)
    let store = PgStore::new(pool.clone());
    // The same batch again: nothing new.
    let refs: Vec<&CanonicalEvent> = rows[..6].iter().collect();
    let w = store.write_events(&refs, None).await.unwrap();
    assert_eq!((w.rows, w.foreign.len()), (0, 0));
    // A cloud's redelivery in another raw record: a duplicate, not a second row.
    let again = event("d-5", days(0), days(0), 50);
    let w = store.write_events(&[&again], None).await.unwrap();
    assert_eq!((w.rows, w.foreign.clone()), (0, vec![0]));
    // An event without a time of its own takes its raw record's receive time; a redelivery
    // carries another, and is still found (its key was claimed by its first raw record).
    let first = event("t-1", days(-1), days(-1), 60);
    assert_eq!(store.write_events(&[&first], None).await.unwrap().rows, 1);
    let redelivered = event(
        "t-1",
        days(-1) + chrono::Duration::minutes(30),
        days(-1) + chrono::Duration::minutes(30),
        61,
    );
    let fresh_timed = event("t-2", days(-2), days(-1), 62);
    let fresh_timeless = event("t-3", days(-1), days(-1), 63);
    let w = store
        .write_events(&[&fresh_timed, &redelivered, &fresh_timeless], None)
        .await
        .unwrap();
    assert_eq!((w.rows, w.foreign.clone()), (2, vec![1]));
    let t1: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE event_id = 't-1'")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(t1, 1);
    // The same raw record processed again (a crash before the commit): nothing new, no duplicate.
    let w = store.write_events(&[&first], None).await.unwrap();
    assert_eq!((w.rows, w.foreign.len()), (0, 0));
    // A replay that normalizes to another occurred_at replaces the row (one row per key).
    let renormalized = event("d-2", days(-3) + chrono::Duration::hours(30), days(-3), 2);
    assert_eq!(
        store
            .upsert_events(&[renormalized], "replay-x")
            .await
            .unwrap(),
        1
    );
    let d2: Vec<(String, String)> = sqlx::query_as(
        "SELECT tableoid::regclass::text, replay_id FROM events WHERE event_id = 'd-2'",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        d2,
        vec![(
            day(&p, days(-3) + chrono::Duration::hours(30)),
            "replay-x".to_string()
        )]
    );

    // Eight days on: the partitions wholly past retention (ending by 2026-12-02 12:00) are
    // dropped, exactly those; the ones ahead created; the row ahead moved out of the default.
    let later = days(8);
    let m = partitions::maintain(&pool, &p, later).await.unwrap();
    let dropped: Vec<String> = (0..8)
        .map(|i| {
            day(
                &p,
                Utc.with_ymd_and_hms(2026, 11, 24, 0, 0, 0).unwrap() + chrono::Duration::days(i),
            )
        })
        .collect();
    assert_eq!(m.dropped, dropped, "{m:?}");
    assert_eq!(m.created.len(), 8, "2026-12-08 .. 2026-12-15: {m:?}");
    assert_eq!((m.moved_from_default, m.default_rows), (1, 0), "{m:?}");
    let left: Vec<String> = placement(&pool)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    // d-0..d-2 (11-29 .. 12-01) and t-2 (12-02 12:00 is in the kept 12-02 partition) ...
    assert_eq!(
        left,
        ["ahead", "d-2", "d-3", "d-4", "d-5", "t-1", "t-2", "t-3"],
        "rows of the dropped partitions, and only those, are gone"
    );
    assert_eq!(
        placement(&pool).await[0].1,
        day(&p, days(9)),
        "the row ahead is in its own partition"
    );
    // A maintenance run right after finds nothing to do.
    let m = partitions::maintain(&pool, &p, later).await.unwrap();
    assert_eq!((m.created.len(), m.dropped.len()), (0, 0), "{m:?}");
}

#[tokio::test]
async fn migrate_takes_a_live_table_over_redeliveries_stay_single_and_a_replay_after_a_drop_is_kept(
) {
    let topology = applied_topology(|_| {}).await;
    let opts = ProcOpts::default();
    let pool = helios::db::connect(&database_url(), Some(&opts.schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    // Direct events without a time: occurred_at is their raw record's receive time.
    let orders = |from: usize, to: usize| -> Vec<Vec<u8>> {
        (from..to)
            .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("p-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
            .collect()
    };
    let raw = topology.raw_topic(Source::Direct);
    produce_raw(&raw, "direct", "ingest", &orders(0, 10)).await;
    let live = spawn_processor_with(&topology, opts.clone()).await;
    expect_count(&pool, "SELECT count(*) FROM events", 10).await;
    live.stop().await;

    // `helios migrate` with events_table in the topology file takes the table over.
    let mut partitioned = topology.clone();
    partitioned.events_table = EventsTableSpec {
        partition: Period::Daily,
        retention: Some("30d".into()),
        create_ahead: Some(2),
    };
    let file = std::env::temp_dir().join(format!("helios-partitions-{}.yaml", opts.schema));
    std::fs::write(&file, serde_norway::to_string(&partitioned).unwrap()).unwrap();
    let out = run_ok(helios_cli(
        &topology,
        &opts,
        &["migrate", "--topology", file.to_str().unwrap()],
    ));
    let _ = std::fs::remove_file(&file);
    assert!(
        out.contains(
            "events: partitioned daily, retention 30d: took the unpartitioned table over (10 rows)"
        ),
        "{out}"
    );
    assert_eq!(
        partitions::table_kind(&pool).await.unwrap(),
        TableKind::Partitioned
    );
    let p = partitioned.events_partitioning().unwrap();
    let today = p.partition_name(p.floor(Utc::now()));
    // (A run across midnight UTC received some yesterday.)
    let yesterday = p.partition_name(p.step(p.floor(Utc::now()), -1));
    for (id, part) in placement(&pool).await {
        assert!(part == today || part == yesterday, "{id} in {part}");
    }

    // Forty days on, retention drops the partition holding them.
    let m = partitions::maintain(&pool, &p, Utc::now() + chrono::Duration::days(40))
        .await
        .unwrap();
    assert!(m.dropped.contains(&today), "{m:?}");
    expect_count(&pool, "SELECT count(*) FROM events", 0).await;
    // A replay of their raw records writes them again; with their partition gone they land in
    // the default partition, and the next maintenance (now: still inside retention) creates
    // the partition again and moves them in.
    run_ok(helios_cli(
        &topology,
        &opts,
        &["replay", "--offsets", "direct:0:0-10"],
    ));
    expect_count(&pool, "SELECT count(*) FROM events_default", 10).await;
    let m = partitions::maintain(&pool, &p, Utc::now()).await.unwrap();
    assert_eq!((m.moved_from_default, m.default_rows), (10, 0), "{m:?}");
    assert!(m.created.contains(&today), "{m:?}");

    // The clouds deliver the same ten again (new raw records, new receive times) after their
    // dedup marks are gone, with five new ones: the store still keeps one row per event.
    produce_raw(&raw, "direct", "ingest", &orders(0, 15)).await;
    let forgetful = ProcOpts {
        dedup_prefix: format!("test:{}:", uuid::Uuid::new_v4().simple()),
        ..opts.clone()
    };
    let live = spawn_processor_with(&topology, forgetful).await;
    expect_count(&pool, "SELECT count(*) FROM events", 15).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while live
        .stats
        .duplicates
        .load(std::sync::atomic::Ordering::Relaxed)
        < 10
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        live.stats
            .duplicates
            .load(std::sync::atomic::Ordering::Relaxed),
        10,
        "the redeliveries are counted duplicates"
    );
    live.stop().await;
    expect_count(&pool, "SELECT count(DISTINCT event_id) FROM events", 15).await;
    expect_count(&pool, "SELECT count(*) FROM events", 15).await;
}

#[tokio::test]
async fn helios_process_takes_the_table_over_at_start_and_keeps_the_partitions_on_schedule() {
    let mut topology = applied_topology(|_| {}).await;
    topology.events_table = EventsTableSpec {
        partition: Period::Daily,
        retention: Some("30d".into()),
        create_ahead: Some(3),
    };
    let (schema, prefix, pool) = scratch_store().await;
    helios::db::migrate(&pool).await.unwrap();
    let file = scratch_dir("partitions").join("topology.yaml");
    std::fs::write(&file, serde_norway::to_string(&topology).unwrap()).unwrap();

    // Not allowed to migrate, a processor refuses the unpartitioned table and says what to do.
    let mut refused = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_TOPOLOGY", &file)
        .env("HELIOS_MIGRATE", "false")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = refused.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the processor did not refuse"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut refused.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("helios migrate"), "{stderr}");
    assert_eq!(
        partitions::table_kind(&pool).await.unwrap(),
        TableKind::Plain
    );

    // With HELIOS_MIGRATE it takes the table over, partitions ahead exist before the first write.
    let metrics = free_addr();
    let _child = KillOnDrop(
        helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
            .env("HELIOS_TOPOLOGY", &file)
            .env("HELIOS_METRICS_ADDR", &metrics)
            .env("HELIOS_PARTITION_MAINTENANCE_SECS", "1")
            .spawn()
            .unwrap(),
        None,
    );
    let bodies: Vec<Vec<u8>> = (0..5)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("s-{i}"), "occurred_at": Utc::now().to_rfc3339(), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    expect_count(&pool, "SELECT count(*) FROM events", 5).await;
    assert_eq!(
        partitions::table_kind(&pool).await.unwrap(),
        TableKind::Partitioned
    );
    let p = topology.events_partitioning().unwrap();
    let here = [
        p.partition_name(p.floor(Utc::now())),
        p.partition_name(p.step(p.floor(Utc::now()), -1)),
    ];
    for (id, part) in placement(&pool).await {
        assert!(here.contains(&part), "{id} in {part}");
    }
    // From now − 30 days through 3 days ahead.
    assert_eq!(
        wait_metric(
            &metrics,
            "helios_events_partitions",
            34.0,
            Duration::from_secs(30)
        )
        .await,
        34.0
    );
    // On its schedule: a partition ahead that goes missing is made again.
    let newest = partitions::list(&pool)
        .await
        .unwrap()
        .into_iter()
        .rfind(|x| !x.is_default)
        .unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP TABLE {}", newest.name)))
        .execute(&pool)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let names: Vec<String> = partitions::list(&pool)
            .await
            .unwrap()
            .into_iter()
            .map(|x| x.name)
            .collect();
        if names.contains(&newest.name) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} was not created again: {names:?}",
            newest.name
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = std::fs::remove_file(&file);
}
