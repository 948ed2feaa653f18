//! The live status page in a real headless browser (Debian's chromium, driven over WebDriver by
//! chromedriver; both installed by scripts/test.sh): it loads, its figures match `/metrics`, and
//! it updates in place after events are pushed. Leaves a screenshot in the target directory.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

/// chromedriver on a free port, stopped on drop.
struct Driver {
    child: std::process::Child,
    url: String,
    http: reqwest::Client,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Driver {
    async fn start() -> Driver {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let child = std::process::Command::new("/usr/bin/chromedriver")
            .arg(format!("--port={port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("chromedriver (scripts/test.sh installs chromium-driver)");
        let d = Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
            http: reqwest::Client::new(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while d
            .http
            .get(format!("{}/status", d.url))
            .send()
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        d
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Value {
        let mut r = self.http.request(method, format!("{}{path}", self.url));
        if let Some(b) = body {
            r = r.json(&b);
        }
        let v: Value = r.send().await.unwrap().json().await.unwrap();
        assert!(
            v["value"]["error"].is_null(),
            "WebDriver {path}: {}",
            v["value"]
        );
        v["value"].clone()
    }
}

/// The text of the element `#id` in the session.
async fn text(d: &Driver, session: &str, id: &str) -> String {
    let el = d
        .call(
            reqwest::Method::POST,
            &format!("/session/{session}/element"),
            Some(json!({"using": "css selector", "value": format!("#{id}")})),
        )
        .await;
    let eid = el
        .as_object()
        .and_then(|o| o.values().next())
        .and_then(Value::as_str)
        .unwrap()
        .to_string();
    d.call(
        reqwest::Method::GET,
        &format!("/session/{session}/element/{eid}/text"),
        None,
    )
    .await
    .as_str()
    .unwrap_or_default()
    .to_string()
}

/// A page figure as a number (thin spaces separate thousands).
fn number(s: &str) -> Option<f64> {
    s.replace(['\u{202f}', ' '], "").parse().ok()
}

/// Sums every series of `name` in a `/metrics` text.
fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b'{') | Some(b' '))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn the_status_page_shows_the_metrics_and_updates_in_place() {
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor(&app.topology).await;
    let push = |from: usize, to: usize| {
        let app = &app;
        async move {
            for i in from..to {
                let r = app
                    .client
                    .post(app.url("/api/v1/events/ingest"))
                    .json(&json!({"event_type": "OrderPlaced", "event_id": format!("sp-{i}"), "data": {"order_id": format!("O-{i}"), "customer_id": "C"}}))
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
            }
        }
    };
    push(0, 3).await;
    expect_count(&proc.pool, "SELECT count(*) FROM events", 3).await;

    let d = Driver::start().await;
    let session = d
        .call(
            reqwest::Method::POST,
            "/session",
            Some(json!({"capabilities": {"alwaysMatch": {"goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1280,1000"]
            }}}})),
        )
        .await["sessionId"]
        .as_str()
        .unwrap()
        .to_string();
    d.call(
        reqwest::Method::POST,
        &format!("/session/{session}/url"),
        Some(json!({"url": app.url("/status")})),
    )
    .await;

    // The figures equal /metrics (the whole suite shares this process's registry, so compare
    // with /metrics rather than with this test's own counts).
    let metrics = || async {
        app.client
            .get(app.url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    };
    let figures_match = |page_out: &str, page_req: &str, m: &str| {
        number(page_out) == Some(metric_sum(m, "helios_processor_events_out_total"))
            && number(page_req) == Some(metric_sum(m, "helios_ingress_requests_total"))
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let first_out = loop {
        let (out, req) = (
            text(&d, &session, "events-out").await,
            text(&d, &session, "ingress-requests").await,
        );
        let m = metrics().await;
        if figures_match(&out, &req, &m) && number(&out).is_some_and(|n| n >= 3.0) {
            assert_eq!(text(&d, &session, "kafka").await, "reachable");
            break number(&out).unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "page shows events out {out:?}, requests {req:?}; /metrics says {} and {}",
            metric_sum(&m, "helios_processor_events_out_total"),
            metric_sum(&m, "helios_ingress_requests_total")
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };

    // Push more: the same page (no reload) shows them.
    push(3, 8).await;
    expect_count(&proc.pool, "SELECT count(*) FROM events", 8).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = number(&text(&d, &session, "events-out").await).unwrap_or(0.0);
        if out >= first_out + 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the page did not update: events out {out}, was {first_out}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // The invariant over every processor of this process (the suite's other tests included):
    // 0 between batches.
    let deadline = Instant::now() + Duration::from_secs(30);
    while text(&d, &session, "invariant").await != "0" {
        assert!(Instant::now() < deadline, "the page's invariant is not 0");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    let png = d
        .call(
            reqwest::Method::GET,
            &format!("/session/{session}/screenshot"),
            None,
        )
        .await;
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(png.as_str().unwrap())
        .unwrap();
    assert!(bytes.starts_with(b"\x89PNG"));
    std::fs::write(
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png"),
        bytes,
    )
    .unwrap();
    d.call(
        reqwest::Method::DELETE,
        &format!("/session/{session}"),
        None,
    )
    .await;
    proc.stop().await;
    app.stop().await;
}
