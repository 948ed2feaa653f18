//! SNS HTTP(S) subscriptions: `SubscriptionConfirmation`, `Notification` (possibly carrying an
//! EventBridge event as an escaped JSON string in `Message`), `UnsubscribeConfirmation`, and raw
//! message delivery.
//!
//! Bodies arrive as `text/plain` and are read as bytes whatever the Content-Type (a JSON-only
//! extractor would answer 415, which SNS treats as permanent: the message would be lost).
//! Signatures (versions 1 = SHA1, 2 = SHA256) are checked against the certificate at
//! `SigningCertURL`, whose origin must match the SNS host pattern *before* anything is fetched.
//! Subscriptions are confirmed only after the signature checked out, and only toward an SNS host.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Public};
use openssl::sign::Verifier;
use openssl::x509::X509;
use regex::Regex;
use serde::Deserialize;

use crate::config::SnsConfig;
use crate::ingress::landing::RecordKind;
use crate::ingress::{accepted, secret_matches, App, Incoming, IngressError};
use crate::source::Source;

/// Origins SNS signs and confirms from: `https://sns.<region>.amazonaws.com(.cn)`.
pub const DEFAULT_SNS_HOST_PATTERN: &str =
    r"^https://sns\.[a-zA-Z0-9-]{3,}\.amazonaws\.com(\.cn)?$";

const ENDPOINT: &str = "sns";
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

/// Checks signatures and confirms subscriptions; caches signing certificates by URL.
pub struct SnsVerifier {
    host_pattern: Regex,
    http: reqwest::Client,
    certs: Mutex<HashMap<String, Arc<PKey<Public>>>>,
}

impl SnsVerifier {
    pub fn new(cfg: &SnsConfig, http: reqwest::Client) -> anyhow::Result<Self> {
        Ok(SnsVerifier {
            host_pattern: Regex::new(&cfg.host_pattern).map_err(|e| {
                anyhow::anyhow!("HELIOS_SNS_HOST_PATTERN is not a valid regex: {e}")
            })?,
            http,
            certs: Mutex::new(HashMap::new()),
        })
    }

    /// Parses `url` and checks that its origin is an SNS host; nothing is fetched otherwise.
    pub fn checked_sns_url(&self, url: &str, what: &str) -> Result<reqwest::Url, IngressError> {
        let refuse = |why: &str| {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_url_not_allowed")
                .increment(1);
            IngressError::Forbidden(format!("{what} `{url}` {why}"))
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
                format!("SigningCertURL `{cert_url}` does not name a .pem certificate"),
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

    async fn certificate_key(&self, url: reqwest::Url) -> Result<Arc<PKey<Public>>, IngressError> {
        let key_str = url.as_str().to_string();
        if let Some(k) = self.lock().get(&key_str) {
            return Ok(k.clone());
        }
        let unavailable = |e: String| {
            IngressError::Unavailable(format!("cannot fetch the SNS signing certificate: {e}"))
        };
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        if !resp.status().is_success() {
            return Err(unavailable(format!("HTTP {}", resp.status())));
        }
        let pem = resp.bytes().await.map_err(|e| unavailable(e.to_string()))?;
        let key = X509::from_pem(&pem)
            .and_then(|c| c.public_key())
            .map_err(|e| {
                IngressError::Forbidden(format!(
                    "SigningCertURL does not hold a PEM certificate: {e}"
                ))
            })?;
        let key = Arc::new(key);
        let mut cache = self.lock();
        if cache.len() >= CERT_CACHE_MAX {
            cache.clear();
        }
        cache.insert(key_str, key.clone());
        Ok(key)
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

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<PKey<Public>>>> {
        self.certs.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `POST /api/v1/webhooks/aws/sns`
pub async fn handle(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    let result = process(&app, &inc, ENDPOINT).await;
    app.finish(Source::Aws, ENDPOINT, &inc, result)
}

fn check_topic(cfg: &SnsConfig, topic: Option<&str>) -> Result<(), IngressError> {
    if cfg.topic_arns.is_empty() {
        return Ok(());
    }
    match topic {
        Some(t) if cfg.topic_arns.iter().any(|a| a == t) => Ok(()),
        other => {
            metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_topic_not_allowed")
                .increment(1);
            Err(IngressError::Forbidden(format!(
                "SNS topic {} is not in HELIOS_SNS_TOPIC_ARNS",
                other.unwrap_or("(none)")
            )))
        }
    }
}

fn handshake_metric(kind: &'static str, topic: &str, outcome: &'static str) {
    metrics::counter!("helios_ingress_handshakes_total",
        "source" => "aws", "kind" => kind, "subscription" => topic.to_string(), "outcome" => outcome)
    .increment(1);
}

/// Handles an SNS delivery arriving at `endpoint` (the SNS one, or the EventBridge one).
pub async fn process(
    app: &App,
    inc: &Incoming,
    endpoint: &'static str,
) -> Result<Response, IngressError> {
    let body = inc.body()?;
    let cfg = &app.cfg.sns;
    if inc
        .header("x-amz-sns-rawdelivery")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        check_topic(cfg, inc.header("x-amz-sns-topic-arn"))?;
        match &cfg.raw_delivery_token {
            Some(expected) => {
                let presented = inc.query_param("token").unwrap_or_default();
                if !secret_matches(presented.as_bytes(), expected.as_bytes()) {
                    metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "sns_raw_token")
                        .increment(1);
                    return Err(IngressError::Unauthorized(
                        "SNS raw delivery needs the `token` query parameter (HELIOS_SNS_RAW_DELIVERY_TOKEN)".into(),
                    ));
                }
            }
            None if cfg.verify_signatures => {
                return Err(IngressError::Forbidden(
                    "SNS raw message delivery carries no signature: set HELIOS_SNS_RAW_DELIVERY_TOKEN and add ?token=<it> to the subscription endpoint".into(),
                ))
            }
            None => {}
        }
        app.land(Source::Aws, endpoint, inc, body, RecordKind::Event, false)
            .await?;
        return Ok(accepted(inc, StatusCode::OK));
    }

    let env: SnsEnvelope = serde_json::from_slice(body)
        .map_err(|e| IngressError::BadRequest(format!("body is not an SNS message: {e}")))?;
    let kind = SnsMessageType::parse(&env.kind).ok_or_else(|| {
        IngressError::BadRequest(format!(
            "SNS message Type `{}` is not Notification, SubscriptionConfirmation or UnsubscribeConfirmation",
            env.kind
        ))
    })?;
    if let Some(h) = inc.header("x-amz-sns-message-type") {
        if h != env.kind {
            return Err(IngressError::BadRequest(format!(
                "x-amz-sns-message-type `{h}` does not match the body's Type `{}`",
                env.kind
            )));
        }
    }
    let handshake_kind = match kind {
        SnsMessageType::SubscriptionConfirmation => Some("sns-subscription-confirmation"),
        SnsMessageType::UnsubscribeConfirmation => Some("sns-unsubscribe-confirmation"),
        SnsMessageType::Notification => None,
    };
    let metric_kind = match kind {
        SnsMessageType::SubscriptionConfirmation => "sns_subscription_confirmation",
        _ => "sns_unsubscribe_confirmation",
    };
    if let Err(e) = check_topic(cfg, Some(&env.topic_arn)) {
        if handshake_kind.is_some() {
            handshake_metric(metric_kind, &env.topic_arn, "refused");
        }
        return Err(e);
    }
    if cfg.verify_signatures {
        if let Err(e) = app.sns.verify(&env).await {
            if handshake_kind.is_some() {
                handshake_metric(metric_kind, &env.topic_arn, "refused");
            }
            return Err(e);
        }
    }
    if kind == SnsMessageType::SubscriptionConfirmation && cfg.auto_confirm {
        // Refuse a SubscribeURL off the SNS hosts before anything is landed or fetched.
        let url = env.subscribe_url.as_deref().unwrap_or_default();
        if let Err(e) = app.sns.checked_sns_url(url, "SubscribeURL") {
            handshake_metric(metric_kind, &env.topic_arn, "refused");
            return Err(e);
        }
    }
    match handshake_kind {
        None => {
            app.land(Source::Aws, endpoint, inc, body, RecordKind::Event, false)
                .await?;
            Ok(accepted(inc, StatusCode::OK))
        }
        Some(which) => {
            app.land(
                Source::Aws,
                endpoint,
                inc,
                body,
                RecordKind::Handshake(which),
                false,
            )
            .await?;
            if kind == SnsMessageType::SubscriptionConfirmation && cfg.auto_confirm {
                if let Err(e) = app.sns.confirm(&env).await {
                    handshake_metric(metric_kind, &env.topic_arn, "failed");
                    return Err(e);
                }
                handshake_metric(metric_kind, &env.topic_arn, "confirmed");
                tracing::info!(topic_arn = %env.topic_arn, "SNS subscription confirmed");
                return Ok((
                    StatusCode::OK,
                    Json(serde_json::json!({"status": "confirmed", "topic_arn": env.topic_arn, "request_id": inc.request_id})),
                )
                    .into_response());
            }
            handshake_metric(metric_kind, &env.topic_arn, "recorded");
            Ok((
                StatusCode::OK,
                Json(serde_json::json!({"status": "recorded", "type": env.kind, "topic_arn": env.topic_arn, "request_id": inc.request_id})),
            )
                .into_response())
        }
    }
}

// ---- normalization (processor side) ----------------------------------------------------------

use crate::model::draft::{generic_draft, json, single, str_field, Draft};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};

/// SNS `Message` (or a raw-delivery body) as a draft: an EventBridge event inside is unwrapped
/// (its own id and type win); a JSON object describes itself or takes its type from the
/// `eventType` message attribute or the Subject; plain text becomes `{"message": text}`.
fn message_draft(message: &str, message_id: Option<&str>, attr_type: Option<&str>) -> Draft {
    match serde_json::from_str::<serde_json::Value>(message) {
        Ok(inner) if super::eventbridge::is_envelope(&inner) => {
            super::eventbridge::envelope_draft(&inner)
        }
        Ok(inner) if inner.is_object() => {
            let mut d = generic_draft(&inner);
            if attr_type.is_some() {
                d.raw_type = attr_type.map(str::to_string);
            }
            d.event_id = message_id.map(str::to_string).or(d.event_id);
            d
        }
        _ => Draft {
            event_id: message_id.map(str::to_string),
            raw_type: attr_type.map(str::to_string),
            data: serde_json::json!({ "message": message }),
            ..Default::default()
        },
    }
}

/// Normalizes an SNS delivery (envelope or raw).
pub fn normalize(raw: &RawRecord) -> Normalized {
    if raw
        .header("x-amz-sns-rawdelivery")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    {
        let Ok(text) = std::str::from_utf8(&raw.value) else {
            return Normalized::Failed(NormalizeError::new(
                DlqReason::InvalidPayload,
                "raw SNS message is not UTF-8",
            ));
        };
        let mut d = message_draft(text, raw.header("x-amz-sns-message-id"), None);
        if d.event_id.is_none() {
            d.event_id = raw.header("x-amz-sns-message-id").map(str::to_string);
        }
        d.meta("sns_topic_arn", raw.header("x-amz-sns-topic-arn"));
        d.meta("sns_message_id", raw.header("x-amz-sns-message-id"));
        return single(Source::Aws, raw, Ok(d));
    }
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let draft = match str_field(&v, "Type") {
        Some("SubscriptionConfirmation") | Some("UnsubscribeConfirmation") => {
            return Normalized::Handshake
        }
        Some("Notification") => {
            let message = str_field(&v, "Message").unwrap_or("");
            let attr_type = v
                .get("MessageAttributes")
                .and_then(|a| a.get("eventType").or_else(|| a.get("event_type")))
                .and_then(|t| str_field(t, "Value"))
                .or_else(|| str_field(&v, "Subject"));
            let inner_is_eb = serde_json::from_str::<serde_json::Value>(message)
                .is_ok_and(|i| super::eventbridge::is_envelope(&i));
            // An EventBridge event inside keeps its own id (the same event may also arrive
            // directly through an API destination); anything else is identified by MessageId.
            let mut d = message_draft(
                message,
                (!inner_is_eb).then(|| str_field(&v, "MessageId")).flatten(),
                attr_type,
            );
            if d.occurred_at.is_none() {
                d.occurred_at = str_field(&v, "Timestamp").map(str::to_string);
            }
            d.meta("sns_topic_arn", str_field(&v, "TopicArn"));
            d.meta("sns_message_id", str_field(&v, "MessageId"));
            d.meta("sns_subject", str_field(&v, "Subject"));
            Ok(d)
        }
        other => Err(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            format!("SNS body Type is {other:?}, not Notification"),
        )),
    };
    single(Source::Aws, raw, draft)
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
    fn host_pattern_accepts_only_sns_hosts() {
        let cfg = crate::config::IngressConfig::new(
            crate::config::KafkaSettings::new("x:1"),
            crate::topology::Topology::builtin(),
        );
        let v = SnsVerifier::new(&cfg.sns, reqwest::Client::new()).unwrap();
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
