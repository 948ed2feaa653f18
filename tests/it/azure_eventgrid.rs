//! Event Grid: both schemas, both handshakes, and the shared secret.

use helios::source::Source;
use serde_json::Value;

use crate::common::*;

const PATH: &str = "/api/v1/webhooks/azure/eventgrid";
const EG: &[u8] = include_bytes!("../../samples/azure-eventgrid.json");
const VALIDATION: &[u8] = include_bytes!("../../samples/azure-eventgrid-validation.json");
const CE: &[u8] = include_bytes!("../../samples/azure-cloudevent.json");
const CE_BATCH: &[u8] = include_bytes!("../../samples/azure-cloudevents-batch.json");

#[tokio::test]
async fn event_grid_and_cloudevents_bodies_land_byte_for_byte() {
    let app = spawn_app(|_| {}).await;
    let cases: [(&[u8], &str); 3] = [
        (EG, "application/json; charset=utf-8"),
        (CE, "application/cloudevents+json; charset=utf-8"),
        (
            CE_BATCH,
            "application/cloudevents-batch+json; charset=utf-8",
        ),
    ];
    for (body, ct) in cases {
        let r = app
            .client
            .post(app.url(PATH))
            .header("content-type", ct)
            .header("aeg-event-type", "Notification")
            .header("aeg-subscription-name", "HELIOS-SUB")
            .header("aeg-delivery-count", "0")
            .header("aeg-metadata-version", "1")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let recs = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Azure),
        3,
    )
    .await;
    for (r, (body, ct)) in recs.iter().zip(cases) {
        assert_eq!(r.value, body);
        assert_raw_headers(r, "azure", "eventgrid", "event");
        assert_eq!(r.header("content-type"), Some(ct));
        assert_eq!(r.header("aeg-subscription-name"), Some("HELIOS-SUB"));
        assert_eq!(r.header("aeg-delivery-count"), Some("0"));
    }
}

#[tokio::test]
async fn subscription_validation_answers_200_with_the_code_and_is_landed() {
    // Only configured subscription names become metric labels.
    let app = spawn_app(|c| c.eventgrid.subscriptions = vec!["HELIOS-SUB".into()]).await;
    let r = app
        .client
        .post(app.url(PATH))
        .header("content-type", "application/json; charset=utf-8")
        .header("aeg-event-type", "SubscriptionValidation")
        .header("aeg-subscription-name", "HELIOS-SUB")
        .body(VALIDATION)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body,
        serde_json::json!({"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"})
    );
    let recs = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Azure),
        1,
    )
    .await;
    assert_eq!(recs[0].value, VALIDATION);
    assert_raw_headers(&recs[0], "azure", "eventgrid", "handshake");
    assert_eq!(
        recs[0].header("helios-handshake"),
        Some("eventgrid-subscription-validation")
    );
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics
        .lines()
        .any(|l| l.contains("helios_ingress_handshakes_total")
            && l.contains("subscription=\"HELIOS-SUB\"")
            && l.contains("outcome=\"validated\"")));
}

#[tokio::test]
async fn cloudevents_options_handshake_echoes_the_origin() {
    let app = spawn_app(|_| {}).await;
    // A sovereign-cloud origin: echoed, never replaced by eventgrid.azure.net.
    let r = app
        .client
        .request(reqwest::Method::OPTIONS, app.url(PATH))
        .header("webhook-request-origin", "eventgrid.azure.us")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["webhook-allowed-origin"], "eventgrid.azure.us");
    assert_eq!(r.headers()["webhook-allowed-rate"], "*");
    let r = app
        .client
        .request(reqwest::Method::OPTIONS, app.url(PATH))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(!r.headers().contains_key("webhook-allowed-origin"));
    let recs = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Azure),
        1,
    )
    .await;
    assert!(recs[0].value.is_empty());
    assert_raw_headers(&recs[0], "azure", "eventgrid", "handshake");
    assert_eq!(
        recs[0].header("webhook-request-origin"),
        Some("eventgrid.azure.us")
    );
}

#[tokio::test]
async fn shared_secret_in_query_or_header() {
    let app = spawn_app(|c| c.eventgrid.secret = Some("eg-secret".into())).await;
    let post = |q: &str, h: Option<&str>| {
        let mut r = app.client.post(app.url(&format!("{PATH}{q}"))).body(EG);
        if let Some(v) = h {
            r = r.header("x-helios-key", v);
        }
        r.send()
    };
    assert_eq!(post("", None).await.unwrap().status(), 401);
    assert_eq!(post("?code=wrong", None).await.unwrap().status(), 401);
    assert_eq!(post("", Some("wrong")).await.unwrap().status(), 401);
    // Validation handshakes need the secret too.
    let r = app
        .client
        .post(app.url(PATH))
        .body(VALIDATION)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Azure),
        0,
    )
    .await;
    assert_eq!(post("?code=eg-secret", None).await.unwrap().status(), 200);
    assert_eq!(post("", Some("eg-secret")).await.unwrap().status(), 200);
    let recs = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Azure),
        2,
    )
    .await;
    assert!(recs.iter().all(|r| !r.headers.contains_key("x-helios-key")));
}

#[tokio::test]
async fn bodies_event_grid_cannot_send_are_400() {
    let app = spawn_app(|_| {}).await;
    for (body, want) in [
        ("[]", "empty"),
        ("42", "array"),
        ("[1,2]", "event object"),
        ("{", "JSON"),
    ] {
        let r = app
            .client
            .post(app.url(PATH))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        let msg = r.text().await.unwrap();
        assert!(msg.contains(want), "{body}: {msg}");
    }
}
