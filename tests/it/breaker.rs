//! Circuit breakers per dependency: a PostgreSQL outage opens the processor's `postgres` breaker,
//! which half-opens (probes) on its schedule while the outage lasts and closes on recovery, with
//! nothing lost; `helios status --json --processor-metrics` shows the state (and an open breaker
//! makes the status unhealthy).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

const STATE: &str = "helios_breaker_state{dependency=\"postgres\"}";

/// `helios status --json` with the processor's metrics: its breakers and the exit code.
fn status(
    topology: &helios::topology::Topology,
    schema: &str,
    metrics: &str,
) -> (serde_json::Value, bool) {
    let mut c = helios_cli(topology, &ProcOpts::default(), &["status", "--json"]);
    c.env("HELIOS_DB_SCHEMA", schema)
        .env("HELIOS_STATUS_PROCESSORS", metrics);
    let out = c.output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));
    (v, out.status.success())
}

fn postgres_breaker(v: &serde_json::Value) -> String {
    v["breakers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["dependency"] == "postgres")
        .map(|b| b["state"].as_str().unwrap().to_string())
        .unwrap_or_default()
}

#[tokio::test]
async fn a_postgres_outage_opens_its_breaker_which_probes_on_schedule_and_closes_on_recovery() {
    let topology = applied_topology(|_| {}).await;
    let (schema, prefix, pool) = scratch_store().await;
    helios::db::migrate(&pool).await.unwrap();
    sqlx::query("ALTER TABLE events RENAME TO events_away")
        .execute(&pool)
        .await
        .unwrap();
    let bodies: Vec<Vec<u8>> = (0..20)
        .map(|i| json!({"event_type": "OrderPlaced", "event_id": format!("brk-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}).to_string().into_bytes())
        .collect();
    produce_direct_to(&kafka_bootstrap(), &topology, &bodies).await;
    let metrics = free_addr();
    let mut child = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .env("HELIOS_METRICS_ADDR", &metrics)
        .spawn()
        .unwrap();
    // Closed at start-up, exported before any failure.
    let exported = Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("http://{metrics}/metrics"))
        .await
        .map(|_| true)
        .unwrap_or(false)
    {
        assert!(
            Instant::now() < exported,
            "the processor's metrics never came up"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Open after three failures in a row.
    assert_eq!(
        wait_metric(&metrics, STATE, 2.0, Duration::from_secs(60)).await,
        2.0,
        "the postgres breaker never opened"
    );
    assert!(
        metric_value(
            &metrics,
            "helios_breaker_opened_total{dependency=\"postgres\"}"
        )
        .await
            >= 1.0
    );
    // While the outage lasts it half-opens on its schedule: each probe fails and opens it again.
    let probes = wait_metric(
        &metrics,
        "helios_breaker_probes_total{dependency=\"postgres\"}",
        2.0,
        Duration::from_secs(60),
    )
    .await;
    assert!(probes >= 2.0, "probes {probes}");
    // The other dependencies are fine: their breakers stay closed.
    for d in ["redis", "kafka"] {
        assert_eq!(
            metric_value(
                &metrics,
                &format!("helios_breaker_state{{dependency=\"{d}\"}}")
            )
            .await,
            0.0,
            "{d}"
        );
    }
    let (v, healthy) = status(&topology, &schema, &metrics);
    let state = postgres_breaker(&v);
    assert!(
        state == "open" || state == "half_open",
        "status shows the postgres breaker {state}: {}",
        v["breakers"]
    );
    if state == "open" {
        assert!(!healthy, "an open breaker makes the status unhealthy");
    }

    // Recovery: the next probe succeeds and closes it; everything is stored once.
    sqlx::query("ALTER TABLE events_away RENAME TO events")
        .execute(&pool)
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while metric_value(&metrics, STATE).await != 0.0 {
        assert!(
            Instant::now() < deadline,
            "the postgres breaker never closed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    expect_count(&pool, "SELECT count(*) FROM events", 20).await;
    let (v, healthy) = status(&topology, &schema, &metrics);
    assert_eq!(postgres_breaker(&v), "closed", "{}", v["breakers"]);
    assert!(healthy, "closed breakers and healthy dependencies: {v}");
    let _ = terminate(&mut child, Duration::from_secs(30));
}
