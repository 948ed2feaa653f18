//! The drafts normalization builds: the cloud-independent parts of an event (id, type, time,
//! payload, metadata) that each cloud's envelope reader fills in, and the small JSON helpers
//! they share. Pure functions, no I/O.

use std::collections::BTreeMap;

use serde_json::Value;

use super::event::{id_field, normalize_type, parse_time, CanonicalEvent};
use super::outcome::{DlqReason, NormalizeError, Normalized};
use super::raw::RawRecord;
use crate::source::Source;

/// The cloud-independent parts of an event, before lineage and type normalization.
#[derive(Debug, Clone, Default)]
pub struct Draft {
    pub event_id: Option<String>,
    pub raw_type: Option<String>,
    pub occurred_at: Option<String>,
    pub data: Value,
    pub metadata: BTreeMap<String, String>,
}

impl Draft {
    /// Adds a metadata entry when the value is a non-empty string.
    pub fn meta(&mut self, key: &str, value: Option<&str>) {
        if let Some(v) = value.filter(|v| !v.is_empty()) {
            self.metadata.insert(key.to_string(), v.to_string());
        }
    }

    /// Completes the draft into a canonical event of `source` from the `index`-th slot of `raw`.
    pub fn finish(
        self,
        source: Source,
        raw: &RawRecord,
        index: u32,
    ) -> Result<CanonicalEvent, NormalizeError> {
        let event_id = self
            .event_id
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                NormalizeError::new(DlqReason::MissingEventId, "the event has no id").at(index)
            })?;
        let raw_type = self
            .raw_type
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| {
                NormalizeError::new(DlqReason::MissingEventType, "the event has no type").at(index)
            })?;
        let event_type = normalize_type(&raw_type).ok_or_else(|| {
            NormalizeError::new(
                DlqReason::MissingEventType,
                format!("event type `{raw_type}` gives no usable type name"),
            )
            .at(index)
        })?;
        let received = raw.received_at();
        let occurred_at = self
            .occurred_at
            .as_deref()
            .and_then(parse_time)
            .unwrap_or(received);
        let mut metadata = self.metadata;
        trace_context(&mut metadata, raw);
        if raw_type != event_type {
            metadata.insert("provider_type".into(), raw_type);
        }
        Ok(CanonicalEvent {
            order_id: id_field(&self.data, "order_id", "orderId"),
            customer_id: id_field(&self.data, "customer_id", "customerId"),
            event_id,
            event_type,
            source,
            occurred_at,
            ingested_at: received,
            data: self.data,
            metadata,
            raw: raw.raw_ref(index),
        })
    }
}

/// Keeps the W3C trace context of the delivery as `metadata.traceparent` (the fan-out record
/// carries it on): from the payload (a Pub/Sub `googclient_traceparent` attribute, set by the
/// cloud's normalizer), else from the raw record's headers (the request's `traceparent`, a
/// CloudEvents binary-mode `ce-traceparent`, an unwrapped Pub/Sub attribute). Anything that is not
/// a valid version-00 `traceparent` is dropped.
fn trace_context(metadata: &mut std::collections::BTreeMap<String, String>, raw: &RawRecord) {
    let found = metadata.get("traceparent").cloned().or_else(|| {
        ["traceparent", "ce-traceparent", "googclient_traceparent"]
            .iter()
            .find_map(|h| raw.header(h).map(str::to_string))
    });
    match found.filter(|t| valid_traceparent(t)) {
        Some(t) => {
            metadata.insert("traceparent".into(), t);
        }
        None => {
            metadata.remove("traceparent");
        }
    }
}

/// `00-<32 hex trace id, not all 0>-<16 hex parent id, not all 0>-<2 hex flags>`.
pub fn valid_traceparent(t: &str) -> bool {
    let p: Vec<&str> = t.split('-').collect();
    let hex = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    p.len() == 4
        && p[0] == "00"
        && hex(p[1], 32)
        && hex(p[2], 16)
        && hex(p[3], 2)
        && p[1].bytes().any(|b| b != b'0')
        && p[2].bytes().any(|b| b != b'0')
}

/// A string field of a JSON object.
pub fn str_field<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

/// A self-describing event object (`event_type`/`eventType`/`type`, `event_id`/`id`,
/// `occurred_at`/`time`, payload in `data`/`detail`/`payload` or the object itself).
pub fn generic_draft(v: &Value) -> Draft {
    let mut d = Draft {
        event_id: ["event_id", "eventId", "id"]
            .iter()
            .find_map(|k| v.get(*k))
            .and_then(|x| match x {
                Value::String(s) => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            }),
        raw_type: ["event_type", "eventType", "type", "detail-type"]
            .iter()
            .find_map(|k| str_field(v, k))
            .map(str::to_string),
        occurred_at: ["occurred_at", "occurredAt", "time", "timestamp"]
            .iter()
            .find_map(|k| str_field(v, k))
            .map(str::to_string),
        ..Default::default()
    };
    d.data = ["data", "detail", "payload"]
        .iter()
        .find_map(|k| v.get(*k).filter(|x| x.is_object()))
        .cloned()
        .unwrap_or_else(|| v.clone());
    // The writer's schema version, when the envelope says it (see `pipeline::schema`).
    let version = v.get("schema_version").and_then(|x| match x {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    });
    d.meta("schema_version", version.as_deref());
    d.meta("dataschema", str_field(v, "dataschema"));
    d
}

/// Parses JSON, mapping failure to `invalid_json`.
pub fn json(bytes: &[u8]) -> Result<Value, NormalizeError> {
    serde_json::from_slice(bytes).map_err(|e| {
        NormalizeError::new(
            DlqReason::InvalidJson,
            format!("body is not valid JSON: {e}"),
        )
    })
}

/// The events of a body that holds one event object or an array of them (Event Grid,
/// CloudEvents batches, direct ingestion); `what` names the body in the error.
pub fn object_or_array<'a>(v: &'a Value, what: &str) -> Result<Vec<&'a Value>, NormalizeError> {
    match v {
        Value::Array(a) => Ok(a.iter().collect()),
        Value::Object(_) => Ok(vec![v]),
        _ => Err(NormalizeError::new(
            DlqReason::UnrecognizedPayload,
            format!("{what} body is neither an event object nor an array of them"),
        )),
    }
}

/// Wraps a single draft result as the record's outcome.
pub fn single(source: Source, raw: &RawRecord, d: Result<Draft, NormalizeError>) -> Normalized {
    match d {
        Ok(d) => Normalized::events(vec![d.finish(source, raw, 0)]),
        Err(e) => Normalized::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::valid_traceparent;

    #[test]
    fn only_valid_version_00_traceparents_are_kept() {
        assert!(valid_traceparent(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        ));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(!valid_traceparent(bad), "{bad}");
        }
    }
}
