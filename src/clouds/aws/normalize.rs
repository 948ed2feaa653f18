//! AWS normalization (processor side): pure functions from a raw record of `helios.raw.aws` to
//! canonical events. EventBridge envelopes keep their `id`/`detail-type`/`time`/`detail`; SNS
//! notifications carrying an EventBridge event keep the inner event's identity; other SNS
//! messages are identified by `MessageId` and typed by signed content only: the Message's own type,
//! else the Subject (`MessageAttributes` are not covered by the signature, so anyone holding a
//! genuine envelope could re-post it with another attribute: they never decide the type).

use crate::model::draft::{generic_draft, json, single, str_field, Draft};
use crate::model::headers::raw as h;
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};
use crate::source::Source;

/// Normalizes a raw record of the AWS topic: SNS when it came through SNS, else EventBridge.
pub fn normalize(raw: &RawRecord) -> Normalized {
    if raw.header("x-amz-sns-message-type").is_some() || raw.header(h::ENDPOINT) == Some("sns") {
        sns(raw)
    } else {
        eventbridge(raw)
    }
}

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
fn eventbridge(raw: &RawRecord) -> Normalized {
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

/// SNS `Message` (or a raw-delivery body) as a draft: an EventBridge event inside is unwrapped
/// (its own id and type win); a JSON object describes itself, else takes `fallback_type` (the
/// signed Subject); plain text becomes `{"message": text}`.
fn message_draft(message: &str, message_id: Option<&str>, fallback_type: Option<&str>) -> Draft {
    let attr_type = fallback_type;
    match serde_json::from_str::<serde_json::Value>(message) {
        Ok(inner) if is_envelope(&inner) => envelope_draft(&inner),
        Ok(inner) if inner.is_object() => {
            let mut d = generic_draft(&inner);
            if d.raw_type.is_none() {
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
fn sns(raw: &RawRecord) -> Normalized {
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
            // Signed fields only (see the module docs): never MessageAttributes.
            let attr_type = str_field(&v, "Subject");
            let inner_is_eb =
                serde_json::from_str::<serde_json::Value>(message).is_ok_and(|i| is_envelope(&i));
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
