//! GCP normalization (processor side): a Pub/Sub push, wrapped (`message.data` base64,
//! attributes, `messageId`, `publishTime`) or unwrapped (the published bytes, metadata in
//! `x-goog-pubsub-*` headers, each attribute a header of its own). The id is always Pub/Sub's
//! `messageId`; the type comes from the `eventType` attribute or the payload.

use base64::Engine;

use crate::model::draft::{generic_draft, json, single, str_field, Draft};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};
use crate::source::Source;

/// The published bytes as a draft: a JSON object describes itself (type from the `eventType`
/// attribute when present); anything else is kept as `{"data": text}`.
fn payload_draft(payload: &[u8], attr_type: Option<&str>) -> Result<Draft, NormalizeError> {
    let mut d = match serde_json::from_slice::<serde_json::Value>(payload) {
        Ok(v) if v.is_object() => generic_draft(&v),
        Ok(v) => Draft {
            data: serde_json::json!({ "data": v }),
            ..Default::default()
        },
        Err(_) => match std::str::from_utf8(payload) {
            Ok(text) => Draft {
                data: serde_json::json!({ "data": text }),
                ..Default::default()
            },
            Err(_) => {
                return Err(NormalizeError::new(
                    DlqReason::InvalidPayload,
                    "Pub/Sub message data is neither JSON nor UTF-8 text",
                ))
            }
        },
    };
    if let Some(t) = attr_type {
        d.raw_type = Some(t.to_string());
    }
    Ok(d)
}

/// Normalizes a Pub/Sub push, wrapped or unwrapped. The id is always Pub/Sub's `messageId`.
pub fn normalize(raw: &RawRecord) -> Normalized {
    if let Some(message_id) = raw.header("x-goog-pubsub-message-id") {
        let attr_type = raw.header("eventtype").or_else(|| raw.header("event_type"));
        let draft = payload_draft(&raw.value, attr_type).map(|mut d| {
            d.event_id = Some(message_id.to_string());
            if let Some(t) = raw.header("x-goog-pubsub-publish-time") {
                d.occurred_at.get_or_insert_with(|| t.to_string());
            }
            d.meta(
                "gcp_subscription",
                raw.header("x-goog-pubsub-subscription-name"),
            );
            d.meta("gcp_ordering_key", raw.header("x-goog-pubsub-ordering-key"));
            d.meta("schema_version", raw.header("schema_version"));
            d
        });
        return single(Source::Gcp, raw, draft);
    }
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let Some(m) = v.get("message").filter(|m| m.is_object()) else {
        return Normalized::Failed(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            "Pub/Sub body has no `message` object and no x-goog-pubsub-message-id header (unwrapped pushes need write-metadata)",
        ));
    };
    let data = match str_field(m, "data") {
        Some(b64) => match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(bytes) => bytes,
            Err(e) => {
                return Normalized::Failed(NormalizeError::new(
                    DlqReason::InvalidPayload,
                    format!("message.data is not base64: {e}"),
                ))
            }
        },
        None => b"{}".to_vec(),
    };
    let attrs = m.get("attributes");
    let attr_type =
        attrs.and_then(|a| str_field(a, "eventType").or_else(|| str_field(a, "event_type")));
    let draft = payload_draft(&data, attr_type).map(|mut d| {
        d.event_id = str_field(m, "messageId")
            .or_else(|| str_field(m, "message_id"))
            .map(str::to_string);
        let publish = str_field(m, "publishTime").or_else(|| str_field(m, "publish_time"));
        if d.occurred_at.is_none() {
            d.occurred_at = publish.map(str::to_string);
        }
        d.meta("gcp_subscription", str_field(&v, "subscription"));
        d.meta("gcp_ordering_key", str_field(m, "orderingKey"));
        d.meta("gcp_publish_time", publish);
        d.meta(
            "schema_version",
            attrs.and_then(|a| str_field(a, "schema_version")),
        );
        d.meta(
            "traceparent",
            attrs.and_then(|a| str_field(a, "googclient_traceparent")),
        );
        if let Some(obj) = attrs.and_then(|a| a.as_object()).filter(|o| !o.is_empty()) {
            d.meta(
                "gcp_attributes",
                Some(&serde_json::Value::Object(obj.clone()).to_string()),
            );
        }
        d
    });
    single(Source::Gcp, raw, draft)
}
