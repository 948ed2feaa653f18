//! EventBridge API destinations: the event JSON (or an input transformer's output), no
//! signature; authenticity rests on the connection's API-key header or Basic credentials.
//! The endpoint also accepts SNS envelopes (an SNS subscription pointed at it).

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine;

use crate::config::EventBridgeAuth;
use crate::ingress::landing::RecordKind;
use crate::ingress::{accepted, check_json, secret_matches, App, Incoming, IngressError};
use crate::source::Source;

const ENDPOINT: &str = "eventbridge";

/// `POST /api/v1/webhooks/aws/eventbridge`
pub async fn handle(State(app): State<Arc<App>>, inc: Incoming) -> Response {
    if inc.headers.contains_key("x-amz-sns-message-type") {
        let result = super::sns::process(&app, &inc, ENDPOINT).await;
        return app.finish(Source::Aws, ENDPOINT, &inc, result);
    }
    let result = async {
        check_auth(&app.cfg.eventbridge, &inc)?;
        let body = inc.body()?;
        check_json(body)?;
        app.land(Source::Aws, ENDPOINT, &inc, body, RecordKind::Event, false)
            .await?;
        Ok(accepted(&inc, StatusCode::OK))
    }
    .await;
    app.finish(Source::Aws, ENDPOINT, &inc, result)
}

/// Accepts the request when no secret is configured, or when the API key header or the Basic
/// credentials match (compared in constant time).
pub fn check_auth(auth: &EventBridgeAuth, inc: &Incoming) -> Result<(), IngressError> {
    if auth.api_key.is_none() && auth.basic.is_none() {
        return Ok(());
    }
    if let Some(expected) = &auth.api_key {
        if let Some(presented) = inc.headers.get(auth.api_key_header.as_str()) {
            if secret_matches(presented.as_bytes(), expected.as_bytes()) {
                return Ok(());
            }
        }
    }
    if let Some((user, pass)) = &auth.basic {
        if let Some((u, p)) = basic_credentials(inc.header("authorization")) {
            // Evaluate both comparisons so timing does not reveal which one failed.
            let user_ok = secret_matches(u.as_bytes(), user.as_bytes());
            let pass_ok = secret_matches(p.as_bytes(), pass.as_bytes());
            if user_ok & pass_ok {
                return Ok(());
            }
        }
    }
    metrics::counter!("helios_ingress_auth_failures_total", "source" => "aws", "reason" => "eventbridge_credentials")
        .increment(1);
    Err(IngressError::Unauthorized(
        "missing or wrong EventBridge connection credentials (API key header or Basic)".into(),
    ))
}

fn basic_credentials(header: Option<&str>) -> Option<(String, String)> {
    let v = header?;
    let (scheme, rest) = v.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(rest.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (u, p) = text.split_once(':')?;
    Some((u.to_string(), p.to_string()))
}

// ---- normalization (processor side) ----------------------------------------------------------

use crate::model::draft::{generic_draft, json, single, str_field, Draft};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};

/// True when `v` has the EventBridge envelope's identifying keys.
pub fn is_envelope(v: &serde_json::Value) -> bool {
    v.get("detail-type").is_some() && v.get("id").is_some() && v.get("source").is_some()
}

/// The EventBridge envelope as a draft: `id`, `detail-type`, `time`, `detail`, and
/// account/region/source/resources as metadata.
pub fn envelope_draft(v: &serde_json::Value) -> Draft {
    let mut d = Draft {
        event_id: str_field(v, "id").map(str::to_string),
        raw_type: str_field(v, "detail-type").map(str::to_string),
        occurred_at: str_field(v, "time").map(str::to_string),
        data: v
            .get("detail")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
        ..Default::default()
    };
    d.meta("aws_account", str_field(v, "account"));
    d.meta("aws_region", str_field(v, "region"));
    d.meta("provider_source", str_field(v, "source"));
    d.meta("replay_name", str_field(v, "replay-name"));
    if let Some(r) = v
        .get("resources")
        .and_then(|r| r.as_array())
        .filter(|r| !r.is_empty())
    {
        d.meta(
            "aws_resources",
            Some(&serde_json::Value::Array(r.clone()).to_string()),
        );
    }
    d
}

/// A body delivered by an API destination: the envelope, or a self-describing event object
/// (input transformer output).
pub fn normalize(raw: &RawRecord) -> Normalized {
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let draft = if is_envelope(&v) {
        Ok(envelope_draft(&v))
    } else if v.is_object() {
        Ok(generic_draft(&v))
    } else {
        Err(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            "EventBridge body is neither an event envelope nor an event object",
        ))
    };
    single(Source::Aws, raw, draft)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_header_parsing() {
        let h = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("user:p:ss")
        );
        assert_eq!(
            basic_credentials(Some(&h)),
            Some(("user".into(), "p:ss".into()))
        );
        assert_eq!(basic_credentials(Some("Bearer abc")), None);
        assert_eq!(basic_credentials(Some("Basic !!!")), None);
        assert_eq!(basic_credentials(None), None);
    }
}
