//! `helios publish`: demo mode into a running ingress (→ raw topic → processor → PostgreSQL),
//! Azure production publishing checked by a loopback endpoint that validates the request as
//! Event Grid would, GCP production publishing through the official client into a Pub/Sub
//! stand-in that pushes back into HELIOS, AWS through moto, and the production-mode credential
//! checks.

use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use helios::source::Source;

use crate::common::*;
use crate::pubsub_standin::PubSubStandIn;

/// Runs the command off the test's runtime thread (the servers it talks to live on that thread).
async fn output(mut c: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || c.output().expect("run helios publish"))
        .await
        .unwrap()
}

/// Asserts the command succeeded (showing both streams if not); returns its stdout.
fn succeeded(out: &std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn publish(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_helios"));
    c.arg("publish")
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("DEPLOYMENT_MODE")
        .env_remove("AZURE_EVENTGRID_ENDPOINT")
        .env_remove("AZURE_EVENTGRID_KEY")
        .env_remove("AZURE_EVENTGRID_TOKEN")
        .env_remove("GCP_PROJECT_ID")
        .env_remove("GOOGLE_CLOUD_PROJECT")
        .env_remove("HELIOS_PUBSUB_TOPIC")
        .env_remove("PUBSUB_EMULATOR_HOST")
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_PROFILE")
        .env_remove("AWS_WEB_IDENTITY_TOKEN_FILE");
    c
}

#[tokio::test]
async fn demo_mode_delivers_each_clouds_push_format_end_to_end() {
    let app = spawn_app(|_| {}).await;
    let proc = spawn_processor(&app.topology).await;
    let out = output(publish(&[
        "--cloud",
        "all",
        "--order-id",
        "O-PUB-1",
        "--ingress-url",
        &app.url(""),
    ]))
    .await;
    let stdout = succeeded(&out);
    for cloud in ["aws", "gcp", "azure"] {
        assert!(
            stdout
                .lines()
                .any(|l| l.starts_with(cloud) && l.contains("demo") && l.contains("ok")),
            "{stdout}"
        );
    }
    for s in [Source::Aws, Source::Gcp, Source::Azure] {
        read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(s), 1).await;
    }
    expect_count(
        &proc.pool,
        "SELECT count(*) FROM events WHERE order_id = 'O-PUB-1'",
        3,
    )
    .await;
    let sources: Vec<String> = sqlx::query_scalar("SELECT source FROM events ORDER BY source")
        .fetch_all(&proc.pool)
        .await
        .unwrap();
    assert_eq!(sources, ["aws", "azure", "gcp"]);
    proc.stop().await;
}

type Seen = Arc<Mutex<Vec<(String, serde_json::Value)>>>;

async fn fake_event_grid(key: &'static str) -> (String, Seen) {
    let seen: Seen = Arc::default();
    let router = axum::Router::new()
        .route(
            "/api/events",
            post(
                move |State(seen): State<Seen>,
                      Query(q): Query<std::collections::HashMap<String, String>>,
                      headers: HeaderMap,
                      body: String| async move {
                    if q.get("api-version").map(String::as_str) != Some("2018-01-01") {
                        return (StatusCode::BAD_REQUEST, "api-version".to_string());
                    }
                    if headers.get("aeg-sas-key").and_then(|v| v.to_str().ok()) != Some(key) {
                        return (StatusCode::UNAUTHORIZED, "key".to_string());
                    }
                    let ct = headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_string();
                    let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                        return (StatusCode::BAD_REQUEST, "json".to_string());
                    };
                    if !v.is_array() {
                        return (StatusCode::BAD_REQUEST, "array".to_string());
                    }
                    seen.lock().unwrap().push((ct, v));
                    (StatusCode::OK, String::new())
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test]
async fn azure_production_publishing_sends_what_event_grid_expects_in_both_schemas() {
    let (endpoint, seen) = fake_event_grid("topic-key").await;
    for schema in ["eventgrid", "cloudevents"] {
        let mut c = publish(&[
            "--cloud",
            "azure",
            "--azure-schema",
            schema,
            "--order-id",
            "O-AZ",
        ]);
        c.env("AZURE_EVENTGRID_ENDPOINT", &endpoint)
            .env("AZURE_EVENTGRID_KEY", "topic-key");
        let out = output(c).await;
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{schema}: {stdout}");
        assert!(stdout.contains("azure  production ok"), "{stdout}");
    }
    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let (ct, eg) = &seen[0];
    assert!(ct.starts_with("application/json"), "{ct}");
    assert_eq!(eg[0]["eventType"], "Helios.Orders.OrderPlaced");
    assert_eq!(eg[0]["data"]["order_id"], "O-AZ");
    assert!(
        eg[0]["id"].is_string()
            && eg[0]["eventTime"].is_string()
            && eg[0]["dataVersion"].is_string()
    );
    let (ct, ce) = &seen[1];
    assert!(ct.starts_with("application/cloudevents-batch+json"), "{ct}");
    assert_eq!(ce[0]["specversion"], "1.0");
    assert_eq!(ce[0]["type"], "Helios.Orders.OrderPlaced");

    // A wrong key is reported with what to fix, exit code 1.
    let mut c = publish(&["--cloud", "azure"]);
    c.env("AZURE_EVENTGRID_ENDPOINT", &endpoint)
        .env("AZURE_EVENTGRID_KEY", "wrong");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("AZURE_EVENTGRID_KEY"));
}

/// `DEPLOYMENT_MODE=production` without the cloud's settings: exit code 1; returns stderr.
async fn refused_in_production(cloud: &str, unset: &[&str]) -> String {
    let mut c = publish(&["--cloud", cloud]);
    c.env("DEPLOYMENT_MODE", "production");
    for v in unset {
        c.env_remove(v);
    }
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn production_mode_without_credentials_names_the_variables() {
    let err = refused_in_production("azure", &[]).await;
    assert!(
        err.contains("AZURE_EVENTGRID_ENDPOINT") && err.contains("AZURE_EVENTGRID_KEY"),
        "{err}"
    );
}

#[tokio::test]
async fn aws_production_publishing_goes_through_putevents_and_reports_errors() {
    let moto = std::env::var("HELIOS_TEST_MOTO_URL").expect(
        "HELIOS_TEST_MOTO_URL is not set: run the tests with scripts/test.sh, which starts moto",
    );
    let aws = |args: &[&str]| {
        let mut c = publish(args);
        c.env("AWS_ACCESS_KEY_ID", "test")
            .env("AWS_SECRET_ACCESS_KEY", "test")
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL_EVENTBRIDGE", &moto);
        c
    };
    // 12 events: two PutEvents calls (at most 10 entries each).
    let out = output(aws(&["--cloud", "aws", "--count", "12"])).await;
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("aws    production ok      12 event(s)"),
        "{stdout}"
    );
    // An unknown bus is reported with what to check, exit code 1.
    let out = output(aws(&["--cloud", "aws", "--aws-event-bus", "no-such-bus"])).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("FAILED") && stdout.contains("no-such-bus"),
        "{stdout}"
    );
}

#[tokio::test]
async fn aws_production_mode_without_credentials_names_the_variables() {
    let err = refused_in_production("aws", &["AWS_REGION", "AWS_DEFAULT_REGION"]).await;
    assert!(
        err.contains("AWS_ACCESS_KEY_ID") && err.contains("AWS_REGION"),
        "{err}"
    );
}

#[tokio::test]
async fn gcp_production_publishing_goes_through_pubsub_and_comes_back_through_its_push() {
    let app = spawn_app(|c| c.pubsub.token = Some("push-token".into())).await;
    let proc = spawn_processor(&app.topology).await;
    let standin = PubSubStandIn::start(
        &["projects/helios-test/topics/orders"],
        Some(app.url("/api/v1/webhooks/gcp/pubsub?token=push-token")),
    )
    .await;
    let gcp = |args: &[&str]| {
        let mut c = publish(args);
        c.env("PUBSUB_EMULATOR_HOST", &standin.host)
            .env("GCP_PROJECT_ID", "helios-test")
            .env("HELIOS_PUBSUB_TOPIC", "orders");
        c
    };
    let out = output(gcp(&[
        "--cloud",
        "gcp",
        "--count",
        "3",
        "--order-id",
        "O-GCP-1",
        "--event-type",
        "PaymentProcessed",
        "--data",
        r#"{"payment_id":"P-1","currency":"EUR"}"#,
    ]))
    .await;
    let stdout = succeeded(&out);
    assert!(
        stdout.contains("gcp    production ok      3 event(s)"),
        "{stdout}"
    );

    // What Pub/Sub received: three messages on the topic, the event type as the attribute HELIOS
    // reads, the payload as data; the client routed the call by topic.
    let published = standin.published();
    assert_eq!(published.len(), 3);
    for p in &published {
        assert_eq!(p.topic, "projects/helios-test/topics/orders");
        assert!(
            p.request_params.contains("topic=projects"),
            "{}",
            p.request_params
        );
        assert_eq!(p.message.attributes["eventType"], "PaymentProcessed");
        let data: serde_json::Value = serde_json::from_slice(&p.message.data).unwrap();
        assert_eq!(data["order_id"], "O-GCP-1");
        assert_eq!(data["currency"], "EUR");
        assert!(stdout.contains(&p.message.message_id), "{stdout}");
    }
    // ...and its push brought them back through HELIOS into PostgreSQL, keyed by Pub/Sub's ids.
    expect_count(&proc.pool, "SELECT count(*) FROM events WHERE order_id = 'O-GCP-1' AND source = 'gcp' AND event_type = 'PaymentProcessed'", 3).await;
    let mut ids: Vec<String> =
        sqlx::query_scalar("SELECT event_id FROM events WHERE order_id = 'O-GCP-1'")
            .fetch_all(&proc.pool)
            .await
            .unwrap();
    ids.sort();
    let mut sent: Vec<String> = published
        .iter()
        .map(|p| p.message.message_id.clone())
        .collect();
    sent.sort();
    assert_eq!(ids, sent);

    // An unknown topic: Pub/Sub's NOT_FOUND is reported with what to check, exit code 1.
    let mut c = gcp(&["--cloud", "gcp", "--timeout-secs", "5"]);
    c.env("HELIOS_PUBSUB_TOPIC", "no-such-topic");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("gcp    production FAILED")
            && stdout.contains("projects/helios-test/topics/no-such-topic")
            && stdout.contains("Resource not found"),
        "{stdout}"
    );
    assert_eq!(standin.published().len(), 3);
    proc.stop().await;
}

#[tokio::test]
async fn gcp_production_mode_without_settings_names_the_variables() {
    let err = refused_in_production("gcp", &[]).await;
    assert!(
        err.contains("HELIOS_PUBSUB_TOPIC") && err.contains("GCP_PROJECT_ID"),
        "{err}"
    );
    // A topic given as a full path needs no project.
    let mut c = publish(&["--cloud", "gcp", "--timeout-secs", "2"]);
    c.env("DEPLOYMENT_MODE", "production")
        .env("HELIOS_PUBSUB_TOPIC", "projects/p/topics/t")
        .env("PUBSUB_EMULATOR_HOST", "127.0.0.1:9");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("needs these variables")
            && stdout.contains("gcp    production FAILED")
            && stdout.contains("projects/p/topics/t"),
        "{stdout}"
    );
}

#[tokio::test]
async fn azure_entra_token_is_never_sent_over_plain_http() {
    let (endpoint, seen) = fake_event_grid("topic-key").await;
    let mut c = publish(&["--cloud", "azure"]);
    c.env("AZURE_EVENTGRID_ENDPOINT", &endpoint)
        .env("AZURE_EVENTGRID_TOKEN", "eyJ-entra-token");
    let out = output(c).await;
    assert_eq!(out.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("azure  production FAILED") && stdout.contains("only sent over https"),
        "{stdout}"
    );
    assert!(seen.lock().unwrap().is_empty());
}

/// The issue's acceptance path: `helios publish --cloud all` in demo mode against a running
/// `helios demo` shows the three events arriving on the demo's console.
#[tokio::test]
async fn publish_all_into_a_running_demo_shows_three_arrivals() {
    use std::io::BufRead;
    let dir = scratch_dir("demo");
    let mut demo = Command::new(env!("CARGO_BIN_EXE_helios"))
        .args(["demo", "--port", "0", "--store"])
        .arg(dir.join("demo.db"))
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start helios demo");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let stdout = demo.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |timeout: Duration| rx.recv_timeout(timeout).ok();
    let mut ingress = None;
    while let Some(l) = next_line(Duration::from_secs(60)) {
        if let Some(rest) = l.trim_start().strip_prefix("ingress") {
            ingress = rest.split_whitespace().next().map(str::to_string);
        }
        if l.starts_with("Running;") {
            break;
        }
    }
    let ingress = ingress.expect("the demo printed its ingress URL");
    let out = output(publish(&[
        "--cloud",
        "all",
        "--order-id",
        "O-DEMO-PUB",
        "--ingress-url",
        &ingress,
    ]))
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut arrived = std::collections::BTreeSet::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while arrived.len() < 3 && std::time::Instant::now() < deadline {
        let Some(l) = next_line(Duration::from_secs(1)) else {
            continue;
        };
        if l.contains("+ stored") && l.contains("order=O-DEMO-PUB") {
            arrived.insert(l.split_whitespace().nth(2).unwrap_or("").to_string());
        }
    }
    let _ = demo.kill();
    let _ = demo.wait();
    assert_eq!(
        arrived.into_iter().collect::<Vec<_>>(),
        ["aws", "azure", "gcp"]
    );
}
