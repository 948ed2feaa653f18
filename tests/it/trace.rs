//! W3C trace context across the Kafka hop: the request's `traceparent` (or a Pub/Sub message's
//! `googclient_traceparent` attribute) is landed with the raw record, kept in the event's
//! metadata, and written on the fan-out record; an invalid one is dropped.

use base64::Engine;
use serde_json::json;

use crate::common::*;

const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TP_PUBSUB: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

#[tokio::test]
async fn trace_context_travels_from_the_request_to_the_fan_out_record() {
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor(&app.topology).await;
    for (id, tp) in [("tr-1", TP), ("tr-2", "not-a-traceparent")] {
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .header("traceparent", tp)
            .json(&json!({"event_type": "OrderPlaced", "event_id": id, "data": {"order_id": id, "customer_id": "C"}}))
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let data = base64::engine::general_purpose::STANDARD
        .encode(json!({"order_id": "tr-3", "customer_id": "C"}).to_string());
    let r = app
        .client
        .post(app.url("/api/v1/webhooks/gcp/pubsub"))
        .json(&json!({"message": {"data": data, "messageId": "tr-3", "publishTime": "2026-11-25T10:00:00Z",
            "attributes": {"eventType": "OrderPlaced", "googclient_traceparent": TP_PUBSUB}},
            "subscription": "projects/p/subscriptions/s"}))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    expect_count(&proc.pool, "SELECT count(*) FROM events", 3).await;

    let raw = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(helios::source::Source::Direct),
        2,
    )
    .await;
    assert!(raw.iter().any(|r| r.header("traceparent") == Some(TP)));
    let out = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("OrderPlaced"),
        3,
    )
    .await;
    let tp_of = |id: &str| {
        out.iter()
            .find(|r| r.header("ce_id") == Some(id))
            .unwrap_or_else(|| panic!("no fan-out record for {id}"))
            .header("traceparent")
            .map(str::to_string)
    };
    assert_eq!(tp_of("tr-1").as_deref(), Some(TP));
    assert_eq!(tp_of("tr-2"), None, "an invalid traceparent is dropped");
    assert_eq!(tp_of("tr-3").as_deref(), Some(TP_PUBSUB));
    let stored: Option<String> =
        sqlx::query_scalar("SELECT metadata->>'traceparent' FROM events WHERE event_id = 'tr-1'")
            .fetch_one(&proc.pool)
            .await
            .unwrap();
    assert_eq!(stored.as_deref(), Some(TP));
    proc.stop().await;
}
