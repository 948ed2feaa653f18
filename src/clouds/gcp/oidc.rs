//! Verification of the OIDC JWT that Pub/Sub push attaches as `Authorization: Bearer`:
//! RS256 against Google's keys (JWKS, or the PEM map of `/oauth2/v1/certs`), issuer, audience,
//! expiry, and the service-account email (`email_verified` must be true).
//!
//! The keys are cached. An unknown `kid` (Google rotated its keys) triggers one refresh, at most
//! one per [`REFRESH_INTERVAL`] whether it succeeded or failed (a failure is remembered: tokens
//! with unknown `kid`s are then answered 503 at once, not with a fetch each), and never while
//! another refresh is in flight. The fetch happens outside the key lock, so tokens with known
//! keys are verified at full speed while it runs.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::RwLock;
use std::time::{Duration, Instant};

use base64::Engine;
use openssl::bn::BigNum;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public};
use openssl::rsa::Rsa;
use openssl::sign::Verifier;
use serde::Deserialize;

use crate::model::text::echo;

const ISSUERS: &[&str] = &["https://accounts.google.com", "accounts.google.com"];
const LEEWAY_SECS: i64 = 60;
/// At most one key refresh per interval, successful or not.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(60);

/// Why a token was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The token is wrong and will stay wrong (401).
    #[error("{0}")]
    Invalid(String),
    /// The keys could not be loaded right now (503: the push will be retried).
    #[error("{0}")]
    KeysUnavailable(String),
}

#[derive(Deserialize)]
struct JwtHeader {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
}

/// The claims HELIOS checks.
#[derive(Debug, Deserialize)]
pub struct Claims {
    #[serde(default)]
    pub iss: Option<String>,
    #[serde(default)]
    pub aud: Option<serde_json::Value>,
    #[serde(default)]
    pub exp: Option<i64>,
    #[serde(default)]
    pub iat: Option<i64>,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub email_verified: Option<bool>,
    #[serde(default)]
    pub sub: Option<String>,
}

/// The last refresh attempt and its failure, if it failed.
#[derive(Default)]
struct Refresh {
    attempted: Option<Instant>,
    failure: Option<String>,
}

/// Verifies Pub/Sub push tokens; caches the signing keys and refreshes them on an unknown `kid`.
pub struct OidcVerifier {
    audience: String,
    email: Option<String>,
    jwks_url: String,
    jwks_file: Option<PathBuf>,
    http: reqwest::Client,
    keys: RwLock<HashMap<String, PKey<Public>>>,
    refresh: tokio::sync::Mutex<Refresh>,
    refresh_interval: Duration,
}

impl OidcVerifier {
    /// A verifier; a configured JWKS file is read (and checked) now, a URL on first use.
    pub fn new(
        audience: String,
        email: Option<String>,
        jwks_url: String,
        jwks_file: Option<PathBuf>,
        http: reqwest::Client,
    ) -> anyhow::Result<Self> {
        let mut keys = HashMap::new();
        let mut refresh = Refresh::default();
        if let Some(path) = &jwks_file {
            let text = std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("HELIOS_PUBSUB_JWKS_FILE {}: {e}", path.display()))?;
            keys = parse_keys(&text)
                .map_err(|e| anyhow::anyhow!("HELIOS_PUBSUB_JWKS_FILE {}: {e}", path.display()))?;
            refresh.attempted = Some(Instant::now());
        }
        Ok(OidcVerifier {
            audience,
            email,
            jwks_url,
            jwks_file,
            http,
            keys: RwLock::new(keys),
            refresh: tokio::sync::Mutex::new(refresh),
            refresh_interval: REFRESH_INTERVAL,
        })
    }

    /// Another refresh interval (`HELIOS_PUBSUB_JWKS_REFRESH_SECS`).
    pub fn with_refresh_interval(mut self, interval: Duration) -> Self {
        self.refresh_interval = interval;
        self
    }

    /// Verifies the value of an `Authorization` header.
    pub async fn verify_header(&self, authorization: Option<&str>) -> Result<Claims, TokenError> {
        let v = authorization
            .ok_or_else(|| TokenError::Invalid("missing Authorization: Bearer token".into()))?;
        let token = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
            .ok_or_else(|| TokenError::Invalid("Authorization is not a Bearer token".into()))?;
        self.verify(token.trim()).await
    }

    /// Verifies a compact JWT.
    pub async fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let invalid = |m: &str| TokenError::Invalid(format!("invalid OIDC token: {m}"));
        let mut parts = token.split('.');
        let (h, p, s) = match (parts.next(), parts.next(), parts.next(), parts.next()) {
            (Some(h), Some(p), Some(s), None) => (h, p, s),
            _ => return Err(invalid("not a JWT (three dot-separated parts)")),
        };
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let header: JwtHeader = serde_json::from_slice(
            &b64.decode(h)
                .map_err(|_| invalid("header is not base64url"))?,
        )
        .map_err(|_| invalid("header is not JSON"))?;
        if header.alg != "RS256" {
            return Err(invalid(&format!(
                "alg `{}` is not RS256",
                echo(&header.alg)
            )));
        }
        let claims: Claims = serde_json::from_slice(
            &b64.decode(p)
                .map_err(|_| invalid("payload is not base64url"))?,
        )
        .map_err(|_| invalid("payload is not JSON"))?;
        let signature = b64
            .decode(s)
            .map_err(|_| invalid("signature is not base64url"))?;
        let signed = &token.as_bytes()[..h.len() + 1 + p.len()];

        if !self
            .signature_ok(header.kid.as_deref(), signed, &signature)
            .await?
        {
            return Err(invalid(
                "signature does not verify against the configured keys",
            ));
        }
        let now = chrono::Utc::now().timestamp();
        match claims.iss.as_deref() {
            Some(iss) if ISSUERS.contains(&iss) => {}
            other => {
                return Err(invalid(&format!(
                    "issuer {:?} is not Google",
                    other.map(|o| echo(o).into_owned())
                )))
            }
        }
        let aud_ok = match &claims.aud {
            Some(serde_json::Value::String(a)) => a == &self.audience,
            Some(serde_json::Value::Array(a)) => {
                a.iter().any(|x| x.as_str() == Some(&self.audience))
            }
            _ => false,
        };
        if !aud_ok {
            return Err(invalid(
                "audience is not the expected one (HELIOS_PUBSUB_OIDC_AUDIENCE)",
            ));
        }
        match claims.exp {
            Some(exp) if exp + LEEWAY_SECS >= now => {}
            Some(_) => return Err(invalid("token expired")),
            None => return Err(invalid("token has no exp")),
        }
        if claims.iat.is_some_and(|iat| iat - LEEWAY_SECS > now) {
            return Err(invalid("token issued in the future"));
        }
        if let Some(expected) = &self.email {
            if claims.email.as_deref() != Some(expected.as_str()) {
                return Err(invalid(&format!(
                    "email {:?} is not the push subscription's service account (HELIOS_PUBSUB_OIDC_EMAIL)",
                    claims.email.as_deref().map(|e| echo(e).into_owned())
                )));
            }
            if claims.email_verified != Some(true) {
                return Err(invalid("email_verified is not true"));
            }
        }
        Ok(claims)
    }

    async fn signature_ok(
        &self,
        kid: Option<&str>,
        signed: &[u8],
        signature: &[u8],
    ) -> Result<bool, TokenError> {
        if let Some(ok) = self.check_with_cached(kid, signed, signature).await {
            return Ok(ok);
        }
        // Unknown kid (keys rotated) or nothing loaded yet: refresh (at most once an interval).
        self.refresh().await?;
        Ok(self
            .check_with_cached(kid, signed, signature)
            .await
            .unwrap_or(false))
    }

    /// `Some(result)` when a matching key is cached, `None` when no key could be tried.
    async fn check_with_cached(
        &self,
        kid: Option<&str>,
        signed: &[u8],
        sig: &[u8],
    ) -> Option<bool> {
        let keys = self.keys.read().unwrap_or_else(|p| p.into_inner());
        let candidates: Vec<&PKey<Public>> = match kid {
            Some(k) => keys.get(k).into_iter().collect(),
            None => keys.values().collect(),
        };
        if candidates.is_empty() {
            return None;
        }
        Some(candidates.into_iter().any(|key| {
            Verifier::new(MessageDigest::sha256(), key)
                .and_then(|mut v| {
                    v.update(signed)?;
                    v.verify(sig)
                })
                .unwrap_or(false)
        }))
    }

    /// Reloads the keys, unless a refresh is in flight or one was attempted within the
    /// interval (then the outcome of that one counts: a failure is answered at once).
    async fn refresh(&self) -> Result<(), TokenError> {
        let Ok(mut state) = self.refresh.try_lock() else {
            return Err(TokenError::KeysUnavailable(
                "Google's signing keys are being refreshed; retry".into(),
            ));
        };
        if state
            .attempted
            .is_some_and(|t| t.elapsed() < self.refresh_interval)
        {
            return match &state.failure {
                Some(f) => Err(TokenError::KeysUnavailable(format!(
                    "{f} (the keys are fetched at most once every {} s)",
                    self.refresh_interval.as_secs()
                ))),
                None => Ok(()),
            };
        }
        let fetched = self.fetch().await;
        // The interval runs from the end of the attempt: a fetch that hung until its timeout
        // is not followed at once by another.
        state.attempted = Some(Instant::now());
        metrics::counter!("helios_ingress_jwks_fetches_total", "outcome" => if fetched.is_ok() { "ok" } else { "failed" })
            .increment(1);
        match fetched {
            Ok(keys) => {
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = keys;
                state.failure = None;
                Ok(())
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot refresh Google's signing keys");
                state.failure = Some(e.clone());
                Err(TokenError::KeysUnavailable(e))
            }
        }
    }

    async fn fetch(&self) -> Result<HashMap<String, PKey<Public>>, String> {
        let bytes = match &self.jwks_file {
            Some(path) => {
                std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?
            }
            None => {
                let resp = self
                    .http
                    .get(&self.jwks_url)
                    .send()
                    .await
                    .map_err(|e| format!("cannot fetch {}: {e}", self.jwks_url))?;
                if !resp.status().is_success() {
                    return Err(format!("{} answered HTTP {}", self.jwks_url, resp.status()));
                }
                resp.bytes().await.map_err(|e| e.to_string())?.to_vec()
            }
        };
        parse_keys(&bytes)
    }
}

/// Parses a JWKS (`{"keys":[{kid,n,e,...}]}`) or a `{kid: PEM certificate}` map.
pub fn parse_keys(bytes: &[u8]) -> Result<HashMap<String, PKey<Public>>, String> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| format!("keys are not JSON: {e}"))?;
    let mut out = HashMap::new();
    if let Some(keys) = v.get("keys").and_then(|k| k.as_array()) {
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        for k in keys {
            if k.get("kty").and_then(|x| x.as_str()) != Some("RSA") {
                continue;
            }
            let kid = k
                .get("kid")
                .and_then(|x| x.as_str())
                .unwrap_or("")
                .to_string();
            let field = |name: &str| -> Result<BigNum, String> {
                let s = k
                    .get(name)
                    .and_then(|x| x.as_str())
                    .ok_or_else(|| format!("key `{kid}` has no `{name}`"))?;
                let raw = b64
                    .decode(s.trim_end_matches('='))
                    .map_err(|_| format!("key `{kid}`: `{name}` is not base64url"))?;
                BigNum::from_slice(&raw).map_err(|e| e.to_string())
            };
            let rsa = Rsa::from_public_components(field("n")?, field("e")?)
                .map_err(|e| format!("key `{kid}`: {e}"))?;
            out.insert(kid, PKey::from_rsa(rsa).map_err(|e| e.to_string())?);
        }
    } else if let Some(map) = v.as_object() {
        for (kid, pem) in map {
            let pem = pem
                .as_str()
                .ok_or_else(|| format!("key `{kid}` is not a PEM string"))?;
            let key = openssl::x509::X509::from_pem(pem.as_bytes())
                .and_then(|c| c.public_key())
                .map_err(|e| format!("key `{kid}`: {e}"))?;
            out.insert(kid.clone(), key);
        }
    }
    if out.is_empty() {
        return Err("no RSA keys found".into());
    }
    Ok(out)
}
