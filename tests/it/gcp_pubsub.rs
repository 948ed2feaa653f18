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
