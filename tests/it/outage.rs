//! Broker outage: while Kafka is down the ingress answers 503 (never 2xx, never 4xx) within
//! EventBridge's 5 s deadline; when it is back, 2xx again without restarting HELIOS.
//! Runs its own Tansu so stopping it does not disturb the other tests.

use std::time::{Duration, Instant};

use helios::config::KafkaSettings;
use helios::source::Source;

use crate::common::*;

#[tokio::test]
async fn broker_down_gives_503_and_recovery_gives_2xx_without_restart() {
    let port = free_port();
    let dir = scratch_dir("outage");
    let mut broker = Broker::start(dir.clone(), port);
    let bootstrap = format!("127.0.0.1:{port}");
    let app = spawn_app_on(KafkaSettings::new(bootstrap.clone()), |c| {
        c.produce_timeout = Duration::from_millis(3000);
    })
    .await;
    let url = app.url("/api/v1/webhooks/aws/eventbridge");
    let body = |n: usize| {
        format!("{{\"version\":\"0\",\"id\":\"outage-{n}\",\"detail-type\":\"OrderPlaced\",\"detail\":{{}}}}")
    };
    let mut acknowledged = vec![];
    let r = app.client.post(&url).body(body(0)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    acknowledged.push(body(0));

    broker.stop();
    for n in 1..=3 {
        let t = Instant::now();
        let r = app.client.post(&url).body(body(n)).send().await.unwrap();
        let took = t.elapsed();
        assert_eq!(r.status(), 503, "broker down must answer 503");
        assert_eq!(r.headers()["retry-after"], "5");
        assert!(
            took < Duration::from_secs(5),
            "503 after {took:?}: past EventBridge's 5 s deadline"
        );
    }
    // Readiness reports the outage.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = app
            .client
            .get(app.url("/api/v1/health"))
            .send()
            .await
            .unwrap()
            .status();
        if s == 503 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "readiness never reported the outage"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Once the probe has noticed, requests are answered at once instead of after the produce
    // timeout: connections do not pile up during an outage.
    let mut took = vec![];
    for n in 0..50 {
        let t = Instant::now();
        let r = app
            .client
            .post(&url)
            .body(body(500 + n))
            .send()
            .await
            .unwrap();
        took.push(t.elapsed());
        assert_eq!(r.status(), 503);
        assert!(r.headers().contains_key("retry-after"));
    }
    took.sort();
    let p99 = took[took.len() * 99 / 100 - 1];
    assert!(
        p99 < Duration::from_millis(50),
        "p99 of the 503s while Kafka is down: {p99:?}"
    );

    let _broker = Broker::start(dir, broker.port);
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut n = 100;
    loop {
        n += 1;
        let r = app.client.post(&url).body(body(n)).send().await.unwrap();
        match r.status().as_u16() {
            200 => {
                acknowledged.push(body(n));
                break;
            }
            503 => {}
            s => panic!("during recovery the ingress answered {s}; only 200 or 503 are allowed"),
        }
        assert!(
            Instant::now() < deadline,
            "ingress did not recover within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for k in 0..5 {
        let r = app
            .client
            .post(&url)
            .body(body(1000 + k))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        acknowledged.push(body(1000 + k));
    }
    // Every acknowledged body is in the raw topic (503'd ones may be there too: the cloud retries,
    // and the processor deduplicates).
    let recs = read_records(
        &bootstrap,
        &app.raw_topic(Source::Aws),
        1000,
        Duration::from_secs(10),
    )
    .await;
    let values: Vec<String> = recs
        .iter()
        .map(|r| String::from_utf8(r.value.clone()).unwrap())
        .collect();
    for a in &acknowledged {
        assert!(values.contains(a), "acknowledged {a} is missing from Kafka");
    }
}
