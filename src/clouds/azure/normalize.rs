//! Azure normalization (processor side): Event Grid schema arrays and CloudEvents (object or
//! batch). Event Grid ids are `id`; CloudEvents ids are unique per source only, so they become
//! `source#id`. Validation and deletion events inside a delivery count as handshakes.

use base64::Engine;

use crate::model::draft::{json, object_or_array, str_field, Draft};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};
use crate::source::Source;

/// Event type of the Event Grid schema validation handshake.
pub const VALIDATION_EVENT: &str = "Microsoft.EventGrid.SubscriptionValidationEvent";
/// Event type Event Grid sends when a subscription is deleted.
pub const DELETION_EVENT: &str = "Microsoft.EventGrid.SubscriptionDeletedEvent";

fn cloudevent_draft(e: &serde_json::Value) -> Draft {
    let source = str_field(e, "source");
    let id = str_field(e, "id");
    let data = match (e.get("data"), str_field(e, "data_base64")) {
        (Some(d), _) => d.clone(),
        (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| serde_json::json!({ "data_base64": b64 })),
            Err(_) => serde_json::json!({ "data_base64": b64 }),
        },
        (None, None) => serde_json::json!({}),
    };
    let mut d = Draft {
        // CloudEvents ids are unique per source only.
        event_id: match (source, id) {
            (Some(s), Some(i)) => Some(format!("{s}#{i}")),
            _ => None,
        },
        raw_type: str_field(e, "type").map(str::to_string),
        occurred_at: str_field(e, "time").map(str::to_string),
        data,
        ..Default::default()
    };
    d.meta("provider_source", source);
    d.meta("provider_event_id", id);
    d.meta("subject", str_field(e, "subject"));
    d.meta("dataschema", str_field(e, "dataschema"));
    d.meta("schema", Some("cloudevents"));
    d
}

fn eventgrid_draft(e: &serde_json::Value) -> Draft {
    let mut d = Draft {
        event_id: str_field(e, "id").map(str::to_string),
        raw_type: str_field(e, "eventType").map(str::to_string),
        occurred_at: str_field(e, "eventTime").map(str::to_string),
        data: e
            .get("data")
            .cloned()
            .unwrap_or_else(|| serde_json::json!({})),
        ..Default::default()
    };
    d.meta("azure_topic", str_field(e, "topic"));
    d.meta("subject", str_field(e, "subject"));
    d.meta("data_version", str_field(e, "dataVersion"));
    d.meta("schema", Some("eventgrid"));
    d
}

/// Normalizes an Event Grid delivery: Event Grid schema array, or CloudEvents object/array.
pub fn normalize(raw: &RawRecord) -> Normalized {
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let items = match object_or_array(&v, "Event Grid") {
        Ok(items) => items,
        Err(e) => return Normalized::Failed(e),
    };
    let subscription = raw.header("aeg-subscription-name");
    let mut out = vec![];
    let mut handshakes = 0;
    for (i, e) in items.iter().enumerate() {
        let i = i as u32;
        if !e.is_object() {
            out.push(Err(NormalizeError::new(
                DlqReason::UnrecognizedPayload,
                "array element is not an event object",
            )
            .at(i)));
            continue;
        }
        let eg_type = str_field(e, "eventType");
        if eg_type == Some(VALIDATION_EVENT) || eg_type == Some(DELETION_EVENT) {
            handshakes += 1;
            continue;
        }
        let mut d = if e.get("specversion").is_some() {
            cloudevent_draft(e)
        } else {
            eventgrid_draft(e)
        };
        d.meta("azure_subscription", subscription);
        out.push(d.finish(Source::Azure, raw, i));
    }
    if out.is_empty() && handshakes > 0 {
        return Normalized::Handshake;
    }
    if out.is_empty() {
        return Normalized::Failed(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            "Event Grid body holds no events",
        ));
    }
    Normalized::Events {
        events: out,
        handshakes,
    }
}
