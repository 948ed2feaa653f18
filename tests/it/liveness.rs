//! Liveness that can fail: a processor whose delivery hangs (a failpoint waiting forever after
//! the store) answers 503 on `/api/v1/health/live` once the stale limit passed; an idle one
//! stays 200 past that limit (waiting for records is not being stuck).

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[tokio::test]
async fn a_processor_stuck_in_a_delivery_stops_being_alive_and_an_idle_one_does_not() {
    let app = spawn_app(|_| {}).await;
    let metrics = free_addr();
    let mut c = helios_process_command(
        &app.kafka.bootstrap_servers,
        &app.topology,
        &unique_schema(),
        &format!("test:{}:", uuid::Uuid::new_v4().simple()),
    );
    c.env("HELIOS_METRICS_ADDR", &metrics)
        .env("HELIOS_LIVENESS_STALE_SECS", "2")
        .env("HELIOS_FAILPOINTS", "deliver.after_store=hang");
    let mut child = KillOnDrop(c.spawn().expect("spawn helios process"), None);
    let client = reqwest::Client::new();
    let live = || async {
        match client
            .get(format!("http://{metrics}/api/v1/health/live"))
            .send()
            .await
        {
            Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
            Err(e) => (0, e.to_string()),
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while live().await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "the processor's metrics port never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Idle for twice the stale limit: alive all along.
    let until = Instant::now() + Duration::from_secs(4);
    while Instant::now() < until {
        let (status, body) = live().await;
        assert_eq!(status, 200, "an idle processor is alive: {body}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // One event: its delivery stores it, then hangs.
    let ev = json!({"event_type": "OrderPlaced", "event_id": "stuck-1", "occurred_at": "2026-12-04T10:00:00Z",
        "data": {"order_id": "O-S", "customer_id": "C-1", "amount": 1.0}});
    let r = app
        .client
        .post(app.url("/api/v1/events/ingest"))
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let deadline = Instant::now() + Duration::from_secs(60);
    let body = loop {
        let (status, body) = live().await;
        if status == 503 {
            break body;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            Instant::now() < deadline,
            "a stuck processor still says it is alive"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(body.contains("stuck: no progress"), "{body}");
    // A stuck loop does not stop on SIGTERM by itself: the supervisor's kill ends it.
    let (stopped, _) = terminate(&mut child.0, Duration::from_secs(3));
    assert!(
        !stopped,
        "a processor stuck in a delivery stopped on SIGTERM by itself"
    );
    app.stop().await;
}
