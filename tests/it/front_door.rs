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
    wait_ready(&client, &base).await;
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
    // SNS has a bucket of its own (the same rate): EventBridge's burst left it whole, and over
    // it SNS hears 503 (it would drop a message on a 4xx).
    let mut sns_statuses = vec![];
    for _ in 0..6 {
        let sns = app
            .client
            .post(app.url("/api/v1/webhooks/aws/sns"))
            .header("x-amz-sns-message-type", "Notification")
            .body("{}")
            .send()
            .await
            .unwrap();
        if sns.status() == 503 {
            assert!(sns.headers().contains_key("retry-after"));
        }
        sns_statuses.push(sns.status().as_u16());
    }
    assert_eq!(
        sns_statuses[0], 400,
        "SNS's bucket was spent by EventBridge: {sns_statuses:?}"
    );
    assert!(sns_statuses.contains(&503), "{sns_statuses:?}");
    assert!(!sns_statuses.contains(&429), "{sns_statuses:?}");
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

/// A local address that is not loopback (this host's own interface), for a client the ingress
/// must not take for a local one.
fn non_loopback_ipv4() -> std::net::Ipv4Addr {
    // SAFETY: getifaddrs/freeifaddrs as documented; the list is only read before it is freed.
    unsafe {
        let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
        assert_eq!(libc::getifaddrs(&mut list), 0, "getifaddrs");
        let mut cur = list;
        let mut found = None;
        while !cur.is_null() {
            let a = (*cur).ifa_addr;
            if !a.is_null() && (*a).sa_family as i32 == libc::AF_INET {
                let sin = &*(a as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr));
                if !ip.is_loopback() && found.is_none() {
                    found = Some(ip);
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(list);
        found.expect("this host has no non-loopback IPv4 address to test protected mode with")
    }
}

#[tokio::test]
async fn an_endpoint_without_credentials_serves_loopback_clients_only() {
    let app = spawn_app(|c| c.host = "0.0.0.0".into()).await;
    let outside = format!("http://{}:{}", non_loopback_ipv4(), app.addr.port());
    let event = json!({"event_type": "OrderPlaced", "event_id": "p-1", "data": {"order_id": "O-1", "customer_id": "C"}});
    let from = |base: &str| {
        app.client
            .post(format!("{base}/api/v1/events/ingest"))
            .json(&event)
            .send()
    };
    let r = from(&outside).await.unwrap();
    assert_eq!(r.status(), 403);
    let text = r.text().await.unwrap();
    assert!(
        text.contains("HELIOS_INGEST_API_KEY") && text.contains("loopback"),
        "{text}"
    );
    for path in [
        "/api/v1/webhooks/aws/eventbridge",
        "/api/v1/webhooks/gcp/pubsub",
        "/api/v1/webhooks/azure/eventgrid",
        "/api/v1/webhooks/aws/sns",
    ] {
        let r = app
            .client
            .post(format!("{outside}{path}"))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            403,
            "{path} served a non-loopback client without credentials"
        );
    }
    // The same request from this host is served.
    let r = from(&format!("http://127.0.0.1:{}", app.addr.port()))
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    // Health and metrics stay reachable (probes, Prometheus).
    let r = app
        .client
        .get(format!("{outside}/api/v1/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    read_exactly(
        &app.kafka.bootstrap_servers,
        &app.raw_topic(helios::source::Source::Direct),
        1,
    )
    .await;

    // With a key configured, anyone holding it is served.
    let keyed = spawn_app(|c| {
        c.host = "0.0.0.0".into();
        c.ingest.api_key = Some("k-123".into());
    })
    .await;
    let outside = format!("http://{}:{}", non_loopback_ipv4(), keyed.addr.port());
    let r = keyed
        .client
        .post(format!("{outside}/api/v1/events/ingest"))
        .header(keyed_header(), "k-123")
        .json(&event)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
}

fn keyed_header() -> &'static str {
    "x-api-key"
}

#[tokio::test]
async fn an_alias_of_a_pinned_kafka_setting_refuses_to_start() {
    let topology = test_topology();
    let run = |cmd: &str, var: &str, value: &str| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
            .arg(cmd)
            .env(
                "HELIOS_TOPOLOGY",
                concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
            )
            .env("KAFKA_BOOTSTRAP_SERVERS", kafka_bootstrap())
            .env("HELIOS_TOPIC_PREFIX", &topology.topic_prefix)
            .env("API_HOST", "127.0.0.1")
            .env("API_PORT", "0")
            .env("DATABASE_URL", database_url())
            .env("HELIOS_DB_SCHEMA", unique_schema())
            .env("REDIS_URL", redis_url())
            .env("HELIOS_METRICS_ADDR", "127.0.0.1:0")
            .env("RUST_LOG", "error")
            .env(var, value)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    for (cmd, var, value, names) in [
        (
            "ingress",
            "KAFKA_REQUEST_REQUIRED_ACKS",
            "0",
            "request.required.acks",
        ),
        ("ingress", "KAFKA_ACKS", "1", "acks"),
        (
            "ingress",
            "KAFKA_DELIVERY_TIMEOUT_MS",
            "999999",
            "delivery.timeout.ms",
        ),
        (
            "ingress",
            "KAFKA_MESSAGE_MAX_BYTES",
            "100",
            "message.max.bytes",
        ),
        (
            "process",
            "KAFKA_REQUEST_REQUIRED_ACKS",
            "0",
            "request.required.acks",
        ),
        (
            "process",
            "KAFKA_AUTO_COMMIT_ENABLE",
            "true",
            "auto.commit.enable",
        ),
        (
            "process",
            "KAFKA_ENABLE_AUTO_COMMIT",
            "true",
            "enable.auto.commit",
        ),
        ("process", "KAFKA_GROUP_ID", "someone-else", "group.id"),
    ] {
        let (ok, stderr) = run(cmd, var, value);
        assert!(!ok, "helios {cmd} started with {var}={value}");
        assert!(
            stderr.contains(names) && stderr.contains(var) && stderr.contains("pins"),
            "helios {cmd} with {var}={value}: {stderr}"
        );
    }
}

#[tokio::test]
async fn a_validation_looking_element_in_a_notification_loses_nothing() {
    let app = spawn_app(|_| {}).await;
    let p = spawn_processor(&app.topology).await;
    let body = json!([
        {"id": "v-1", "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent", "subject": "",
         "eventTime": "2026-11-22T09:18:00Z", "data": {}, "dataVersion": "1"},
        {"id": "eg-ok-1", "eventType": "OrderPlaced", "subject": "orders", "eventTime": "2026-11-22T09:18:00Z",
         "data": {"order_id": "O-eg", "customer_id": "C"}, "dataVersion": "1"}
    ]);
    let r = app
        .client
        .post(app.url("/api/v1/webhooks/azure/eventgrid"))
        .header("aeg-event-type", "Notification")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "Event Grid never retries a 400: the delivery would be lost"
    );
    expect_count(
        &p.pool,
        "SELECT count(*) FROM events WHERE event_id = 'eg-ok-1'",
        1,
    )
    .await;
    p.stop().await;
}

#[tokio::test]
async fn bodies_in_flight_are_bounded_by_their_bytes_not_by_their_parse() {
    // 1,024 bodies of 1 MiB `[0,0,…]` at once to direct ingest: each is checked by its shape
    // (never built: a serde_json Value of one takes ~16–24 MiB) and refused (not event
    // objects); the endpoint's body memory (HELIOS_MAX_BODY_MEMORY, 64 MiB) admits the rest
    // later with a 429.
    let topology = applied_topology(|_| {}).await;
    let (mut child, base) = ingress_binary(&topology, &[]);
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    wait_ready(&client, &base).await;
    let mut body = String::with_capacity(1 << 20);
    body.push('[');
    while body.len() < (1 << 20) - 2 {
        body.push_str("0,");
    }
    body.push_str("0]");
    let body = bytes::Bytes::from(body);
    let before = rss_kb(child.id());
    let sends: Vec<_> = (0..1024)
        .map(|_| {
            let (client, base, body) = (client.clone(), base.clone(), body.clone());
            tokio::spawn(async move {
                client
                    .post(format!("{base}/api/v1/events/ingest"))
                    .body(body)
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .unwrap_or(0)
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::<u16, usize>::new();
    for s in sends {
        *statuses.entry(s.await.unwrap()).or_default() += 1;
    }
    let peak = std::fs::read_to_string(format!("/proc/{}/status", child.id()))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "1,024 × 1 MiB in flight: statuses {statuses:?}, RSS before {before} kB, peak {peak} kB"
    );
    // 0: the connection was reset by a refusal that did not wait for the body (a cloud retries
    // that like a 429).
    assert!(
        statuses.keys().all(|s| [0, 400, 429].contains(s)),
        "{statuses:?}"
    );
    assert!(statuses.get(&400).is_some_and(|n| *n > 0), "{statuses:?}");
    assert!(
        peak < 400 * 1024,
        "peak RSS {peak} kB with 1,024 bodies of 1 MiB in flight"
    );
}
