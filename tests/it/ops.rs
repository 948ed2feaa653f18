//! Health, metrics, docs, and the limits every endpoint shares.

use helios::source::Source;

use crate::common::*;

#[tokio::test]
async fn oversized_bodies_are_413_on_every_endpoint_and_nothing_panics() {
    let app = spawn_app(|c| c.max_body_bytes = 1024).await;
    let big = vec![b' '; 4096];
    for path in [
        "/api/v1/webhooks/aws/eventbridge",
        "/api/v1/webhooks/aws/sns",
        "/api/v1/webhooks/gcp/pubsub",
        "/api/v1/webhooks/azure/eventgrid",
        "/api/v1/events/ingest",
    ] {
        let r = app
            .client
            .post(app.url(path))
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 413, "{path}");
        // Garbage of every kind: a clear 4xx, never a 5xx or a dropped connection.
        for junk in [&b"\xff\xfe\x00"[..], b"", b"null", b"{\"Type\":\"Nope\"}"] {
            let r = app
                .client
                .post(app.url(path))
                .body(junk.to_vec())
                .send()
                .await
                .unwrap();
            assert!(
                r.status().is_client_error() || r.status().is_success(),
                "{path} {:?}: {}",
                junk,
                r.status()
            );
        }
    }
    let r = app
        .client
        .get(app.url("/api/v1/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test]
async fn health_metrics_and_docs() {
    let app = spawn_app(|_| {}).await;
    for path in [
        "/api/v1/health",
        "/api/v1/webhooks/aws/health",
        "/api/v1/webhooks/gcp/health",
        "/api/v1/webhooks/azure/health",
    ] {
        let r = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["status"], "ready");
        assert_eq!(v["kafka"]["reachable"], true);
    }
    let r = app
        .client
        .post(app.url("/api/v1/webhooks/aws/eventbridge"))
        .body(&include_bytes!("../../samples/aws-eventbridge.json")[..])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "helios_ingress_requests_total{",
        "helios_ingress_produce_duration_seconds_bucket{",
        "helios_ingress_raw_records_total{",
        "helios_kafka_reachable 1",
    ] {
        assert!(m.contains(needle), "missing {needle} in:\n{m}");
    }
    assert!(m
        .lines()
        .any(|l| l.starts_with("helios_ingress_requests_total")
            && l.contains("source=\"aws\"")
            && l.contains("endpoint=\"eventbridge\"")
            && l.contains("status=\"200\"")));

    let spec: serde_json::Value = app
        .client
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    for p in [
        "/api/v1/webhooks/aws/sns",
        "/api/v1/webhooks/azure/eventgrid",
        "/api/v1/events/ingest",
    ] {
        assert!(spec["paths"][p].is_object(), "{p}");
    }
    let html = app
        .client
        .get(app.url("/docs"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(html.contains("/api/v1/webhooks/gcp/pubsub"));
    read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 1).await;
}

#[tokio::test]
async fn graceful_stop_answers_in_flight_requests() {
    let app = spawn_app(|_| {}).await;
    let client = app.client.clone();
    let url = app.url("/api/v1/events/ingest");
    let inflight: Vec<_> = (0..20)
        .map(|i| {
            let c = client.clone();
            let u = url.clone();
            tokio::spawn(async move {
                c.post(u)
                    .body(format!("{{\"event_type\":\"OrderPlaced\",\"n\":{i}}}"))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
            })
        })
        .collect();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let bootstrap = app.kafka.bootstrap_servers.clone();
    let topic = app.raw_topic(Source::Direct);
    app.stop().await;
    let mut accepted = 0;
    for t in inflight {
        match t.await.unwrap() {
            Ok(202) => accepted += 1,
            Ok(s) => panic!("in-flight request answered {s}"),
            Err(_) => {} // sent after the listener closed: never acknowledged, so not lost
        }
    }
    // Every acknowledged request is in Kafka.
    let recs = read_records(
        &bootstrap,
        &topic,
        accepted + 1,
        std::time::Duration::from_secs(8),
    )
    .await;
    assert_eq!(recs.len(), accepted);
}
