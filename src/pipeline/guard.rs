//! Sink guards: cheap, pure checks that predict what a sink would refuse, so that such events go
//! to the DLQ from the plan and the sinks are never even asked. What the checks cannot predict
//! is still caught at the sink (see `pipeline::deliver`, which isolates the offending events);
//! these only keep the common cases off that slower path.
//!
//! - PostgreSQL's `jsonb` and `text` cannot hold the character U+0000 (`\u0000` in JSON):
//!   SQLSTATE 22P05 / 22021.
//! - A btree index row holds at most ~2,704 bytes (SQLSTATE 54000): `event_id` is in the primary
//!   key, `order_id` and `customer_id` are indexed generated columns. HELIOS caps each at
//!   [`MAX_ID_BYTES`], which also bounds the dedup keys kept in Redis.
//! - The generated columns read `order_id`/`orderId` as PostgreSQL's `->>` does; an object or an
//!   array there would be indexed as its JSON text while the fan-out key ignored it, so it is
//!   refused as an invalid payload.
//! - A fan-out record larger than the output limit (see [`crate::limits`]) is `too_large`.

use serde_json::Value;

use crate::limits::SizeLimits;
use crate::model::event::id_value;
use crate::model::{CanonicalEvent, DlqReason, DlqStage, Refusal};

/// Longest `event_id`, `order_id` or `customer_id` accepted, in bytes.
pub const MAX_ID_BYTES: usize = 1024;

/// Checks what PostgreSQL would refuse about `e`.
pub fn check_event(e: &CanonicalEvent) -> Result<(), Refusal> {
    check_id("event_id", &e.event_id)?;
    for (snake, camel) in [("order_id", "orderId"), ("customer_id", "customerId")] {
        match id_value(&e.data, snake, camel) {
            Some(v @ (Value::Object(_) | Value::Array(_))) => {
                let key = if e.data.get(snake).is_some_and(|x| !x.is_null()) {
                    snake
                } else {
                    camel
                };
                let kind = if v.is_object() {
                    "an object"
                } else {
                    "an array"
                };
                return Err(Refusal::new(
                    DlqReason::InvalidPayload,
                    DlqStage::Validate,
                    format!("`{key}` is {kind}; it must be a string or a number"),
                )
                .field(key));
            }
            Some(Value::String(s)) => check_id(snake, s)?,
            _ => {}
        }
    }
    if has_nul(&e.event_id) || has_nul(&e.event_type) {
        return Err(nul_refusal("the event id or type"));
    }
    if let Some(path) = nul_path(&e.data, "data") {
        return Err(nul_refusal(&path));
    }
    for (k, v) in &e.metadata {
        if has_nul(k) || has_nul(v) {
            return Err(nul_refusal(&format!("metadata.{}", bounded(k))));
        }
    }
    Ok(())
}

/// Checks a fan-out record's size (`payload` bytes plus key and headers) against the limit.
pub fn check_fanout_size(
    payload: usize,
    key_and_headers: usize,
    limits: &SizeLimits,
) -> Result<(), Refusal> {
    let size = payload + key_and_headers;
    let max = limits.output_record_max();
    if size <= max {
        return Ok(());
    }
    Err(Refusal::new(
        DlqReason::TooLarge,
        DlqStage::Fanout,
        format!(
            "the fan-out record would be {size} bytes; records are limited to {max} (derived from HELIOS_MAX_BODY_BYTES={})",
            limits.max_body_bytes
        ),
    )
    .sink_code("MSG_SIZE_TOO_LARGE"))
}

fn check_id(field: &str, value: &str) -> Result<(), Refusal> {
    if value.len() <= MAX_ID_BYTES {
        return Ok(());
    }
    Err(Refusal::new(
        DlqReason::SinkRejected,
        DlqStage::Store,
        format!(
            "`{field}` is {} bytes; at most {MAX_ID_BYTES} are accepted (PostgreSQL's index rows hold ~2,700 bytes)",
            value.len()
        ),
    )
    .field(field)
    .sink_code("54000"))
}

fn nul_refusal(place: &str) -> Refusal {
    Refusal::new(
        DlqReason::SinkRejected,
        DlqStage::Store,
        format!("{place} contains the character U+0000 (\\u0000), which PostgreSQL cannot store"),
    )
    .sink_code("22P05")
}

fn has_nul(s: &str) -> bool {
    s.as_bytes().contains(&0)
}

/// The path of the first string (or key) holding U+0000, if any.
fn nul_path(v: &Value, at: &str) -> Option<String> {
    match v {
        Value::String(s) => has_nul(s).then(|| at.to_string()),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_path(x, &format!("{at}[{i}]"))),
        Value::Object(m) => m.iter().find_map(|(k, x)| {
            if has_nul(k) {
                Some(format!("a key of {at}"))
            } else {
                nul_path(x, &format!("{at}.{}", bounded(k)))
            }
        }),
        _ => None,
    }
}

/// A name echoed into a message, cut to a readable length.
fn bounded(s: &str) -> &str {
    let mut end = s.len().min(64);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::event::test_event;
    use serde_json::json;

    #[test]
    fn nul_anywhere_in_the_payload_is_refused_with_its_path() {
        let e = test_event("OrderPlaced", json!({"a": {"b": ["x", "y\u{0}z"]}}));
        let r = check_event(&e).unwrap_err();
        assert_eq!(r.reason, DlqReason::SinkRejected);
        assert!(r.detail.contains("data.a.b[1]"), "{}", r.detail);
        let mut e = test_event("OrderPlaced", json!({}));
        e.metadata.insert("subject".into(), "s\u{0}".into());
        assert!(check_event(&e).is_err());
        assert!(check_event(&test_event("OrderPlaced", json!({"a": "fine"}))).is_ok());
    }

    #[test]
    fn ids_are_bounded_and_must_be_scalars() {
        let mut e = test_event("OrderPlaced", json!({}));
        e.event_id = "x".repeat(3200);
        assert_eq!(
            check_event(&e).unwrap_err().field.as_deref(),
            Some("event_id")
        );
        let e = test_event("OrderPlaced", json!({"order_id": "o".repeat(3200)}));
        assert_eq!(
            check_event(&e).unwrap_err().sink_code.as_deref(),
            Some("54000")
        );
        let e = test_event("OrderPlaced", json!({"orderId": {"nested": 1}}));
        let r = check_event(&e).unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (DlqReason::InvalidPayload, Some("orderId"))
        );
        // A null order_id falls through to orderId, as PostgreSQL's coalesce does.
        let e = test_event("OrderPlaced", json!({"order_id": null, "orderId": [1]}));
        assert!(check_event(&e).is_err());
    }

    #[test]
    fn fan_out_size_follows_the_limit() {
        let l = SizeLimits::default();
        assert!(check_fanout_size(1000, 100, &l).is_ok());
        let r = check_fanout_size(l.output_record_max(), 1, &l).unwrap_err();
        assert_eq!(r.reason, DlqReason::TooLarge);
    }
}
