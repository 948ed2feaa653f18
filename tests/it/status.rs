//! `helios status` against the real broker, PostgreSQL and Redis: lag, dependencies, recent DLQ
//! records, subscription handshakes, events of the last hour; exit code 1 when unhealthy.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

fn status(topology: &helios::topology::Topology, opts: &ProcOpts) -> (Value, i32) {
    let out = helios_cli(topology, opts, &["status", "--json"])
        .output()
        .expect("helios status");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "status --json is not JSON ({e}): {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (v, out.status.code().unwrap_or(-1))
}

#[tokio::test]
async fn status_shows_lag_dlq_handshakes_and_events_and_fails_when_unhealthy() {
    let app = spawn_app(|_| {}).await;
    let topology = app.topology.clone();
    let opts = ProcOpts::default();
    let proc = spawn_processor_with(&topology, opts.clone()).await;

    for i in 0..3 {
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .json(&json!({"event_type": "OrderPlaced", "event_id": format!("st-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success(), "{}", r.status());
    }
    // Missing customer_id: dead-lettered (missing_required_field).
    let r = app
        .client
        .post(app.url("/api/v1/events/ingest"))
        .json(&json!({"event_type": "OrderPlaced", "event_id": "st-bad", "data": {"order_id": "O-9"}}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let validation = json!([{"id": "v-1", "topic": "/subscriptions/s", "subject": "", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
        "eventTime": "2026-11-25T10:00:00Z", "data": {"validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}, "dataVersion": "1", "metadataVersion": "1"}]);
    let r = app
        .client
        .post(app.url("/api/v1/webhooks/azure/eventgrid"))
        .header("aeg-event-type", "SubscriptionValidation")
        .header("aeg-subscription-name", "ORDERS-SUB")
        .json(&validation)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    expect_count(&proc.pool, "SELECT count(*) FROM events", 3).await;

    // Until the processor has committed everything (lag 0) and the DLQ record is counted.
    let deadline = Instant::now() + Duration::from_secs(60);
    let (v, code) = loop {
        let (v, code) = status(&topology, &opts);
        let dlq_seen = v["dlq"].as_array().is_some_and(|d| !d.is_empty());
        if (v["total_lag"] == 0 && dlq_seen) || Instant::now() > deadline {
            break (v, code);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert_eq!(code, 0, "healthy status exits 0: {v}");
    assert_eq!(v["healthy"], true);
    assert_eq!(v["total_lag"], 0, "{v}");
    let partitions = v["partitions"].as_array().unwrap();
    let direct = app.raw_topic(helios::source::Source::Direct);
    let of_direct = |field: &str| -> i64 {
        partitions
            .iter()
            .filter(|p| p["topic"] == direct.as_str())
            .filter_map(|p| p[field].as_i64())
            .sum()
    };
    assert_eq!(
        (of_direct("end_offset"), of_direct("committed")),
        (4, 4),
        "the direct raw topic holds 4 records, all committed: {partitions:?}"
    );
    let names: Vec<&str> = v["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["kafka", "postgresql", "redis"]);
    assert!(v["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .all(|d| d["healthy"] == true && d["latency_ms"].as_f64().is_some()));
    let dlq = v["dlq"].as_array().unwrap();
    assert_eq!(dlq.len(), 1, "{dlq:?}");
    assert_eq!(dlq[0]["reason"], "missing_required_field");
    assert_eq!(dlq[0]["source"], "direct");
    assert_eq!(
        (dlq[0]["last_hour"].as_u64(), dlq[0]["last_24h"].as_u64()),
        (Some(1), Some(1))
    );
    let subs = v["subscriptions"].as_array().unwrap();
    assert!(
        subs.iter().any(|s| s["source"] == "azure"
            && s["handshake"] == "eventgrid-subscription-validation"
            && s["subscription"] == "ORDERS-SUB"
            && s["count"] == 1),
        "{subs:?}"
    );
    assert_eq!(v["events_last_hour"]["OrderPlaced"], 3, "{v}");

    // The screen, for people.
    let screen = run_ok(helios_cli(&topology, &opts, &["status"]));
    println!("{screen}");
    assert!(
        screen.contains("HEALTHY") && screen.contains("missing_required_field"),
        "{screen}"
    );

    // Redis unreachable: the status says so and exits 1.
    let down = ProcOpts {
        redis_url: "redis://127.0.0.1:1".into(),
        ..opts.clone()
    };
    let (v, code) = status(&topology, &down);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["healthy"], false);
    let redis = v["dependencies"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "redis")
        .unwrap()
        .clone();
    assert_eq!(redis["healthy"], false);
    assert!(redis["error"].as_str().is_some_and(|e| !e.is_empty()));
    proc.stop().await;
    app.stop().await;
}
