//! The reconciler as a consumer group: a stream of orders read across a SIGKILL and restart,
//! a restart's event time, fencing, two instances splitting the partitions, writes refused
//! and retried, an instance joining mid-stream, an instance left without partitions.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use super::*;

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

/// A child process killed when the test ends, passed or not; its log (stderr) is printed when
/// the test fails.
/// Fails with what is missing and what is extra (the first 20 of each), not two whole sets.
fn assert_same(what: &str, got: &Expected, want: &Expected) {
    if got != want {
        let missing: Vec<_> = want.difference(got).take(20).collect();
        let extra: Vec<_> = got.difference(want).take(20).collect();
        panic!(
            "{what}: {} of {} expected, {} in all; missing (first 20): {missing:?}; extra (first 20): {extra:?}",
            want.intersection(got).count(),
            want.len(),
            got.len()
        );
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
    let spawn = |n: usize| {
        let log = dir.join(format!("reconcile-{n}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
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
                std::env::var("HELIOS_TEST_CHILD_LOG")
                    .unwrap_or("warn,helios::reconcile::run=info".into()),
            )
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("helios reconcile");
        KillOnDrop(child, Some(log))
    };
    let mut first = spawn(1);
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
    let _second = spawn(2);
    wait_for_markers(&pool).await;
    assert_same("outcome rows", &stream_outcomes(&pool).await, &expected);
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
    assert_same("outcomes on the topic", &on_topic, &expected);
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
    // One time for both writes and the check (t0() follows the clock).
    let t = t0();
    let fence = |generation| Fence {
        topic: tp.0.clone(),
        part: 0,
        generation,
        sources: vec![("aws".into(), t)],
        next_offset: Some(10),
    };
    let taken = store
        .save(&[state("late")], &[], &[], "g", &[fence(old)], &[])
        .await
        .unwrap()
        .taken;
    assert_eq!(taken, vec![tp.clone()]);
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM flow_state")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 0, "the refused write changed nothing");
    let taken = store
        .save(&[state("owner")], &[], &[], "g", &[fence(new)], &[])
        .await
        .unwrap()
        .taken;
    assert!(taken.is_empty());
    let (key, newest): (String, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT s.flow_key, p.newest_event_time FROM flow_state s, reconcile_progress p",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((key.as_str(), newest), ("owner", Some(t)));
    let per_cloud = store.sources("g", std::slice::from_ref(&tp)).await.unwrap();
    assert_eq!(per_cloud[&tp], vec![("aws".to_string(), t)]);
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
    let extra = advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&a.pool).await;
    assert_same("outcome rows", &stream_outcomes(&a.pool).await, &expected);
    let parts: Vec<i32> = sqlx::query_scalar("SELECT DISTINCT part FROM flow_state ORDER BY part")
        .fetch_all(&a.pool)
        .await
        .unwrap();
    assert_eq!(parts, vec![0, 1]);
    let (ea, eb) = events_counted(&a, &b, steps.len() as u64 + extra).await;
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
    let extra = advance_past_every_deadline(&topology, t0).await;
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
    assert_same("outcome rows", &stream_outcomes(&rec.pool).await, &expected);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'S-%'")
            .fetch_one(&rec.pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, expected.len(), "one row per outcome");
    // The markers and the clock orders besides the stream. (Twice in full-suite runs on
    // 2026-12-07 the count stood at 69 / 78 of 463 for 10 s after the outcome rows matched, and
    // never alone: the wait is longer, and the message says what else the instance did.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while rec.stats.events.load(std::sync::atomic::Ordering::Relaxed) < steps.len() as u64 + extra {
        let s = &rec.stats;
        let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        assert!(
            Instant::now() < deadline,
            "not every event was counted: {} of {} (already counted {}, retries {}, rejoins {}, assigned {}, outcomes {})",
            n(&s.events),
            steps.len() as u64 + extra,
            n(&s.already_counted),
            n(&s.retries),
            n(&s.rejoins),
            n(&s.assigned),
            n(&s.outcomes)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        rec.stats.events.load(std::sync::atomic::Ordering::Relaxed),
        steps.len() as u64 + extra,
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
    let extra = advance_past_every_deadline(&topology, t0).await;
    wait_for_markers(&a.pool).await;
    assert_same("outcome rows", &stream_outcomes(&a.pool).await, &expected);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM reconciliation_results WHERE flow_key LIKE 'S-%'")
            .fetch_one(&a.pool)
            .await
            .unwrap();
    assert_eq!(rows as usize, expected.len(), "one row per outcome");
    let (_, eb) = events_counted(&a, &b, steps.len() as u64 + extra).await;
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
async fn an_instance_left_without_partitions_joins_its_group_again_less_and_less_often() {
    // One partition, two instances: the second (its member id sorts after the first's, so the
    // range assignor never gives it the partition) has nothing to read. After its
    // rejoin_after it leaves the group and joins again, and while it stays without partitions
    // again after twice the wait each time (what gets a member its partitions when Tansu formed
    // the group with an empty assignment, or left the member out again); the first instance
    // keeps the partition and the flow goes through.
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
    while load(&b).1 < 1 {
        assert!(
            Instant::now() < deadline,
            "no rejoin: {:?} and {:?} (assigned, rejoins)",
            load(&a),
            load(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let first_rejoin = Instant::now();
    while load(&a).0 != 3 {
        assert!(
            Instant::now() < deadline,
            "the partitions never came back: {:?} and {:?} (assigned, rejoins)",
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
    assert_same("outcome rows", &stream_outcomes(&a.pool).await, &expected);
    // Still without partitions: another try, 4 s (twice its 2 s) or more after the first.
    let deadline = Instant::now() + Duration::from_secs(90);
    while load(&b).1 < 2 {
        assert!(
            Instant::now() < deadline,
            "no second rejoin: {:?} (assigned, rejoins)",
            load(&b)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second_rejoin = first_rejoin.elapsed();
    assert!(
        second_rejoin >= Duration::from_millis(3800),
        "the second rejoin came {second_rejoin:?} after the first, not twice the wait"
    );
    // Rejoin k comes 4·(2^(k-1) − 1) s after the first (waits of 4, 8, 16 s…): at most that many.
    let since = first_rejoin.elapsed().as_secs_f64();
    let most = 1 + (since / 4.0 + 1.0).log2().floor() as u64;
    let (assigned, rejoins) = load(&b);
    assert_eq!(assigned, 0, "the second instance got a partition");
    assert!(
        rejoins <= most,
        "{rejoins} rejoins in {since:.1} s since the first: not less and less often (at most {most})"
    );
    assert_eq!(
        load(&a).1,
        a_rejoins,
        "the instance with partitions rejoined"
    );
    a.stop().await;
    b.stop().await;
}
