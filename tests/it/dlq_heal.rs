//! `helios dlq heal`: a dead letter whose cause a deploy cured is sent back by itself, exactly
//! once; one no deploy can cure never moves; a dry run says which and why; every run is audited;
//! the service exports what it healed and what waits.

use std::time::{Duration, Instant};

use helios::source::Source;
use serde_json::json;

use crate::common::*;

async fn scalar(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

#[tokio::test]
async fn a_dead_letter_heals_itself_once_its_type_is_declared_and_invalid_json_never_moves() {
    let topology = applied_topology(|t| {
        t.unknown_event_types = helios::topology::UnknownEventTypePolicy::Dlq;
    })
    .await;
    let opts = ProcOpts::default();
    let pool = helios::db::connect(&database_url(), Some(&opts.schema))
        .await
        .unwrap();
    helios::db::migrate(&pool).await.unwrap();
    let refund =
        json!({"event_type": "RefundIssued", "event_id": "refund-1", "data": {"order_id": "O-1"}});
    produce_raw(
        &topology.raw_topic(Source::Direct),
        "direct",
        "ingest",
        &[refund.to_string().into_bytes(), b"{not json".to_vec()],
    )
    .await;
    let first = spawn_processor_with(&topology, opts.clone()).await;
    let dlq = read_records(
        &kafka_bootstrap(),
        &topology.dlq_topic(),
        2,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(dlq.len(), 2);
    first.stop().await;

    let dir = scratch_dir("dlq-heal");
    let heal = |t: &helios::topology::Topology, args: &[&str]| {
        let file = dir.join(format!("topology-{}.yaml", uuid::Uuid::new_v4().simple()));
        std::fs::write(&file, serde_norway::to_string(t).unwrap()).unwrap();
        let mut c = helios_cli(t, &opts, &[&["dlq", "heal"], args].concat());
        c.env("HELIOS_TOPOLOGY", &file);
        c
    };

    // Before the deploy: nothing would go, and the dry run says why for each.
    let out = run_ok(heal(&topology, &["--dry-run"]));
    assert!(
        out.contains("still fails (unknown_event_type") && out.contains("never healed"),
        "{out}"
    );
    assert!(out.contains("would heal 0"), "{out}");
    // Runs take turns: while another holds the lock, a run is refused and says why.
    let lock = "hashtext('helios dlq heal'), hashtext(current_schema())";
    let mut holder = pool.acquire().await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_lock({lock})"
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    let refused = heal(&topology, &["--dry-run"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && stderr.contains("another `helios dlq heal` run"),
        "{stderr}"
    );
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT pg_advisory_unlock({lock})"
    )))
    .execute(&mut *holder)
    .await
    .unwrap();
    drop(holder);

    // The deploy: the type is declared (its topic created), the processors restarted on it.
    let mut fixed = topology.clone();
    fixed.event_types.insert(
        "RefundIssued".into(),
        serde_norway::from_str("required: [order_id]").unwrap(),
    );
    helios::kafka::apply_topology(
        &helios::config::KafkaSettings::new(kafka_bootstrap()),
        &fixed,
        false,
    )
    .await
    .expect("topology apply");
    let second = spawn_processor_with(&fixed, opts.clone()).await;
    let out = run_ok(heal(&fixed, &["--dry-run"]));
    assert!(out.contains("would heal 1"), "{out}");
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM events").await,
        0,
        "a dry run sends nothing"
    );

    // The self-healing service: it finds the record and sends it back by itself.
    let port = free_port();
    let _service = KillOnDrop(
        heal(
            &fixed,
            &[
                "--every",
                "1s",
                "--metrics-addr",
                &format!("127.0.0.1:{port}"),
            ],
        )
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("helios dlq heal --every"),
        None,
    );
    expect_count(
        &pool,
        "SELECT count(*) FROM events WHERE event_id = 'refund-1' AND event_type = 'RefundIssued'",
        1,
    )
    .await;
    // Two more runs change nothing: healed once, the invalid record never sent.
    let runs = scalar(&pool, "SELECT count(*) FROM dlq_heal_runs").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    while scalar(
        &pool,
        "SELECT count(*) FROM dlq_heal_runs WHERE finished_at IS NOT NULL",
    )
    .await
        < runs + 2
    {
        assert!(Instant::now() < deadline, "the service stopped running");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(scalar(&pool, "SELECT count(*) FROM events").await, 1);
    assert_eq!(
        scalar(
            &pool,
            "SELECT count(*) FROM dlq_redrives WHERE reason = 'unknown_event_type' AND heal_run IS NOT NULL"
        )
        .await,
        1
    );
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM dlq_redrives").await,
        1,
        "invalid_json is never sent back"
    );
    // Audited: the dry runs healed nothing, the service's runs one record in all.
    assert_eq!(
        scalar(&pool, "SELECT count(*) FROM dlq_heal_runs WHERE dry_run").await,
        2
    );
    assert_eq!(
        scalar(
            &pool,
            "SELECT coalesce(sum(healed), 0) FROM dlq_heal_runs WHERE NOT dry_run AND outcome = 'ok'"
        )
        .await,
        1
    );
    // What the service exports.
    let metrics = reqwest::get(format!("http://127.0.0.1:{port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for line in [
        "helios_dlq_healed_total{reason=\"unknown_event_type\"} 1",
        "helios_dlq_waiting{reason=\"invalid_json\"} 1",
        "helios_dlq_waiting{reason=\"unknown_event_type\"} 0",
    ] {
        assert!(metrics.contains(line), "no `{line}` in:\n{metrics}");
    }
    assert!(metrics.contains("helios_dlq_waiting_oldest_seconds{reason=\"invalid_json\"}"));
    second.stop().await;
    let _ = std::fs::remove_dir_all(&dir);
}
