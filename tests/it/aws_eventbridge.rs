use base64::Engine;
use helios::source::Source;

use crate::common::*;

const SAMPLE: &[u8] = include_bytes!("../../samples/aws-eventbridge.json");
const PATH: &str = "/api/v1/webhooks/aws/eventbridge";

#[tokio::test]
async fn eventbridge_sample_lands_byte_for_byte_with_headers() {
    let app = spawn_app(|_| {}).await;
    let resp = app
        .client
        .post(app.url(PATH))
        .header("content-type", "application/json; charset=utf-8")
        .header("user-agent", "Amazon/EventBridge/ApiDestinations")
        .header("x-request-id", "req-eb-1")
        .body(SAMPLE)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["x-request-id"], "req-eb-1");
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 1).await;
    assert_eq!(recs[0].value, SAMPLE);
    assert_raw_headers(&recs[0], "aws", "eventbridge", "event");
    assert_eq!(recs[0].header("helios-request-id"), Some("req-eb-1"));
    assert_eq!(
        recs[0].header("content-type"),
        Some("application/json; charset=utf-8")
    );
    assert!(!recs[0].headers.contains_key("user-agent"));
}

#[tokio::test]
async fn eventbridge_api_key_and_basic_credentials() {
    let app = spawn_app(|c| {
        c.eventbridge.api_key = Some("s3cret-key".into());
        c.eventbridge.basic = Some(("eb-user".into(), "eb-pass".into()));
    })
    .await;
    let post = |h: Option<(&'static str, String)>| {
        let mut r = app.client.post(app.url(PATH)).body(SAMPLE);
        if let Some((k, v)) = h {
            r = r.header(k, v);
        }
        r.send()
    };
    assert_eq!(post(None).await.unwrap().status(), 401);
    assert_eq!(
        post(Some(("x-helios-key", "wrong".into())))
            .await
            .unwrap()
            .status(),
        401
    );
    let bad_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("eb-user:nope")
    );
    assert_eq!(
        post(Some(("authorization", bad_basic)))
            .await
            .unwrap()
            .status(),
        401
    );
    // Nothing refused was landed.
    read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 0).await;

    assert_eq!(
        post(Some(("x-helios-key", "s3cret-key".into())))
            .await
            .unwrap()
            .status(),
        200
    );
    let good_basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("eb-user:eb-pass")
    );
    assert_eq!(
        post(Some(("authorization", good_basic)))
            .await
            .unwrap()
            .status(),
        200
    );
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 2).await;
    // The API key header is a secret: never copied into Kafka.
    assert!(recs.iter().all(|r| !r.headers.contains_key("x-helios-key")));
}

#[tokio::test]
async fn eventbridge_bodies_that_are_not_json_are_landed_not_refused() {
    // An input transformer can send any text; EventBridge never retries a 400, so refusing it
    // would lose it. It is landed untouched (the processor dead-letters it as invalid_json and a
    // fix can replay it).
    let app = spawn_app(|_| {}).await;
    for body in [r#"{"version":"0","id": }"#, "order O-1 placed"] {
        let resp = app
            .client
            .post(app.url(PATH))
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{body}");
    }
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 2).await;
    assert_eq!(recs[1].value, b"order O-1 placed");
}
