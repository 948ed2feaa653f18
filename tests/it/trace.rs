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

/// One exported span, as the OTLP/HTTP receiver decoded it.
#[derive(Debug, Clone)]
struct ExportedSpan {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent_span_id: String,
    attributes: std::collections::BTreeMap<String, String>,
}

/// An OTLP/HTTP trace receiver (POST /v1/traces, protobuf), keeping every span it is sent.
async fn otlp_receiver() -> (String, std::sync::Arc<std::sync::Mutex<Vec<ExportedSpan>>>) {
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use opentelemetry_proto::tonic::common::v1::any_value::Value as V;
    use prost::Message;
    let spans: std::sync::Arc<std::sync::Mutex<Vec<ExportedSpan>>> = Default::default();
    let kept = spans.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: axum::body::Bytes| {
            let kept = kept.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
                let text = |v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>| match v
                    .as_ref()
                    .and_then(|v| v.value.as_ref())
                {
                    Some(V::StringValue(s)) => s.clone(),
                    Some(V::IntValue(i)) => i.to_string(),
                    Some(V::BoolValue(b)) => b.to_string(),
                    Some(V::DoubleValue(d)) => d.to_string(),
                    _ => String::new(),
                };
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .iter()
                        .flat_map(|r| &r.attributes)
                        .find(|a| a.key == "service.name")
                        .map(|a| text(&a.value))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            kept.lock().unwrap().push(ExportedSpan {
                                service: service.clone(),
                                name: s.name.clone(),
                                trace_id: hex(&s.trace_id),
                                span_id: hex(&s.span_id),
                                parent_span_id: hex(&s.parent_span_id),
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), text(&a.value)))
                                    .collect(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, router).await });
    (url, spans)
}

/// The spans named `name` of trace `trace_id` received so far.
fn spans_of(
    spans: &std::sync::Mutex<Vec<ExportedSpan>>,
    trace_id: &str,
    name: &str,
) -> Vec<ExportedSpan> {
    spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace_id && s.name == name)
        .cloned()
        .collect()
}

#[tokio::test]
async fn with_an_otlp_endpoint_one_pushed_event_is_one_trace_from_ingress_to_fan_out() {
    let topology = applied_topology(|_| {}).await;
    let (otlp, spans) = otlp_receiver().await;
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "100"),
    ];
    let (mut ingress, base) = ingress_binary(&topology, &env);
    let (schema, prefix, pool) = scratch_store().await;
    let mut processor = helios_process_command(&kafka_bootstrap(), &topology, &schema, &prefix)
        .envs(env)
        .spawn()
        .expect("helios process");
    let client = reqwest::Client::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while !client
        .get(format!("{base}/api/v1/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the ingress never became ready"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // A direct event with the caller's trace context, a wrapped Pub/Sub message carrying it
    // as its attribute, and an event without one (HELIOS starts the trace).
    let post = |path: &str, tp: Option<&str>, body: serde_json::Value| {
        let mut r = client.post(format!("{base}{path}")).json(&body);
        if let Some(tp) = tp {
            r = r.header("traceparent", tp);
        }
        r.send()
    };
    let ingest = "/api/v1/events/ingest";
    let event = |id: &str| json!({"event_type": "OrderPlaced", "event_id": id, "data": {"order_id": id, "customer_id": "C"}});
    assert!(post(ingest, Some(TP), event("ot-1"))
        .await
        .unwrap()
        .status()
        .is_success());
    let data = base64::engine::general_purpose::STANDARD
        .encode(json!({"order_id": "ot-2", "customer_id": "C"}).to_string());
    let pubsub = json!({"message": {"data": data, "messageId": "ot-2", "publishTime": "2026-11-25T10:00:00Z",
        "attributes": {"eventType": "OrderPlaced", "googclient_traceparent": TP_PUBSUB}},
        "subscription": "projects/p/subscriptions/s"});
    assert!(post("/api/v1/webhooks/gcp/pubsub", None, pubsub)
        .await
        .unwrap()
        .status()
        .is_success());
    assert!(post(ingest, None, event("ot-3"))
        .await
        .unwrap()
        .status()
        .is_success());
    expect_count(&pool, "SELECT count(*) FROM events", 3).await;
    let fanout = read_exactly(&kafka_bootstrap(), &topology.event_topic("OrderPlaced"), 3).await;

    // The trace of each event: ingress span ← processor span ← fan-out record.
    let trace_of = |id: &str| -> String {
        let rec = fanout
            .iter()
            .find(|r| r.header("ce_id") == Some(id))
            .unwrap_or_else(|| panic!("no fan-out record for {id}"));
        rec.header("traceparent")
            .unwrap_or_else(|| panic!("{id}'s fan-out record has no traceparent"))
            .to_string()
    };
    for (id, caller) in [
        ("ot-1", Some(TP)),
        ("ot-2", Some(TP_PUBSUB)),
        ("ot-3", None),
    ] {
        let tp = trace_of(id);
        let parts: Vec<&str> = tp.split('-').collect();
        let (trace_id, record_parent) = (parts[1].to_string(), parts[2].to_string());
        if let Some(caller) = caller {
            assert_eq!(
                trace_id,
                caller.split('-').nth(1).unwrap(),
                "{id}: the caller's trace"
            );
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (ingress_span, process_span) = loop {
            let i = spans_of(&spans, &trace_id, "helios.ingress");
            let p = spans_of(&spans, &trace_id, "helios.process");
            if !i.is_empty() && !p.is_empty() {
                assert_eq!((i.len(), p.len()), (1, 1), "{id}: one span of each");
                break (i[0].clone(), p[0].clone());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{id}: trace {trace_id} incomplete: {:?}",
                spans.lock().unwrap()
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        };
        assert_eq!(ingress_span.service, "helios-ingress");
        assert_eq!(process_span.service, "helios-processor");
        assert_eq!(
            ingress_span.parent_span_id,
            caller.map(|c| c.split('-').nth(2).unwrap()).unwrap_or(""),
            "{id}: the ingress span continues the caller's span"
        );
        assert_eq!(
            process_span.parent_span_id, ingress_span.span_id,
            "{id}: the processor span continues the ingress span across the Kafka hop"
        );
        assert_eq!(
            record_parent, process_span.span_id,
            "{id}: the fan-out record carries the processor span"
        );
        assert_eq!(process_span.attributes["helios.event_id"], id);
        assert_eq!(process_span.attributes["helios.outcome"], "stored");
        assert_eq!(
            ingress_span.attributes["messaging.destination.name"],
            topology.raw_topic(if id == "ot-2" {
                helios::source::Source::Gcp
            } else {
                helios::source::Source::Direct
            })
        );
    }
    let _ = processor.kill();
    let _ = ingress.kill();
    let _ = processor.wait();
    let _ = ingress.wait();
}
