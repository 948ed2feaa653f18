//! SNS message authenticity: the canonical string SNS signs (versions 1 = SHA1, 2 = SHA256), the
//! signing certificate fetched only from an SNS host (checked *before* anything is fetched) and
//! cached by its URL without query or fragment in a bounded LRU, the message's age (a captured
//! message cannot be replayed later), and subscription confirmation toward an SNS host only.

use std::sync::{Arc, Mutex};

use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public};
use openssl::sign::Verifier;
use openssl::x509::X509;
use regex::Regex;
use serde::Deserialize;

use super::config::SnsConfig;
use crate::http::IngressError;
use crate::model::text::echo;

/// Most signing certificates kept (SNS uses one per region and rotation).
const CERT_CACHE_MAX: usize = 64;

/// The SNS JSON envelope (all three message types).
#[derive(Debug, Clone, Deserialize)]
pub struct SnsEnvelope {
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "MessageId")]
    pub message_id: String,
    #[serde(rename = "TopicArn")]
    pub topic_arn: String,
    #[serde(rename = "Message")]
    pub message: String,
    #[serde(rename = "Timestamp")]
    pub timestamp: String,
    #[serde(rename = "Subject", default)]
    pub subject: Option<String>,
    #[serde(rename = "Token", default)]
    pub token: Option<String>,
    #[serde(rename = "SubscribeURL", default)]
    pub subscribe_url: Option<String>,
    #[serde(rename = "UnsubscribeURL", default)]
    pub unsubscribe_url: Option<String>,
    #[serde(rename = "SignatureVersion", default)]
    pub signature_version: Option<String>,
    #[serde(rename = "Signature", default)]
    pub signature: Option<String>,
    #[serde(rename = "SigningCertURL", default)]
    pub signing_cert_url: Option<String>,
}

/// The three SNS message types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnsMessageType {
    Notification,
    SubscriptionConfirmation,
    UnsubscribeConfirmation,
}

impl SnsMessageType {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "Notification" => Some(Self::Notification),
            "SubscriptionConfirmation" => Some(Self::SubscriptionConfirmation),
            "UnsubscribeConfirmation" => Some(Self::UnsubscribeConfirmation),
            _ => None,
        }
    }
}

/// The canonical string SNS signs: `Name\nValue\n` per field, in the per-type order.
pub fn string_to_sign(env: &SnsEnvelope) -> Result<String, String> {
    let kind = SnsMessageType::parse(&env.kind)
        .ok_or_else(|| format!("unknown SNS message Type `{}`", env.kind))?;
    let mut fields: Vec<(&str, &str)> =
        vec![("Message", &env.message), ("MessageId", &env.message_id)];
    match kind {
        SnsMessageType::Notification => {
            if let Some(s) = &env.subject {
                fields.push(("Subject", s));
            }
            fields.push(("Timestamp", &env.timestamp));
        }
        _ => {
            let url = env
                .subscribe_url
                .as_deref()
                .ok_or("SubscribeURL is missing")?;
            let token = env.token.as_deref().ok_or("Token is missing")?;
            fields.push(("SubscribeURL", url));
            fields.push(("Timestamp", &env.timestamp));
            fields.push(("Token", token));
        }
    }
    fields.push(("TopicArn", &env.topic_arn));
    fields.push(("Type", &env.kind));
    let mut s = String::new();
    for (k, v) in fields {
        s.push_str(k);
        s.push('\n');
        s.push_str(v);
        s.push('\n');
    }
    Ok(s)
}

/// Checks signatures and confirms subscriptions; caches signing certificates.
pub struct SnsVerifier {
    host_pattern: Regex,
    http: reqwest::Client,
    certs: Mutex<CertCache>,
    /// One certificate fetch at a time (single flight: a flood of one URL costs one fetch).
    fetching: tokio::sync::Mutex<()>,
    /// URLs whose fetch failed, and when: not fetched again for [`NEGATIVE_TTL`].
    failed: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    /// When the recent fetches started: at most [`FETCHES_PER_MINUTE`].
    fetched: Mutex<std::collections::VecDeque<std::time::Instant>>,
}

/// How long a certificate URL whose fetch failed is not fetched again.
const NEGATIVE_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// Most failed URLs remembered (beyond, the oldest are forgotten).
const NEGATIVE_MAX: usize = 1024;
/// Most certificate fetches a minute (SNS signs with a handful of certificates; more is a flood
/// of made-up URLs, answered 503 — SNS retries — without an outbound request).
const FETCHES_PER_MINUTE: usize = 10;

/// Signing certificates by URL (scheme, host, port and path: a query or fragment cannot make a
/// new entry), the least recently used dropped beyond [`CERT_CACHE_MAX`].
#[derive(Default)]
struct CertCache {
    entries: Vec<(String, Arc<PKey<Public>>)>,
}

impl CertCache {
    fn get(&mut self, key: &str) -> Option<Arc<PKey<Public>>> {
        let i = self.entries.iter().position(|(k, _)| k == key)?;
        let e = self.entries.remove(i);
        let v = e.1.clone();
        self.entries.push(e);
        Some(v)
    }

    fn insert(&mut self, key: String, value: Arc<PKey<Public>>) {
        self.entries.retain(|(k, _)| *k != key);
        if self.entries.len() >= CERT_CACHE_MAX {
            self.entries.remove(0);
        }
        self.entries.push((key, value));
    }
}

impl SnsVerifier {
    pub fn new(cfg: &SnsConfig, http: reqwest::Client) -> anyhow::Result<Self> {
        Ok(SnsVerifier {
            host_pattern: Regex::new(&cfg.host_pattern).map_err(|e| {
                anyhow::anyhow!("HELIOS_SNS_HOST_PATTERN is not a valid regex: {e}")
            })?,
            http,
            certs: Mutex::new(CertCache::default()),
            fetching: tokio::sync::Mutex::new(()),
            failed: Mutex::new(Default::default()),
            fetched: Mutex::new(Default::default()),
        })
    }

    /// Parses `url` and checks that its origin is an SNS host; nothing is fetched otherwise.
    pub fn checked_sns_url(&self, url: &str, what: &str) -> Result<reqwest::Url, IngressError> {
        let refuse = |why: &str| {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_url_not_allowed")
                .increment(1);
            IngressError::Forbidden(format!("{what} `{}` {why}", echo(url)))
        };
        let u = reqwest::Url::parse(url).map_err(|_| refuse("is not a URL"))?;
        if !u.username().is_empty() || u.password().is_some() {
            return Err(refuse("carries credentials"));
        }
        let host = u.host_str().ok_or_else(|| refuse("has no host"))?;
        let origin = match u.port() {
            Some(p) => format!("{}://{}:{}", u.scheme(), host, p),
            None => format!("{}://{}", u.scheme(), host),
        };
        if !self.host_pattern.is_match(&origin) {
            return Err(refuse("is not on an SNS host (HELIOS_SNS_HOST_PATTERN)"));
        }
        Ok(u)
    }

    /// Verifies the envelope's signature (SignatureVersion 1 or 2).
    pub async fn verify(&self, env: &SnsEnvelope) -> Result<(), IngressError> {
        let refuse = |reason: &'static str, msg: String| {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => reason)
                .increment(1);
            IngressError::Forbidden(msg)
        };
        let digest = match env.signature_version.as_deref() {
            Some("1") => MessageDigest::sha1(),
            Some("2") => MessageDigest::sha256(),
            other => {
                return Err(refuse(
                    "sns_signature_version",
                    format!(
                        "SNS SignatureVersion {other:?} is not supported (expected \"1\" or \"2\")"
                    ),
                ))
            }
        };
        let cert_url = env.signing_cert_url.as_deref().ok_or_else(|| {
            refuse(
                "sns_signature_missing",
                "SNS message has no SigningCertURL".into(),
            )
        })?;
        let url = self.checked_sns_url(cert_url, "SigningCertURL")?;
        if !url.path().ends_with(".pem") {
            return Err(refuse(
                "sns_url_not_allowed",
                format!(
                    "SigningCertURL `{}` does not name a .pem certificate",
                    echo(cert_url)
                ),
            ));
        }
        let signature = env.signature.as_deref().ok_or_else(|| {
            refuse(
                "sns_signature_missing",
                "SNS message has no Signature".into(),
            )
        })?;
        let signature = base64::engine::general_purpose::STANDARD
            .decode(signature.trim())
            .map_err(|_| {
                refuse(
                    "sns_signature_invalid",
                    "SNS Signature is not base64".into(),
                )
            })?;
        let to_sign = string_to_sign(env).map_err(|e| {
            refuse(
                "sns_signature_invalid",
                format!("SNS message cannot be verified: {e}"),
            )
        })?;
        let key = self.certificate_key(url).await?;
        let ok = Verifier::new(digest, &key)
            .and_then(|mut v| {
                v.update(to_sign.as_bytes())?;
                v.verify(&signature)
            })
            .unwrap_or(false);
        if ok {
            Ok(())
        } else {
            Err(refuse(
                "sns_signature_invalid",
                "SNS signature does not match the message".into(),
            ))
        }
    }

    async fn certificate_key(
        &self,
        mut url: reqwest::Url,
    ) -> Result<Arc<PKey<Public>>, IngressError> {
        // The certificate is named by its path: a query string or a fragment would otherwise
        // make every request a new cache entry (and a fetch).
        url.set_query(None);
        url.set_fragment(None);
        let key_str = url.as_str().to_string();
        if let Some(k) = self.lock().get(&key_str) {
            return Ok(k);
        }
        let unavailable = |e: String| {
            IngressError::Unavailable(format!("cannot fetch the SNS signing certificate: {e}"))
        };
        let now = std::time::Instant::now();
        {
            let failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed
                .get(&key_str)
                .is_some_and(|at| now.duration_since(*at) < NEGATIVE_TTL)
            {
                metrics::counter!("helios_ingress_sns_certificate_refusals_total", "reason" => "failed_recently").increment(1);
                return Err(unavailable(
                    "its last fetch failed less than 5 minutes ago".into(),
                ));
            }
        }
        let _single = self.fetching.lock().await;
        if let Some(k) = self.lock().get(&key_str) {
            return Ok(k);
        }
        {
            let mut fetched = self.fetched.lock().unwrap_or_else(|p| p.into_inner());
            while fetched
                .front()
                .is_some_and(|t| now.duration_since(*t) > std::time::Duration::from_secs(60))
            {
                fetched.pop_front();
            }
            if fetched.len() >= FETCHES_PER_MINUTE {
                metrics::counter!("helios_ingress_sns_certificate_refusals_total", "reason" => "rate").increment(1);
                return Err(unavailable(format!(
                    "more than {FETCHES_PER_MINUTE} certificate fetches in a minute"
                )));
            }
            fetched.push_back(now);
        }
        let remember_failure = |key: &str| {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            if failed.len() >= NEGATIVE_MAX {
                failed.retain(|_, at| now.duration_since(*at) < NEGATIVE_TTL);
                if failed.len() >= NEGATIVE_MAX {
                    failed.clear();
                }
            }
            failed.insert(key.to_string(), now);
        };
        metrics::counter!("helios_ingress_sns_certificate_fetches_total").increment(1);
        let resp = match self.http.get(url).send().await {
            Ok(r) => r,
            Err(e) => {
                remember_failure(&key_str);
                return Err(unavailable(e.to_string()));
            }
        };
        if !resp.status().is_success() {
            remember_failure(&key_str);
            return Err(unavailable(format!("HTTP {}", resp.status())));
        }
        let pem = match resp.bytes().await {
            Ok(p) => p,
            Err(e) => {
                remember_failure(&key_str);
                return Err(unavailable(e.to_string()));
            }
        };
        let key = X509::from_pem(&pem)
            .and_then(|c| c.public_key())
            .map_err(|e| {
                remember_failure(&key_str);
                IngressError::Forbidden(format!(
                    "SigningCertURL does not hold a PEM certificate: {e}"
                ))
            })?;
        let key = Arc::new(key);
        self.lock().insert(key_str, key.clone());
        Ok(key)
    }

    /// Checks the signed `Timestamp` against `max_age` (and a clock skew of 5 minutes into the
    /// future): a captured message cannot be replayed later.
    pub fn check_age(env: &SnsEnvelope, max_age: std::time::Duration) -> Result<(), IngressError> {
        let refuse = |msg: String| {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_too_old")
                .increment(1);
            IngressError::Forbidden(msg)
        };
        let Some(t) = crate::model::event::parse_time(&env.timestamp) else {
            return Err(refuse(format!(
                "SNS Timestamp `{}` is not a time",
                echo(&env.timestamp)
            )));
        };
        let age = chrono::Utc::now().signed_duration_since(t);
        if age > chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX) {
            return Err(refuse(format!(
                "SNS message of {} is older than {} s (HELIOS_SNS_MAX_AGE_SECS): a replay",
                env.timestamp,
                max_age.as_secs()
            )));
        }
        if age < chrono::Duration::minutes(-5) {
            return Err(refuse(format!(
                "SNS message Timestamp {} is in the future",
                env.timestamp
            )));
        }
        Ok(())
    }

    /// Confirms a subscription: GET of the (validated) SubscribeURL.
    pub async fn confirm(&self, env: &SnsEnvelope) -> Result<(), IngressError> {
        let url = env.subscribe_url.as_deref().ok_or_else(|| {
            IngressError::BadRequest("SubscriptionConfirmation without SubscribeURL".into())
        })?;
        let url = self.checked_sns_url(url, "SubscribeURL")?;
        let resp = self.http.get(url).send().await.map_err(|e| {
            IngressError::Unavailable(format!("confirming the SNS subscription failed: {e}"))
        })?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(IngressError::Unavailable(format!(
                "confirming the SNS subscription failed: SNS answered HTTP {}",
                resp.status()
            )))
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CertCache> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn envelope(kind: &str) -> SnsEnvelope {
        SnsEnvelope {
            kind: kind.into(),
            message_id: "4d4dc071-ddbf-465d-bba8-08f81c89da64".into(),
            topic_arn: "arn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P".into(),
            message: "My Test Message".into(),
            timestamp: "2012-06-05T04:37:04.321Z".into(),
            subject: Some("My subject".into()),
            token: Some("tok".into()),
            subscribe_url: Some(
                "https://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription".into(),
            ),
            unsubscribe_url: None,
            signature_version: Some("1".into()),
            signature: None,
            signing_cert_url: None,
        }
    }

    #[test]
    fn notification_string_to_sign_matches_the_aws_example() {
        let s = string_to_sign(&envelope("Notification")).unwrap();
        assert_eq!(
            s,
            "Message\nMy Test Message\nMessageId\n4d4dc071-ddbf-465d-bba8-08f81c89da64\nSubject\nMy subject\nTimestamp\n2012-06-05T04:37:04.321Z\nTopicArn\narn:aws:sns:us-east-2:123456789012:s4-MySNSTopic-1G1WEFCOXTC0P\nType\nNotification\n"
        );
        let mut no_subject = envelope("Notification");
        no_subject.subject = None;
        assert!(!string_to_sign(&no_subject).unwrap().contains("Subject"));
    }

    #[test]
    fn confirmation_string_to_sign_has_url_and_token() {
        let s = string_to_sign(&envelope("SubscriptionConfirmation")).unwrap();
        assert!(s.starts_with("Message\nMy Test Message\nMessageId\n"));
        assert!(s.contains("\nSubscribeURL\nhttps://sns.us-east-2.amazonaws.com/?Action=ConfirmSubscription\nTimestamp\n"));
        assert!(s.contains("\nToken\ntok\nTopicArn\n"));
        assert!(!s.contains("Subject"));
        let mut missing = envelope("SubscriptionConfirmation");
        missing.token = None;
        assert!(string_to_sign(&missing).is_err());
    }

    #[test]
    fn old_and_future_messages_are_refused() {
        let max = std::time::Duration::from_secs(3900);
        let mut e = envelope("Notification");
        e.timestamp = chrono::Utc::now().to_rfc3339();
        assert!(SnsVerifier::check_age(&e, max).is_ok());
        e.timestamp = (chrono::Utc::now() - chrono::Duration::hours(2)).to_rfc3339();
        assert!(SnsVerifier::check_age(&e, max).is_err());
        e.timestamp = (chrono::Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
        assert!(SnsVerifier::check_age(&e, max).is_err());
    }

    #[test]
    fn host_pattern_accepts_only_sns_hosts() {
        let v = SnsVerifier::new(&SnsConfig::default(), reqwest::Client::new()).unwrap();
        for ok in [
            "https://sns.us-west-2.amazonaws.com/SimpleNotificationService-f3ecfb7224c7233fe7bb5f59f96de52f.pem",
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-x.pem",
        ] {
            assert!(v.checked_sns_url(ok, "SigningCertURL").is_ok(), "{ok}");
        }
        for bad in [
            "http://sns.us-west-2.amazonaws.com/x.pem",
            "https://sns.us-west-2.amazonaws.com.evil.com/x.pem",
            "https://evil.com/sns.us-west-2.amazonaws.com/x.pem",
            "https://user@sns.us-west-2.amazonaws.com/x.pem",
            "https://sns.us-west-2.amazonaws.com:8443/x.pem",
            "not a url",
        ] {
            assert!(v.checked_sns_url(bad, "SigningCertURL").is_err(), "{bad}");
        }
    }
}
