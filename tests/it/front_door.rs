//! The front door under abuse and overload: labels and memory bounded whatever requests carry,
//! rate limits answered with the status each cloud retries, slow clients cut off without
//! slowing anyone else.

use std::time::{Duration, Instant};

use helios::topology::RateLimit;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn random_text(n: usize) -> String {
    let mut s = String::with_capacity(n);
    while s.len() < n {
        s.push_str(&uuid::Uuid::new_v4().simple().to_string());
    }
    s.truncate(n);
    s
}

#[tokio::test]
async fn random_topic_arns_and_subscription_names_do_not_grow_metrics_or_memory() {
    let topology = applied_topology(|_| {}).await;
    let (mut child, base) = ingress_binary(&topology, &[]);
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .get(format!("{base}/api/v1/health"))
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "the ingress never became ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = || async {
        client
            .get(format!("{base}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let send = |i: usize| {
        let client = client.clone();
        let base = base.clone();
        async move {
            let arn = format!("arn:aws:sns:eu-west-1:1:{}", random_text(100_000));
            let confirmation = json!({"Type": "SubscriptionConfirmation", "MessageId": format!("m-{i}"),
                "TopicArn": arn, "Message": "m", "Timestamp": chrono::Utc::now().to_rfc3339(),
                "Token": "t", "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?x", "SignatureVersion": "2"});
            let sns = client
                .post(format!("{base}/api/v1/webhooks/aws/sns"))
                .header("x-amz-sns-message-type", "SubscriptionConfirmation")
                .body(confirmation.to_string())
                .send()
                .await
                .unwrap();
            let eg = client
                .request(
                    reqwest::Method::OPTIONS,
                    format!("{base}/api/v1/webhooks/azure/eventgrid"),
                )
                .header("webhook-request-origin", "eventgrid.azure.net")
                .header("aeg-subscription-name", random_text(100_000))
                .send()
                .await
                .unwrap();
            let statuses = (sns.status().as_u16(), eg.status().as_u16());
            let lens = (
                sns.bytes().await.unwrap().len(),
                eg.bytes().await.unwrap().len(),
            );
            (statuses, lens)
        }
    };
    // Warm up the allocator and the label sets before measuring.
    for i in 0..20 {
        send(i).await;
    }
    let before_metrics = metrics().await.len();
    let before_rss = rss_kb(child.id());
    for chunk in (20..1020).collect::<Vec<_>>().chunks(50) {
        let answers = futures::future::join_all(chunk.iter().map(|i| send(*i))).await;
        for ((sns, eg), (sns_len, eg_len)) in answers {
            assert_eq!(sns, 403, "an unsigned confirmation is refused");
            assert_eq!(eg, 200, "the validation handshake is answered");
            assert!(
                sns_len < 2048 && eg_len < 2048,
                "responses echo bounded input: {sns_len} {eg_len}"
            );
        }
    }
    let after_metrics = metrics().await;
    let after_rss = rss_kb(child.id());
    child.kill().unwrap();
    child.wait().unwrap();
    let grew = after_metrics.len() as i64 - before_metrics as i64;
    assert!(grew < 10 * 1024, "/metrics grew by {grew} bytes");
    assert!(
        after_metrics.contains("subscription=\"other\""),
        "unknown names are counted as other"
    );
    let rss_growth = after_rss as i64 - before_rss as i64;
    eprintln!("RSS {before_rss} kB -> {after_rss} kB after 1000 x 2 requests of 100 KB");
    assert!(
        rss_growth < 40 * 1024,
        "RSS grew by {rss_growth} kB over 200 MB of random input"
    );
}

#[tokio::test]
async fn a_burst_over_the_rate_limit_gets_429_or_503_with_retry_after_then_2xx_again() {
    let app = spawn_app(|c| {
        c.topology.rate_limits.insert(
            "aws".into(),
            RateLimit {
                per_second: 2,
                burst: 3,
            },
        );
        c.topology.rate_limits.insert(
            "azure".into(),
            RateLimit {
                per_second: 2,
                burst: 3,
            },
        );
        c.sns.verify_signatures = false;
    })
    .await;
    let eb = |i: usize| {
        app.client
            .post(app.url("/api/v1/webhooks/aws/eventbridge"))
            .body(json!({"version": "0", "id": format!("rl-{i}"), "detail-type": "OrderPlaced", "detail": {}}).to_string())
            .send()
    };
    let mut statuses = vec![];
    for i in 0..8 {
        let r = eb(i).await.unwrap();
        if r.status() == 429 {
            let retry: u64 = r.headers()["retry-after"]
                .to_str()
                .unwrap()
                .parse()
                .unwrap();
            assert!((1..=2).contains(&retry), "Retry-After {retry}");
        }
        statuses.push(r.status().as_u16());
    }
    assert_eq!(&statuses[..3], &[200, 200, 200], "{statuses:?}");
    assert!(statuses[3..].contains(&429), "{statuses:?}");
    // The SNS endpoint shares AWS's bucket, and answers 503: SNS would drop a message on a 4xx.
    let sns = app
        .client
        .post(app.url("/api/v1/webhooks/aws/sns"))
        .header("x-amz-sns-message-type", "Notification")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(sns.status(), 503);
    assert!(sns.headers().contains_key("retry-after"));
    // Event Grid's validation tells the sender the rate (per minute).
    let opt = app
        .client
        .request(
            reqwest::Method::OPTIONS,
            app.url("/api/v1/webhooks/azure/eventgrid"),
        )
        .header("webhook-request-origin", "eventgrid.azure.net")
        .send()
        .await
        .unwrap();
    assert_eq!(opt.headers()["webhook-allowed-rate"], "120");
    // After the Retry-After, 2xx again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(eb(100).await.unwrap().status(), 200);
    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("helios_ingress_overload_total")
                && l.contains("reason=\"rate_limit\"")),
        "{metrics}"
    );
}

/// Opens a connection, sends `head` and then one body byte per second; returns what the
/// server answered (or that it closed) and when.
async fn slow_client(addr: std::net::SocketAddr, head: String) -> (String, Duration) {
    let started = Instant::now();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    loop {
        tokio::select! {
            n = s.read(&mut buf) => {
                let text = String::from_utf8_lossy(&buf[..n.unwrap_or(0)]).to_string();
                return (text, started.elapsed());
            }
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                if s.write_all(b"x").await.is_err() {
                    return (String::new(), started.elapsed());
                }
            }
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "a slow client was never cut off"
        );
    }
}

#[tokio::test]
async fn slow_clients_are_cut_off_and_do_not_slow_anyone_else() {
    let app = spawn_app(|c| {
        c.body_timeout = Duration::from_secs(2);
        c.header_timeout = Duration::from_secs(2);
    })
    .await;
    let body_head = |i: usize| {
        format!("POST /api/v1/events/ingest HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\nx-request-id: slow-{i}\r\n\r\n{{")
    };
    let mut slow: Vec<_> = (0..200)
        .map(|i| tokio::spawn(slow_client(app.addr, body_head(i))))
        .collect();
    // Ten that trickle their headers instead.
    slow.extend((0..10).map(|_| {
        tokio::spawn(slow_client(
            app.addr,
            "POST /api/v1/events/ingest HTTP/1.1\r\nhost: x\r\n".into(),
        ))
    }));
    let mut slowest = Duration::ZERO;
    for i in 0..30 {
        let t = Instant::now();
        let r = app
            .client
            .post(app.url("/api/v1/events/ingest"))
            .body(
                json!({"event_type": "OrderPlaced", "event_id": format!("fast-{i}"), "data": {}})
                    .to_string(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        slowest = slowest.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        slowest < Duration::from_millis(500),
        "a request took {slowest:?} beside 210 slow clients"
    );
    for (i, h) in slow.into_iter().enumerate() {
        let (answer, after) = h.await.unwrap();
        assert!(
            after < Duration::from_secs(8),
            "slow client {i} held on for {after:?}"
        );
        if i < 200 {
            assert!(
                answer.starts_with("HTTP/1.1 408"),
                "slow body {i}: {answer:?}"
            );
        }
    }
}
