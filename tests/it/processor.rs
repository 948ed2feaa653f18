//! The processor end to end: HTTP push → raw topic → processor → PostgreSQL row + fan-out record
//! (+ DLQ for what cannot be used), against the real broker, Redis and PostgreSQL.

use std::time::Duration;

use base64::Engine;
use helios::source::Source;
use serde_json::json;
use sqlx::Row;

use crate::common::*;

fn eb_order(id: &str, order: &str, customer: Option<&str>) -> String {
    let mut detail = json!({"order_id": order, "amount": 99.5});
    if let Some(c) = customer {
        detail["customer_id"] = json!(c);
    }
    json!({"version": "0", "id": id, "detail-type": "OrderPlaced", "source": "com.example.orders",
        "account": "111122223333", "time": "2026-11-22T09:15:02Z", "region": "eu-west-1",
        "resources": [], "detail": detail})
    .to_string()
}

async fn post(
    app: &TestApp,
    path: &str,
    body: impl Into<reqwest::Body>,
    headers: &[(&str, &str)],
) -> u16 {
    let mut r = app.client.post(app.url(path)).body(body);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn every_cloud_end_to_end_into_postgres_and_fan_out() {
    let app = spawn_app(|c| c.sns.verify_signatures = false).await;
    let proc = spawn_processor(&app.topology).await;

    // AWS EventBridge.
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/aws/eventbridge",
            eb_order("eb-1", "O-1", Some("C-1")),
            &[]
        )
        .await,
        200
    );
    // AWS SNS carrying a plain JSON message typed by its (signed) Subject.
    let sns = json!({"Type": "Notification", "MessageId": "sns-1", "TopicArn": "arn:aws:sns:eu-west-1:1:orders",
        "Subject": "InventoryReserved",
        "Message": "{\"order_id\":\"O-2\",\"sku\":\"SKU-9\"}", "Timestamp": "2026-11-22T09:16:00.000Z"});
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/aws/sns",
            sns.to_string(),
            &[
                ("content-type", "text/plain; charset=UTF-8"),
                ("x-amz-sns-message-type", "Notification")
            ]
        )
        .await,
        200
    );
    // GCP Pub/Sub, wrapped.
    let data =
        base64::engine::general_purpose::STANDARD.encode(br#"{"order_id":"O-3","amount":12.5}"#);
    let ps = json!({"message": {"data": data, "attributes": {"eventType": "PaymentProcessed"}, "messageId": "ps-1",
        "message_id": "ps-1", "publishTime": "2026-11-22T09:17:00Z", "publish_time": "2026-11-22T09:17:00Z"},
        "subscription": "projects/p/subscriptions/helios"});
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/gcp/pubsub",
            ps.to_string(),
            &[("content-type", "application/json")]
        )
        .await,
        200
    );
    // Azure Event Grid schema and CloudEvents.
    let eg = json!([{"id": "eg-1", "topic": "/subscriptions/s/resourceGroups/rg/providers/Microsoft.EventGrid/topics/orders",
        "subject": "orders/O-4", "eventType": "Contoso.Orders.OrderPlaced", "eventTime": "2026-11-22T09:18:00Z",
        "data": {"orderId": "O-4", "customerId": "C-4"}, "dataVersion": "1", "metadataVersion": "1"}]);
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/azure/eventgrid",
            eg.to_string(),
            &[("aeg-event-type", "Notification")]
        )
        .await,
        200
    );
    let ce = json!({"specversion": "1.0", "type": "Contoso.Orders.PaymentProcessed", "source": "/contoso/orders",
        "id": "ce-1", "time": "2026-11-22T09:19:00Z", "data": {"order_id": "O-4", "amount": 10}});
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/azure/eventgrid",
            ce.to_string(),
            &[("content-type", "application/cloudevents+json")]
        )
        .await,
        200
    );
    // Direct.
    assert_eq!(
        post(
            &app,
            "/api/v1/events/ingest",
            include_bytes!("../../samples/direct-event.json").to_vec(),
            &[]
        )
        .await,
        202
    );

    expect_count(&proc.pool, "SELECT count(*) FROM events", 6).await;
    let rows = sqlx::query("SELECT source, event_id, event_type, order_id, customer_id, raw_topic FROM events ORDER BY event_id")
        .fetch_all(&proc.pool).await.unwrap();
    type Row5 = (String, String, String, Option<String>, Option<String>);
    let got: Vec<Row5> = rows
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
        .collect();
    let expect = |s: &str, id: &str, t: &str, o: Option<&str>, c: Option<&str>| {
        (
            s.to_string(),
            id.to_string(),
            t.to_string(),
            o.map(String::from),
            c.map(String::from),
        )
    };
    assert_eq!(
        got,
        vec![
            expect(
                "azure",
                "/contoso/orders#ce-1",
                "PaymentProcessed",
                Some("O-4"),
                None
            ),
            expect(
                "direct",
                "d-0001",
                "OrderPlaced",
                Some("O-2001"),
                Some("C-9")
            ),
            expect("aws", "eb-1", "OrderPlaced", Some("O-1"), Some("C-1")),
            expect("azure", "eg-1", "OrderPlaced", Some("O-4"), Some("C-4")),
            expect("gcp", "ps-1", "PaymentProcessed", Some("O-3"), None),
            expect("aws", "sns-1", "InventoryReserved", Some("O-2"), None),
        ]
    );
    assert!(rows.iter().all(|r| r
        .get::<String, _>(5)
        .starts_with(&app.topology.topic_prefix)));

    // Fan-out: keyed by order id, CloudEvents headers, lineage back to the raw record.
    let placed = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("OrderPlaced"),
        3,
    )
    .await;
    let eb = placed
        .iter()
        .find(|r| r.header("ce_id") == Some("eb-1"))
        .expect("eb-1 fanned out");
    assert_eq!(eb.key.as_deref(), Some(&b"O-1"[..]));
    assert_eq!(eb.header("ce_type"), Some("OrderPlaced"));
    assert_eq!(eb.header("ce_specversion"), Some("1.0"));
    assert_eq!(eb.header("ce_source"), Some("/helios/aws"));
    assert_eq!(eb.header("ce_time"), Some("2026-11-22T09:15:02.000Z"));
    assert_eq!(
        eb.header("helios-raw-topic"),
        Some(app.raw_topic(Source::Aws).as_str())
    );
    let v: serde_json::Value = serde_json::from_slice(&eb.value).unwrap();
    assert_eq!(v["data"]["customer_id"], "C-1");
    assert_eq!(v["metadata"]["aws_account"], "111122223333");
    read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("PaymentProcessed"),
        2,
    )
    .await;
    read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("InventoryReserved"),
        1,
    )
    .await;
    read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 0).await;
    proc.stop().await;
}

#[tokio::test]
async fn the_same_event_twice_and_through_two_deliveries_is_one_row_and_one_fan_out() {
    let app = spawn_app(|c| c.sns.verify_signatures = false).await;
    let proc = spawn_processor(&app.topology).await;
    let ev = eb_order("dup-1", "O-77", Some("C-7"));
    // The same EventBridge event twice (a retry), and once more inside an SNS notification.
    assert_eq!(
        post(&app, "/api/v1/webhooks/aws/eventbridge", ev.clone(), &[]).await,
        200
    );
    assert_eq!(
        post(&app, "/api/v1/webhooks/aws/eventbridge", ev.clone(), &[]).await,
        200
    );
    let sns = json!({"Type": "Notification", "MessageId": "sns-wrap-1", "TopicArn": "arn:aws:sns:eu-west-1:1:t",
        "Message": ev, "Timestamp": "2026-11-22T09:16:00.000Z"});
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/aws/sns",
            sns.to_string(),
            &[("x-amz-sns-message-type", "Notification")]
        )
        .await,
        200
    );
    // A later event proves the partition moved past all three.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/aws/eventbridge",
            eb_order("after-1", "O-78", Some("C-7")),
            &[]
        )
        .await,
        200
    );
    expect_count(&proc.pool, "SELECT count(*) FROM events", 2).await;
    let ids: Vec<String> = sqlx::query_scalar("SELECT event_id FROM events ORDER BY event_id")
        .fetch_all(&proc.pool)
        .await
        .unwrap();
    assert_eq!(ids, ["after-1", "dup-1"]);
    let out = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.topology.event_topic("OrderPlaced"),
        2,
    )
    .await;
    assert_eq!(
        out.iter()
            .filter(|r| r.header("ce_id") == Some("dup-1"))
            .count(),
        1
    );
    read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 0).await;
    let (raw, units, outs, dups, dlq) = proc.stats.snapshot();
    assert_eq!((raw, units, outs, dups, dlq), (4, 4, 2, 2, 0));
    proc.stop().await;
}

#[tokio::test]
async fn rule_violations_go_to_the_dlq_with_reasons_and_the_partition_keeps_moving() {
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor(&app.topology).await;
    let bad = [
        json!({"event_type": "OrderPlaced", "event_id": "r-1", "data": {"order_id": "O-1"}}),
        json!({"event_type": "PaymentProcessed", "event_id": "r-2", "data": {"order_id": "O-1"}}),
        json!({"event_type": "InventoryReserved", "event_id": "r-3", "data": {"sku": "S"}}),
        json!({"event_type": "ShipmentSent", "event_id": "r-4", "data": {"order_id": "O-1"}}),
        json!({"event_id": "r-5", "data": {"order_id": "O-1"}}),
        json!({"event_type": "PaymentProcessed", "event_id": "r-6", "data": {"order_id": "O-1", "amount": "twelve"}}),
    ];
    for b in &bad {
        assert_eq!(
            post(&app, "/api/v1/events/ingest", b.to_string(), &[]).await,
            202
        );
    }
    // Not JSON at all, straight into the raw topic (the ingress would refuse it): still DLQ'd.
    produce_raw(
        &app.raw_topic(Source::Direct),
        "direct",
        "ingest",
        &[b"{broken".to_vec()],
    )
    .await;
    let good = json!({"event_type": "OrderPlaced", "event_id": "r-ok", "data": {"order_id": "O-9", "customer_id": "C-9"}});
    assert_eq!(
        post(&app, "/api/v1/events/ingest", good.to_string(), &[]).await,
        202
    );
    expect_count(&proc.pool, "SELECT count(*) FROM events", 1).await;

    let dlq = read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 7).await;
    let by_id = |id: &str| {
        dlq.iter()
            .find(|r| String::from_utf8_lossy(&r.value).contains(id))
            .unwrap_or_else(|| panic!("{id} not in DLQ"))
    };
    let check = |id: &str, reason: &str, stage: &str, field: Option<&str>| {
        let r = by_id(id);
        assert_eq!(r.header("helios-dlq-reason"), Some(reason), "{id}");
        assert_eq!(r.header("helios-dlq-stage"), Some(stage), "{id}");
        assert_eq!(r.header("helios-dlq-field"), field, "{id}");
        assert_eq!(
            r.header("helios-dlq-raw-topic"),
            Some(app.raw_topic(Source::Direct).as_str())
        );
        assert!(r
            .header("helios-dlq-raw-offset")
            .unwrap()
            .parse::<i64>()
            .is_ok());
        assert!(!r.header("helios-dlq-detail").unwrap_or("").is_empty());
        // The raw record travels unchanged, headers included.
        assert_eq!(r.header("helios-source"), Some("direct"));
    };
    check(
        "r-1",
        "missing_required_field",
        "validate",
        Some("customer_id"),
    );
    check("r-2", "missing_required_field", "validate", Some("amount"));
    check(
        "r-3",
        "missing_required_field",
        "validate",
        Some("order_id"),
    );
    check("r-4", "unknown_event_type", "route", None);
    check("r-5", "missing_event_type", "normalize", None);
    check("r-6", "schema_violation", "validate", Some("amount"));
    let schema_hdr = |h: &str| by_id("r-6").header(h).map(str::to_string);
    assert_eq!(
        schema_hdr("helios-dlq-schema-subject"),
        Some("io.helios.events.PaymentProcessed".to_string())
    );
    assert_eq!(
        schema_hdr("helios-dlq-schema-version").as_deref(),
        Some("1")
    );
    let broken = dlq
        .iter()
        .find(|r| r.value == b"{broken")
        .expect("broken record in DLQ");
    assert_eq!(broken.header("helios-dlq-reason"), Some("invalid_json"));
    assert_eq!(broken.header("helios-dlq-stage"), Some("parse"));
    assert_eq!(by_id("r-1").value, bad[0].to_string().into_bytes());
    let (_, units, outs, dups, dlq) = proc.stats.snapshot();
    assert_eq!((units, outs, dups, dlq), (8, 1, 0, 7));
    proc.stop().await;
}

#[tokio::test]
async fn handshakes_are_counted_and_skipped() {
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor(&app.topology).await;
    assert_eq!(
        post(
            &app,
            "/api/v1/webhooks/azure/eventgrid",
            include_bytes!("../../samples/azure-eventgrid-validation.json").to_vec(),
            &[("aeg-event-type", "SubscriptionValidation")]
        )
        .await,
        200
    );
    let ok = json!({"event_type": "OrderPlaced", "event_id": "h-ok", "data": {"order_id": "O", "customer_id": "C"}});
    assert_eq!(
        post(&app, "/api/v1/events/ingest", ok.to_string(), &[]).await,
        202
    );
    expect_count(&proc.pool, "SELECT count(*) FROM events", 1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&proc.pool)
        .await
        .unwrap();
    assert_eq!(n, 1);
    read_exactly(&app.kafka.bootstrap_servers, &app.topology.dlq_topic(), 0).await;
    proc.stop().await;
}
