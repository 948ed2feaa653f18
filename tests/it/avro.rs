//! Avro fan-out mode against the in-test schema registry ([`crate::registry`]). Records are
//! decoded here with the schema file from schemas/, independently of the encoder.

use std::collections::HashMap;

use apache_avro::types::Value;
use serde_json::json;

use crate::common::*;
use crate::registry::start_registry;

#[tokio::test]
async fn avro_mode_registers_on_first_use_and_writes_confluent_wire_format() {
    let (url, reg) = start_registry().await;
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor_with(
        &app.topology,
        ProcOpts {
            schema_registry_url: Some(url),
            ..ProcOpts::default()
        },
    )
    .await;
    for i in 0..3 {
        let ev = json!({"event_type": "OrderPlaced", "event_id": format!("av-{i}"), "occurred_at": "2026-11-22T10:00:00Z",
            "data": {"order_id": format!("O-{i}"), "customer_id": "C-1", "amount": 5.5}});
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .body(ev.to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
    }
    expect_count(&proc.pool, "SELECT count(*) FROM events", 3).await;
    let topic = app.topology.event_topic("OrderPlaced");
    let recs = read_exactly(&app.kafka.bootstrap_servers, &topic, 3).await;

    let subject = format!("{topic}-value");
    let id = {
        let r = reg.lock().unwrap();
        let ids = r
            .subjects
            .get(&subject)
            .unwrap_or_else(|| panic!("nothing registered under {subject}"));
        ids[0]
    };
    let schema =
        apache_avro::Schema::parse_str(include_str!("../../schemas/CanonicalEvent.avsc")).unwrap();
    for (i, rec) in recs.iter().enumerate() {
        assert_eq!(rec.value[0], 0, "magic byte");
        assert_eq!(
            u32::from_be_bytes(rec.value[1..5].try_into().unwrap()),
            id,
            "schema id"
        );
        assert_eq!(rec.header("content-type"), Some("application/avro"));
        let mut body = &rec.value[5..];
        let v = apache_avro::reader::datum::GenericDatumReader::builder(&schema)
            .build()
            .unwrap()
            .read_value(&mut body)
            .expect("decodes with schemas/CanonicalEvent.avsc");
        let Value::Record(fields) = v else {
            panic!("not a record")
        };
        let f: HashMap<String, Value> = fields.into_iter().collect();
        assert_eq!(f["event_id"], Value::String(format!("av-{i}")));
        assert_eq!(f["event_type"], Value::String("OrderPlaced".into()));
        assert_eq!(f["source"], Value::Enum(3, "direct".into()));
        assert_eq!(
            f["order_id"],
            Value::Union(1, Box::new(Value::String(format!("O-{i}"))))
        );
        assert_eq!(
            f["occurred_at"],
            Value::TimestampMicros(1_795_341_600_000_000)
        );
        let Value::String(data) = &f["data"] else {
            panic!("data")
        };
        let data: serde_json::Value = serde_json::from_str(data).unwrap();
        assert_eq!(data["amount"], 5.5);
    }
    // Registered on first use, then cached.
    assert_eq!(reg.lock().unwrap().registrations, 1);
    proc.stop().await;
}

#[tokio::test]
async fn tap_decodes_avro_fan_out_through_the_registry() {
    let (url, _reg) = start_registry().await;
    let app = spawn_app(|_| {}).await;
    let opts = ProcOpts {
        schema_registry_url: Some(url.clone()),
        ..ProcOpts::default()
    };
    let proc = spawn_processor_with(&app.topology, opts.clone()).await;
    let ev = json!({"event_type": "OrderPlaced", "event_id": "tap-av-1", "occurred_at": "2026-11-22T10:00:00Z",
        "data": {"order_id": "O-TAP", "customer_id": "C-1", "amount": 5.5}});
    let r = app
        .client
        .post(app.url("/api/v1/events/ingest"))
        .body(ev.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    expect_count(&proc.pool, "SELECT count(*) FROM events", 1).await;
    let topic = app.topology.event_topic("OrderPlaced");
    read_exactly(&app.kafka.bootstrap_servers, &topic, 1).await;

    let mut c = helios_cli(
        &app.topology,
        &opts,
        &[
            "tap",
            "events",
            "--from",
            "beginning",
            "--order-id",
            "O-TAP",
        ],
    );
    c.env("SCHEMA_REGISTRY_URL", &url);
    // Off this thread: the stand-in registry answers on this test's runtime.
    let out = tokio::task::spawn_blocking(move || run_ok(c))
        .await
        .unwrap();
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line per record"))
        .collect();
    assert_eq!(lines.len(), 1, "{out}");
    let rec = &lines[0];
    assert_eq!(rec["topic"], topic.as_str());
    assert_eq!(rec["key"], "O-TAP");
    assert_eq!(rec["headers"]["content-type"], "application/avro");
    assert!(rec["value"]["avro_schema_id"].as_u64().is_some(), "{rec}");
    let record = &rec["value"]["record"];
    assert_eq!(record["event_id"], "tap-av-1");
    assert_eq!(
        record["data"]["amount"], 5.5,
        "data decoded from its JSON text: {rec}"
    );
    proc.stop().await;
}
