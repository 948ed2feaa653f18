//! Pub/Sub push: wrapped and unwrapped bodies, and OIDC JWT verification with keys made here.

use base64::Engine;
use helios::source::Source;
use openssl::bn::BigNumRef;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use openssl::rsa::Rsa;
use openssl::sign::Signer;
use serde_json::json;

use crate::common::*;

const PATH: &str = "/api/v1/webhooks/gcp/pubsub";
const WRAPPED: &[u8] = include_bytes!("../../samples/gcp-pubsub-wrapped.json");
const WRAPPED_FULL: &[u8] = include_bytes!("../../samples/gcp-pubsub-wrapped-full.json");
const UNWRAPPED: &[u8] = include_bytes!("../../samples/gcp-pubsub-unwrapped.json");
const AUDIENCE: &str = "https://helios.example.com/api/v1/webhooks/gcp/pubsub";
const EMAIL: &str = "push@my-project.iam.gserviceaccount.com";

#[tokio::test]
async fn wrapped_and_unwrapped_pushes_land_byte_for_byte() {
    let app = spawn_app(|_| {}).await;
    for body in [WRAPPED, WRAPPED_FULL] {
        let r = app
            .client
            .post(app.url(PATH))
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
    }
    let r = app
        .client
        .post(app.url(PATH))
        .header("content-type", "application/json")
        .header(
            "x-goog-pubsub-subscription-name",
            "projects/myproject/subscriptions/mysubscription",
        )
        .header("x-goog-pubsub-message-id", "2070443601311540")
        .header("x-goog-pubsub-publish-time", "2021-02-26T19:13:55.749Z")
        .header("x-goog-pubsub-ordering-key", "some-key")
        .header("eventType", "OrderPlaced")
        .header("tenant", "acme")
        .header("authorization", "Bearer not-checked-here")
        .body(UNWRAPPED)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Gcp), 3).await;
    assert_eq!(recs[0].value, WRAPPED);
    assert_eq!(recs[1].value, WRAPPED_FULL);
    assert_eq!(recs[2].value, UNWRAPPED);
    for r in &recs {
        assert_raw_headers(r, "gcp", "pubsub", "event");
    }
    // Unwrapped: metadata headers and attribute headers travel with the record.
    let u = &recs[2];
    assert_eq!(
        u.header("x-goog-pubsub-message-id"),
        Some("2070443601311540")
    );
    assert_eq!(u.header("eventtype"), Some("OrderPlaced"));
    assert_eq!(u.header("tenant"), Some("acme"));
    // Wrapped: attribute-like headers are not copied.
    assert!(!recs[0].headers.contains_key("tenant"));
}

#[tokio::test]
async fn non_json_without_pubsub_metadata_is_400_but_raw_bytes_are_accepted() {
    let app = spawn_app(|_| {}).await;
    let r = app
        .client
        .post(app.url(PATH))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    // Unwrapped delivery of non-JSON data (write-metadata on): accepted as-is.
    let r = app
        .client
        .post(app.url(PATH))
        .header("content-type", "application/octet-stream")
        .header("x-goog-pubsub-message-id", "42")
        .body(vec![0u8, 159, 146, 150])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Gcp), 1).await;
    assert_eq!(recs[0].value, vec![0u8, 159, 146, 150]);
}

struct Keys {
    key: PKey<Private>,
    jwks_path: std::path::PathBuf,
    _dir: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn bn(b: &BigNumRef) -> String {
    b64url(&b.to_vec())
}

fn make_keys() -> Keys {
    let rsa = Rsa::generate(2048).unwrap();
    let jwks = json!({"keys": [{"kty": "RSA", "alg": "RS256", "use": "sig", "kid": "k1",
        "n": bn(rsa.n()), "e": bn(rsa.e())}]});
    let dir = scratch_dir("jwks");
    let jwks_path = dir.join("jwks.json");
    std::fs::write(&jwks_path, jwks.to_string()).unwrap();
    Keys {
        key: PKey::from_rsa(rsa).unwrap(),
        jwks_path,
        _dir: TempDir(dir),
    }
}

fn token(key: &PKey<Private>, claims: serde_json::Value) -> String {
    let header = b64url(
        json!({"alg": "RS256", "kid": "k1", "typ": "JWT"})
            .to_string()
            .as_bytes(),
    );
    let payload = b64url(claims.to_string().as_bytes());
    let mut s = Signer::new(MessageDigest::sha256(), key).unwrap();
    s.update(format!("{header}.{payload}").as_bytes()).unwrap();
    format!("{header}.{payload}.{}", b64url(&s.sign_to_vec().unwrap()))
}

fn claims(aud: &str, exp_offset: i64) -> serde_json::Value {
    let now = chrono::Utc::now().timestamp();
    json!({"aud": aud, "azp": "113774264463038321964", "email": EMAIL, "email_verified": true,
        "exp": now + exp_offset, "iat": now - 60, "iss": "https://accounts.google.com",
        "sub": "113774264463038321964"})
}

#[tokio::test]
async fn oidc_tokens_are_verified() {
    let keys = make_keys();
    let path = keys.jwks_path.clone();
    let app = spawn_app(move |c| {
        c.pubsub.oidc_audience = Some(AUDIENCE.into());
        c.pubsub.oidc_email = Some(EMAIL.into());
        c.pubsub.jwks_file = Some(path);
    })
    .await;
    let send = |auth: Option<String>| {
        let mut r = app
            .client
            .post(app.url(PATH))
            .header("content-type", "application/json")
            .body(WRAPPED);
        if let Some(a) = auth {
            r = r.header("authorization", a);
        }
        r.send()
    };
    let other = Rsa::generate(2048).unwrap();
    let other = PKey::from_rsa(other).unwrap();
    let mut wrong_email = claims(AUDIENCE, 3600);
    wrong_email["email"] = json!("someone@else.iam.gserviceaccount.com");
    let cases = [
        (None, "missing"),
        (
            Some(format!(
                "Bearer {}",
                token(&keys.key, claims("https://other.example.com", 3600))
            )),
            "audience",
        ),
        (
            Some(format!(
                "Bearer {}",
                token(&keys.key, claims(AUDIENCE, -3600))
            )),
            "expired",
        ),
        (
            Some(format!("Bearer {}", token(&other, claims(AUDIENCE, 3600)))),
            "signature",
        ),
        (
            Some(format!("Bearer {}", token(&keys.key, wrong_email))),
            "email",
        ),
        (Some("Bearer abc.def".to_string()), "JWT"),
    ];
    for (auth, why) in cases {
        let r = send(auth).await.unwrap();
        assert_eq!(r.status(), 401, "case {why}");
        let msg = r.text().await.unwrap();
        assert!(msg.contains(why), "case {why}: {msg}");
    }
    read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Gcp), 0).await;

    let good = format!("Bearer {}", token(&keys.key, claims(AUDIENCE, 3600)));
    assert_eq!(send(Some(good)).await.unwrap().status(), 200);
    let recs = read_exactly(&app.kafka.bootstrap_servers, &app.raw_topic(Source::Gcp), 1).await;
    assert_eq!(recs[0].value, WRAPPED);
    assert!(!recs[0].headers.contains_key("authorization"));
}

fn token_with_kid(key: &PKey<Private>, kid: &str, claims: serde_json::Value) -> String {
    let header = b64url(
        json!({"alg": "RS256", "kid": kid, "typ": "JWT"})
            .to_string()
            .as_bytes(),
    );
    let payload = b64url(claims.to_string().as_bytes());
    let mut s = Signer::new(MessageDigest::sha256(), key).unwrap();
    s.update(format!("{header}.{payload}").as_bytes()).unwrap();
    format!("{header}.{payload}.{}", b64url(&s.sign_to_vec().unwrap()))
}

#[tokio::test]
async fn an_audience_without_the_service_account_is_not_authentication() {
    // The health endpoint says which checks are on, never the audience itself.
    let keys = make_keys();
    let path = keys.jwks_path.clone();
    let app = spawn_app(move |c| {
        c.pubsub.oidc_audience = Some(AUDIENCE.into());
        c.pubsub.oidc_email = Some(EMAIL.into());
        c.pubsub.jwks_file = Some(path);
    })
    .await;
    let health = app
        .client
        .get(app.url("/api/v1/webhooks/gcp/health"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !health.contains(AUDIENCE) && !health.contains(EMAIL),
        "{health}"
    );
    assert!(health.contains("\"authenticated\":true"), "{health}");
    // Production mode with an audience and no service account refuses to start.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_helios"))
        .arg("ingress")
        .env(
            "HELIOS_TOPOLOGY",
            concat!(env!("CARGO_MANIFEST_DIR"), "/topology.yaml"),
        )
        .env("DEPLOYMENT_MODE", "production")
        .env("HELIOS_EVENTBRIDGE_API_KEY", "k")
        .env("HELIOS_SNS_TOPIC_ARNS", "arn:aws:sns:eu-west-1:1:t")
        .env("HELIOS_PUBSUB_OIDC_AUDIENCE", AUDIENCE)
        .env_remove("HELIOS_PUBSUB_OIDC_EMAIL")
        .env("HELIOS_EVENTGRID_SECRET", "s")
        .env("HELIOS_INGEST_API_KEY", "k")
        .env("API_PORT", "0")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("HELIOS_PUBSUB_OIDC_EMAIL"), "{stderr}");
}

/// A JWKS server that answers its first request and then never again (it accepts and hangs),
/// counting requests.
async fn flaky_jwks(jwks: String) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/certs", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    tokio::spawn(async move {
        while let Ok((mut sock, _)) = listener.accept().await {
            let n = h.fetch_add(1, Ordering::SeqCst);
            let jwks = jwks.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = sock.read(&mut buf).await;
                if n == 0 {
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{jwks}",
                        jwks.len()
                    );
                    let _ = sock.write_all(resp.as_bytes()).await;
                } else {
                    // Never answers; keeps the connection open until the client gives up.
                    let _ = sock.read(&mut buf).await;
                }
            });
        }
    });
    (url, hits)
}

#[tokio::test]
async fn unknown_key_ids_cannot_make_helios_fetch_google_keys_again_and_again() {
    use std::sync::atomic::Ordering;
    let keys = make_keys();
    let jwks = std::fs::read_to_string(&keys.jwks_path).unwrap();
    let (url, hits) = flaky_jwks(jwks).await;
    let interval = std::time::Duration::from_secs(2);
    let app = spawn_app(move |c| {
        c.pubsub.oidc_audience = Some(AUDIENCE.into());
        c.pubsub.oidc_email = Some(EMAIL.into());
        c.pubsub.jwks_url = url;
        c.pubsub.jwks_refresh = interval;
    })
    .await;
    let send = |auth: String| {
        app.client
            .post(app.url(PATH))
            .header("content-type", "application/json")
            .header("authorization", auth)
            .body(WRAPPED)
            .send()
    };
    let good = || format!("Bearer {}", token(&keys.key, claims(AUDIENCE, 3600)));
    assert_eq!(send(good()).await.unwrap().status(), 200);
    assert_eq!(hits.load(Ordering::SeqCst), 1, "the keys were fetched once");
    // Past the refresh interval, 50 tokens with random kids arrive at once: one refresh is
    // tried (and hangs: the key server no longer answers), the others are told to retry at once.
    tokio::time::sleep(interval + std::time::Duration::from_millis(200)).await;
    let random: Vec<_> = (0..50)
        .map(|i| {
            let kid = format!("rotated-{i}-{}", uuid::Uuid::new_v4());
            send(format!(
                "Bearer {}",
                token_with_kid(&keys.key, &kid, claims(AUDIENCE, 3600))
            ))
        })
        .collect();
    let random = tokio::spawn(futures::future::join_all(random));
    // Meanwhile tokens with the known key keep their latency.
    let mut slowest = std::time::Duration::ZERO;
    for _ in 0..20 {
        let t = std::time::Instant::now();
        assert_eq!(send(good()).await.unwrap().status(), 200);
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < std::time::Duration::from_millis(500),
        "a valid token took {slowest:?}"
    );
    let answers = random.await.unwrap();
    assert!(answers.iter().all(|r| r.as_ref().unwrap().status() == 503));
    assert_eq!(
        hits.load(Ordering::SeqCst),
        2,
        "one refresh for 50 unknown kids"
    );
    // The failed refresh is remembered: more unknown kids right after cause no fetch.
    for i in 0..10 {
        let kid = format!("again-{i}");
        let r = send(format!(
            "Bearer {}",
            token_with_kid(&keys.key, &kid, claims(AUDIENCE, 3600))
        ))
        .await
        .unwrap();
        assert_eq!(r.status(), 503);
    }
    assert_eq!(hits.load(Ordering::SeqCst), 2);
}
