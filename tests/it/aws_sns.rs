//! SNS: signature versions 1 and 2 with a certificate generated here and served from a local
//! "SNS host", subscription confirmation, and every refusal (tampered, wrong topic, cert or
//! SubscribeURL off the host pattern: nothing is fetched from a bad URL).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use axum::routing::get;
use base64::Engine;
use helios::source::Source;
use openssl::asn1::Asn1Time;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use openssl::x509::{X509Builder, X509NameBuilder};
use serde_json::{json, Value};

use crate::common::*;

const PATH: &str = "/api/v1/webhooks/aws/sns";
const TOPIC: &str = "arn:aws:sns:us-west-2:123456789012:MyTopic";

/// A fake SNS host on loopback: serves the signing certificate and the SubscribeURL, and counts hits.
struct FakeSns {
    origin: String,
    key: PKey<Private>,
    cert_hits: Arc<AtomicUsize>,
    confirm_hits: Arc<AtomicUsize>,
    /// Requests for anything else (made-up certificate URLs): answered 404.
    other_hits: Arc<AtomicUsize>,
}

async fn fake_sns() -> FakeSns {
    let rsa = Rsa::generate(2048).unwrap();
    let key = PKey::from_rsa(rsa).unwrap();
    let mut name = X509NameBuilder::new().unwrap();
    name.append_entry_by_text("CN", "sns.us-west-2.amazonaws.com")
        .unwrap();
    let name = name.build();
    let mut b = X509Builder::new().unwrap();
    b.set_version(2).unwrap();
    b.set_subject_name(&name).unwrap();
    b.set_issuer_name(&name).unwrap();
    b.set_pubkey(&key).unwrap();
    b.set_not_before(&Asn1Time::days_from_now(0).unwrap())
        .unwrap();
    b.set_not_after(&Asn1Time::days_from_now(30).unwrap())
        .unwrap();
    b.sign(&key, MessageDigest::sha256()).unwrap();
    let pem = b.build().to_pem().unwrap();
    let cert_hits = Arc::new(AtomicUsize::new(0));
    let confirm_hits = Arc::new(AtomicUsize::new(0));
    let other_hits = Arc::new(AtomicUsize::new(0));
    let (ch, fh, oh) = (cert_hits.clone(), confirm_hits.clone(), other_hits.clone());
    let router = axum::Router::new()
        .route(
            "/SimpleNotificationService-test.pem",
            get(move || {
                ch.fetch_add(1, Ordering::SeqCst);
                let pem = pem.clone();
                async move { pem }
            }),
        )
        .route(
            "/",
            get(move || {
                fh.fetch_add(1, Ordering::SeqCst);
                async { "<ConfirmSubscriptionResponse/>" }
            }),
        )
        .fallback(move || {
            oh.fetch_add(1, Ordering::SeqCst);
            async { axum::http::StatusCode::NOT_FOUND }
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    FakeSns {
        origin: format!("http://127.0.0.1:{}", addr.port()),
        key,
        cert_hits,
        confirm_hits,
        other_hits,
    }
}

impl FakeSns {
    fn host_pattern(&self) -> String {
        format!("^{}$", regex_escape(&self.origin))
    }

    /// Builds and signs an envelope, independently of HELIOS's own string-to-sign code.
    fn signed(&self, mut v: Value, version: &str) -> Value {
        v["SignatureVersion"] = json!(version);
        v["SigningCertURL"] = json!(format!(
            "{}/SimpleNotificationService-test.pem",
            self.origin
        ));
        let order: &[&str] = if v["Type"] == "Notification" {
            &[
                "Message",
                "MessageId",
                "Subject",
                "Timestamp",
                "TopicArn",
                "Type",
            ]
        } else {
            &[
                "Message",
                "MessageId",
                "SubscribeURL",
                "Timestamp",
                "Token",
                "TopicArn",
                "Type",
            ]
        };
        let mut s = String::new();
        for k in order {
            if let Some(val) = v.get(*k).and_then(|x| x.as_str()) {
                s.push_str(&format!("{k}\n{val}\n"));
            }
        }
        let md = if version == "1" {
            MessageDigest::sha1()
        } else {
            MessageDigest::sha256()
        };
        let mut signer = Signer::new(md, &self.key).unwrap();
        signer.update(s.as_bytes()).unwrap();
        v["Signature"] =
            json!(base64::engine::general_purpose::STANDARD.encode(signer.sign_to_vec().unwrap()));
        v
    }
}

fn regex_escape(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_string()
            } else {
                format!("\\{c}")
            }
        })
        .collect()
}

/// SNS's timestamp format, now (older messages are refused as replays).
fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn notification(message: &str) -> Value {
    json!({
        "Type": "Notification",
        "MessageId": uuid::Uuid::new_v4().to_string(),
        "TopicArn": TOPIC,
        "Message": message,
        "Timestamp": now(),
        "UnsubscribeURL": "https://sns.us-west-2.amazonaws.com/?Action=Unsubscribe&SubscriptionArn=x",
        "MessageAttributes": { "tenant": { "Type": "String", "Value": "acme" } }
    })
}

fn confirmation(kind: &str, subscribe_url: &str) -> Value {
    json!({
        "Type": kind,
        "MessageId": uuid::Uuid::new_v4().to_string(),
        "Token": "2336412f37fb687f5d51e6e241d09c805a5a57b30d712f794cc5f6a988666d92768dd60a747ba6f3beb71854e285d6ad02428b09ceece29417f1f02d609c582afbacc99c583a916b9981dd2728f4ae6fdb82efd087cc3b7849e05798d2d2785c03b0879594eeac82c01f235d0e717736",
        "TopicArn": TOPIC,
        "Message": "You have chosen to subscribe to the topic arn:aws:sns:us-west-2:123456789012:MyTopic.\nTo confirm the subscription, visit the SubscribeURL included in this message.",
        "SubscribeURL": subscribe_url,
        "Timestamp": now()
    })
}

/// SNS-style pretty JSON (`"Key" : "value"`), as the service sends it.
fn sns_body(v: &Value) -> Vec<u8> {
    serde_json::to_string_pretty(v)
        .unwrap()
        .replace("\": ", "\" : ")
        .into_bytes()
}

async fn post_sns(app: &TestApp, v: &Value) -> reqwest::Response {
    app.client
        .post(app.url(PATH))
        .header("content-type", "text/plain; charset=UTF-8")
        .header("x-amz-sns-message-type", v["Type"].as_str().unwrap())
        .header("x-amz-sns-message-id", v["MessageId"].as_str().unwrap())
        .header("x-amz-sns-topic-arn", v["TopicArn"].as_str().unwrap())
        .header("user-agent", "Amazon Simple Notification Service Agent")
        .body(sns_body(v))
        .send()
        .await
        .unwrap()
}

async fn sns_app(fake: &FakeSns) -> TestApp {
    let pattern = fake.host_pattern();
    spawn_app(move |c| {
        c.sns.host_pattern = pattern;
        c.sns.topic_arns = vec![TOPIC.into()];
    })
    .await
}

#[tokio::test]
async fn signed_notifications_v1_and_v2_are_accepted_as_text_plain() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    let eb_event = r#"{"version":"0","id":"6a7e8feb-b491-4cf7-a9f1-bf3703467718","detail-type":"EC2 Instance State-change Notification","source":"aws.ec2","account":"123456789012","time":"2017-12-22T18:43:48Z","region":"us-west-2","resources":[],"detail":{"state":"terminated"}}"#;
    let mut with_subject = notification("My Test Message\nwith a newline");
    with_subject["Subject"] = json!("My subject");
    let n1 = fake.signed(with_subject, "1");
    let n2 = fake.signed(notification(eb_event), "2");
    for n in [&n1, &n2] {
        let resp = post_sns(&app, n).await;
        assert_eq!(resp.status(), 200, "{:?}", resp.text().await);
    }
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 2).await;
    for (r, n) in recs.iter().zip([&n1, &n2]) {
        assert_eq!(r.value, sns_body(n));
        assert_raw_headers(r, "aws", "sns", "event");
        assert_eq!(r.header("x-amz-sns-message-type"), Some("Notification"));
        assert_eq!(r.header("x-amz-sns-message-id"), n["MessageId"].as_str());
        assert_eq!(r.header("x-amz-sns-topic-arn"), Some(TOPIC));
        assert_eq!(r.header("content-type"), Some("text/plain; charset=UTF-8"));
    }
    // The certificate is fetched once and cached.
    assert_eq!(fake.cert_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn subscription_confirmation_is_verified_confirmed_and_landed_as_handshake() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    let url = format!(
        "{}/?Action=ConfirmSubscription&TopicArn={TOPIC}&Token=2336412f37fb",
        fake.origin
    );
    let c = fake.signed(confirmation("SubscriptionConfirmation", &url), "1");
    let resp = post_sns(&app, &c).await;
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["status"], "confirmed");
    assert_eq!(fake.confirm_hits.load(Ordering::SeqCst), 1);

    let u = fake.signed(confirmation("UnsubscribeConfirmation", &url), "2");
    assert_eq!(post_sns(&app, &u).await.status(), 200);
    // Unsubscribe is recorded, never answered by re-subscribing.
    assert_eq!(fake.confirm_hits.load(Ordering::SeqCst), 1);

    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 2).await;
    assert_eq!(recs[0].value, sns_body(&c));
    assert_raw_headers(&recs[0], "aws", "sns", "handshake");
    assert_eq!(
        recs[0].header("helios-handshake"),
        Some("sns-subscription-confirmation")
    );
    assert_eq!(
        recs[1].header("helios-handshake"),
        Some("sns-unsubscribe-confirmation")
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
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("helios_ingress_handshakes_total")
                && l.contains("kind=\"sns_subscription_confirmation\"")
                && l.contains("subscription=\"MyTopic\"")
                && l.contains("outcome=\"confirmed\"")),
        "{metrics}"
    );
    // The allow-listed ARN (what a forged envelope would need) is not published.
    assert!(!metrics.contains(TOPIC), "the topic ARN is on /metrics");
}

#[tokio::test]
async fn tampered_wrong_topic_and_bad_urls_are_refused_and_nothing_is_fetched() {
    let fake = fake_sns().await;
    let evil = fake_sns().await; // a different host that must never be contacted
    let app = spawn_app({
        let pattern = fake.host_pattern();
        move |c| {
            c.sns.host_pattern = pattern;
            c.sns.topic_arns = vec![TOPIC.into()];
        }
    })
    .await;

    // Tampered after signing.
    let mut t = fake.signed(notification("original"), "1");
    t["Message"] = json!("tampered");
    assert_eq!(post_sns(&app, &t).await.status(), 403);

    // Wrong topic (validly signed).
    let mut other = notification("hello");
    other["TopicArn"] = json!("arn:aws:sns:us-west-2:999999999999:NotMine");
    let other = fake.signed(other, "2");
    assert_eq!(post_sns(&app, &other).await.status(), 403);

    // SigningCertURL off the SNS host pattern: refused before any fetch.
    let mut off = evil.signed(notification("hello"), "1");
    off["SigningCertURL"] = json!(format!(
        "{}/SimpleNotificationService-test.pem",
        evil.origin
    ));
    let resp = post_sns(&app, &off).await;
    assert_eq!(resp.status(), 403);
    assert!(resp.text().await.unwrap().contains("SigningCertURL"));
    let mut localhost = fake.signed(notification("hello"), "1");
    localhost["SigningCertURL"] = json!(
        fake.origin.replace("127.0.0.1", "localhost") + "/SimpleNotificationService-test.pem"
    );
    assert_eq!(post_sns(&app, &localhost).await.status(), 403);

    // A validly signed confirmation whose SubscribeURL points elsewhere: no GET is made.
    let bad_confirm = fake.signed(
        confirmation(
            "SubscriptionConfirmation",
            &format!("{}/?Action=ConfirmSubscription", evil.origin),
        ),
        "1",
    );
    assert_eq!(post_sns(&app, &bad_confirm).await.status(), 403);

    assert_eq!(evil.cert_hits.load(Ordering::SeqCst), 0);
    assert_eq!(evil.confirm_hits.load(Ordering::SeqCst), 0);
    assert_eq!(fake.confirm_hits.load(Ordering::SeqCst), 0);
    // Every refusal happens before landing: nothing reached Kafka.
    read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 0).await;
}

#[tokio::test]
async fn raw_delivery_needs_the_token_and_lands_the_bare_message() {
    let app = spawn_app(|c| {
        c.sns.raw_delivery_token = Some("raw-tok".into());
        c.sns.topic_arns = vec![TOPIC.into()];
    })
    .await;
    let body = br#"{"version":"0","id":"6a7e8feb-b491-4cf7-a9f1-bf3703467718","detail-type":"OrderPlaced","source":"com.example"}"#;
    let send = |q: &'static str| {
        app.client
            .post(app.url(&format!("{PATH}{q}")))
            .header("content-type", "text/plain; charset=UTF-8")
            .header("x-amz-sns-message-type", "Notification")
            .header(
                "x-amz-sns-message-id",
                "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
            )
            .header("x-amz-sns-topic-arn", TOPIC)
            .header("x-amz-sns-rawdelivery", "true")
            .body(&body[..])
            .send()
    };
    assert_eq!(send("").await.unwrap().status(), 401);
    assert_eq!(send("?token=nope").await.unwrap().status(), 401);
    assert_eq!(send("?token=raw-tok").await.unwrap().status(), 200);
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 1).await;
    assert_eq!(recs[0].value, body);
    assert_eq!(recs[0].header("x-amz-sns-rawdelivery"), Some("true"));
}

#[tokio::test]
async fn sns_envelope_on_the_eventbridge_endpoint_is_handled_as_sns() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    let n = fake.signed(notification("{\"hello\":1}"), "2");
    let resp = app
        .client
        .post(app.url("/api/v1/webhooks/aws/eventbridge"))
        .header("content-type", "text/plain; charset=UTF-8")
        .header("x-amz-sns-message-type", "Notification")
        .body(sns_body(&n))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut tampered = n.clone();
    tampered["Message"] = json!("{\"hello\":2}");
    let resp = app
        .client
        .post(app.url("/api/v1/webhooks/aws/eventbridge"))
        .header("x-amz-sns-message-type", "Notification")
        .body(sns_body(&tampered))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 403);
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 1).await;
    assert_eq!(recs[0].header("helios-endpoint"), Some("eventbridge"));
}

#[tokio::test]
async fn sns_on_the_eventbridge_endpoint_needs_the_credentials_or_the_allow_list() {
    let fake = fake_sns().await;
    let post_eb = |app: &TestApp, v: &Value| {
        app.client
            .post(app.url("/api/v1/webhooks/aws/eventbridge"))
            .header("x-amz-sns-message-type", "Notification")
            .body(sns_body(v))
            .send()
    };
    let mut foreign = notification("{\"event_type\":\"OrderPlaced\",\"id\":\"chosen\"}");
    foreign["TopicArn"] = json!("arn:aws:sns:eu-west-1:999999999999:attacker");
    let foreign = fake.signed(foreign, "2");
    // API key configured and an allow-list: a signed notification of another topic, no key.
    let app = spawn_app({
        let pattern = fake.host_pattern();
        move |c| {
            c.sns.host_pattern = pattern;
            c.sns.topic_arns = vec![TOPIC.into()];
            c.eventbridge.api_key = Some("k".repeat(32));
        }
    })
    .await;
    assert_eq!(post_eb(&app, &foreign).await.unwrap().status(), 403);
    // API key configured, no allow-list, no key sent: refused before any SNS check.
    let keyed = spawn_app({
        let pattern = fake.host_pattern();
        move |c| {
            c.sns.host_pattern = pattern;
            c.eventbridge.api_key = Some("k".repeat(32));
        }
    })
    .await;
    assert_eq!(post_eb(&keyed, &foreign).await.unwrap().status(), 401);
    // Neither configured: SNS is not taken on the EventBridge endpoint at all.
    let open = spawn_app({
        let pattern = fake.host_pattern();
        move |c| c.sns.host_pattern = pattern
    })
    .await;
    assert_eq!(post_eb(&open, &foreign).await.unwrap().status(), 403);
    for a in [&app, &keyed, &open] {
        read_exactly(&a.kafka.bootstrap_servers, &a.raw_topic(Source::Aws), 0).await;
    }
}

#[tokio::test]
async fn a_signed_message_older_than_the_maximum_age_is_refused_as_a_replay() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    let mut old = notification("captured earlier");
    old["Timestamp"] = json!((chrono::Utc::now() - chrono::Duration::minutes(70))
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    let old = fake.signed(old, "2");
    let resp = post_sns(&app, &old).await;
    assert_eq!(resp.status(), 403);
    assert!(resp
        .text()
        .await
        .unwrap()
        .contains("HELIOS_SNS_MAX_AGE_SECS"));
    // A fresh one of the same topic passes.
    assert_eq!(
        post_sns(&app, &fake.signed(notification("fresh"), "2"))
            .await
            .status(),
        200
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
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("helios_ingress_auth_failures_total")
                && l.contains("reason=\"sns_too_old\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn certificate_urls_differing_only_in_query_or_fragment_are_fetched_once() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    for i in 0..6 {
        let mut n = fake.signed(notification(&format!("m{i}")), "2");
        // SigningCertURL is not part of the signed string: an attacker controls its query.
        n["SigningCertURL"] = json!(format!(
            "{}/SimpleNotificationService-test.pem?n={i}#f{i}",
            fake.origin
        ));
        assert_eq!(post_sns(&app, &n).await.status(), 200);
    }
    assert_eq!(fake.cert_hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_flood_of_made_up_certificate_urls_costs_a_bounded_number_of_fetches() {
    let fake = fake_sns().await;
    let app = sns_app(&fake).await;
    // 60 messages, each naming another certificate on the SNS host (the host pattern allows it),
    // then the same unknown one 20 times.
    let mut statuses = vec![];
    for i in 0..80 {
        let mut v = fake.signed(notification("flood"), "2");
        let name = if i < 60 {
            format!("made-up-{i}")
        } else {
            "made-up-again".into()
        };
        v["SigningCertURL"] = json!(format!("{}/{name}.pem", fake.origin));
        statuses.push(post_sns(&app, &v).await.status().as_u16());
    }
    // Never a 4xx (SNS would drop the message): 503, SNS retries.
    assert!(statuses.iter().all(|s| *s == 503), "{statuses:?}");
    let fetched = fake.other_hits.load(Ordering::SeqCst);
    assert!(
        fetched <= 10,
        "{fetched} certificate fetches for 80 made-up URLs"
    );
    // Nothing was landed.
    read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Aws), 0).await;
}

/// Holds unauthenticated uploads against `path` open, a byte now and then, reconnecting when
/// the ingress closes one, until `stop`.
async fn slow_uploader(
    addr: std::net::SocketAddr,
    path: &'static str,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> usize {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut attempts = 0;
    while !stop.load(Ordering::Relaxed) {
        attempts += 1;
        let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            continue;
        };
        let head = format!("POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000\r\n\r\n{{");
        if s.write_all(head.as_bytes()).await.is_err() {
            continue;
        }
        let mut buf = [0u8; 512];
        loop {
            tokio::select! {
                _ = s.read(&mut buf) => break, // answered (or closed): start over
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => {
                    if stop.load(Ordering::Relaxed) || s.write_all(b"0").await.is_err() {
                        break;
                    }
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    attempts
}

#[tokio::test]
async fn unauthenticated_slow_uploads_starve_neither_eventbridge_nor_sns() {
    let fake = fake_sns().await;
    let pattern = fake.host_pattern();
    let app = spawn_app(move |c| {
        c.sns.host_pattern = pattern;
        c.sns.topic_arns = vec![TOPIC.into()];
        c.eventbridge.api_key = Some("eb-secret".into());
    })
    .await;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let attackers: Vec<_> = (0..1100)
        .map(|_| {
            tokio::spawn(slow_uploader(
                app.addr,
                "/api/v1/webhooks/aws/eventbridge",
                stop.clone(),
            ))
        })
        .collect();
    // Let them take hold.
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let (mut eb_ok, mut sns_ok) = (0, 0);
    let n = 100;
    for i in 0..n {
        let r = app
            .client
            .post(app.url("/api/v1/webhooks/aws/eventbridge"))
            .header("x-helios-key", "eb-secret")
            .json(&json!({"version": "0", "id": format!("slow-eb-{i}"), "detail-type": "OrderPlaced", "source": "s", "detail": {}}))
            .timeout(std::time::Duration::from_secs(5))
            .send()
            .await;
        eb_ok += r.is_ok_and(|r| r.status() == 200) as usize;
        let v = fake.signed(notification("slow"), "2");
        sns_ok += (post_sns(&app, &v).await.status() == 200) as usize;
    }
    stop.store(true, Ordering::Relaxed);
    let mut attempts = 0;
    for a in attackers {
        attempts += a.await.unwrap();
    }
    eprintln!("{attempts} unauthenticated uploads; EventBridge {eb_ok}/{n}, SNS {sns_ok}/{n} acknowledged");
    assert!(attempts >= 1100);
    assert!(
        eb_ok * 100 >= n * 99,
        "EventBridge: {eb_ok} of {n} acknowledged"
    );
    assert!(sns_ok * 100 >= n * 99, "SNS: {sns_ok} of {n} acknowledged");
}
