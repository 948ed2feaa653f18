//! The canonical event: what every cloud's push becomes, whatever its envelope.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::source::Source;

/// Where a canonical event came from: the raw record (and the event's index inside it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct RawRef {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Position of the event inside the raw record (arrays carry several).
    pub index: u32,
}

impl RawRef {
    /// `topic/partition/offset/index`: the owner value of a dedup mark.
    pub fn owner(&self) -> String {
        format!(
            "{}/{}/{}/{}",
            self.topic, self.partition, self.offset, self.index
        )
    }
}

/// One business event, normalized.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CanonicalEvent {
    /// The provider's id (EventBridge `id`, SNS `MessageId` or the inner event's id, Pub/Sub
    /// `messageId`, Event Grid `id`, CloudEvents `source#id`).
    pub event_id: String,
    /// Normalized type name (`Contoso.Orders.OrderPlaced` → `OrderPlaced`).
    pub event_type: String,
    pub source: Source,
    pub occurred_at: DateTime<Utc>,
    pub ingested_at: DateTime<Utc>,
    pub order_id: Option<String>,
    pub customer_id: Option<String>,
    /// The business payload.
    pub data: serde_json::Value,
    /// Cloud metadata: account/region, project/subscription, topic/subject, provider type/source.
    pub metadata: BTreeMap<String, String>,
    pub raw: RawRef,
}

impl CanonicalEvent {
    /// The Kafka key on the fan-out topic: the order id when present, else the event id.
    pub fn partition_key(&self) -> &str {
        self.order_id.as_deref().unwrap_or(&self.event_id)
    }
}

/// `Contoso.Orders.OrderPlaced` → `OrderPlaced`; `EC2 Instance State-change Notification` →
/// `EC2InstanceStateChangeNotification`; `order.created` → `Created`. The last dot-separated
/// segment, with every other character that is not a letter or digit starting a new word.
pub fn normalize_type(raw: &str) -> Option<String> {
    let last = raw.trim().rsplit('.').next().unwrap_or("");
    let mut out = String::with_capacity(last.len());
    let mut new_word = true;
    for c in last.chars() {
        if c.is_ascii_alphanumeric() {
            if new_word {
                out.extend(c.to_uppercase());
            } else {
                out.push(c);
            }
            new_word = false;
        } else {
            new_word = true;
        }
    }
    let starts_ok = out.chars().next().is_some_and(|c| c.is_ascii_alphabetic());
    (starts_ok && out.len() <= 200).then_some(out)
}

/// `order_id` / `orderId` (or `customer_id` / `customerId`) at the top of the payload, as text:
/// the first of the two that is present and not null, as PostgreSQL's generated columns compute
/// it (`coalesce(data->>'order_id', data->>'orderId')`). Objects and arrays give `None` here;
/// the processor refuses them before they reach PostgreSQL (see `pipeline::guard`).
pub fn id_field(data: &serde_json::Value, snake: &str, camel: &str) -> Option<String> {
    match id_value(data, snake, camel)? {
        serde_json::Value::String(s) if !s.is_empty() => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The JSON value `id_field` reads: `snake` unless absent or null, else `camel`.
pub fn id_value<'a>(
    data: &'a serde_json::Value,
    snake: &str,
    camel: &str,
) -> Option<&'a serde_json::Value> {
    let present = |k: &str| data.get(k).filter(|v| !v.is_null());
    present(snake).or_else(|| present(camel))
}

/// Parses an RFC 3339 time (any offset) into UTC.
pub fn parse_time(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s.trim())
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// A direct event of `event_type` with `data` (ids derived as normalization would), for unit tests.
#[cfg(test)]
pub fn test_event(event_type: &str, data: serde_json::Value) -> CanonicalEvent {
    CanonicalEvent {
        event_id: "e".into(),
        event_type: event_type.into(),
        source: Source::Direct,
        occurred_at: chrono::Utc::now(),
        ingested_at: chrono::Utc::now(),
        order_id: id_field(&data, "order_id", "orderId"),
        customer_id: id_field(&data, "customer_id", "customerId"),
        data,
        metadata: Default::default(),
        raw: RawRef {
            topic: "t".into(),
            partition: 0,
            offset: 0,
            index: 0,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn type_names_normalize() {
        assert_eq!(
            normalize_type("Contoso.Orders.OrderPlaced").as_deref(),
            Some("OrderPlaced")
        );
        assert_eq!(
            normalize_type("OrderPlaced").as_deref(),
            Some("OrderPlaced")
        );
        assert_eq!(
            normalize_type("EC2 Instance State-change Notification").as_deref(),
            Some("EC2InstanceStateChangeNotification")
        );
        assert_eq!(
            normalize_type("com.yourcompany.order.created").as_deref(),
            Some("Created")
        );
        assert_eq!(
            normalize_type("payment_processed").as_deref(),
            Some("PaymentProcessed")
        );
        assert_eq!(normalize_type(""), None);
        assert_eq!(normalize_type("a.b."), None);
        assert_eq!(normalize_type("123"), None);
    }

    #[test]
    fn id_fields_accept_both_spellings() {
        let d = serde_json::json!({"orderId": "O-1", "customer_id": 42});
        assert_eq!(id_field(&d, "order_id", "orderId").as_deref(), Some("O-1"));
        assert_eq!(
            id_field(&d, "customer_id", "customerId").as_deref(),
            Some("42")
        );
        assert_eq!(
            id_field(&serde_json::json!({"order_id": ""}), "order_id", "orderId"),
            None
        );
    }
}
