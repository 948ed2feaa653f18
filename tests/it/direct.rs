//! Direct ingestion: one event or an array, API-key protected.

use helios::source::Source;

use crate::common::*;

const PATH: &str = "/api/v1/events/ingest";
const ONE: &[u8] = include_bytes!("../../samples/direct-event.json");
const BATCH: &[u8] = include_bytes!("../../samples/direct-batch.json");

#[tokio::test]
async fn single_and_batch_with_api_key() {
    let app = spawn_app(|c| c.ingest.api_key = Some("k-123".into())).await;
    let r = app
        .client
        .post(app.url(PATH))
        .body(ONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = app
        .client
        .post(app.url(PATH))
        .header("x-api-key", "k-123")
        .body(ONE)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let r = app
        .client
        .post(app.url(PATH))
        .header("x-api-key", "k-123")
        .body(BATCH)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["events"], 2);
    for (bad, want) in [
        ("[]", "empty"),
        ("\"x\"", "event object"),
        ("[{},3]", "element 1"),
    ] {
        let r = app
            .client
            .post(app.url(PATH))
            .header("x-api-key", "k-123")
            .body(bad)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert!(r.text().await.unwrap().contains(want));
    }
    let recs = read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(Source::Direct),
        2,
    )
    .await;
    assert_eq!(recs[0].value, ONE);
    assert_eq!(recs[1].value, BATCH);
    assert_raw_headers(&recs[0], "direct", "ingest", "event");
    assert!(!recs[0].headers.contains_key("x-api-key"));
}
