//! Validation: the business rules of topology.yaml (required payload fields per event type) and
//! the unknown-event-type policy. A failure names the reason and the field, for the DLQ headers.

use std::collections::{BTreeMap, HashSet};

use super::schema::SchemaSet;
use crate::model::{CanonicalEvent, DlqReason, DlqStage, Refusal};
use crate::topology::{Topology, UnknownEventTypePolicy};

/// Checks events against the topology's rules and the payload schemas.
#[derive(Debug, Clone)]
pub struct Validator {
    rules: BTreeMap<String, Vec<String>>,
    policy: UnknownEventTypePolicy,
    schemas: SchemaSet,
}

impl Validator {
    /// Rules only (no payload schemas).
    pub fn new(topology: &Topology) -> Self {
        Self::with_schemas(topology, SchemaSet::default())
    }

    /// Rules and payload schemas.
    pub fn with_schemas(topology: &Topology, schemas: SchemaSet) -> Self {
        Validator {
            rules: topology
                .event_types
                .iter()
                .map(|(k, v)| (k.clone(), v.required.clone()))
                .collect(),
            policy: topology.unknown_event_types,
            schemas,
        }
    }

    /// The writer's schema (subject, version) an event needs fetched before it can be checked.
    pub fn pending_schema(&self, e: &CanonicalEvent) -> Option<(String, u32)> {
        self.schemas.pending(e)
    }

    /// The registry's schema versions this validator reads, when it has a registry.
    pub fn writer_schemas(&self) -> Option<&std::sync::Arc<super::schema::WriterSchemas>> {
        self.schemas.writers()
    }

    /// True when the topology declares the type.
    pub fn is_known(&self, event_type: &str) -> bool {
        self.rules.contains_key(event_type)
    }

    /// Checks one event. `existing_topics` holds the broker's topics (for the unknown-type
    /// policy); `topic_of` names an event type's fan-out topic.
    pub fn check(
        &self,
        e: &CanonicalEvent,
        existing_topics: &HashSet<String>,
        topic_of: impl Fn(&str) -> String,
    ) -> Result<(), Refusal> {
        let Some(required) = self.rules.get(&e.event_type) else {
            let topic = topic_of(&e.event_type);
            return match self.policy {
                UnknownEventTypePolicy::FanOutIfTopicExists if existing_topics.contains(&topic) => Ok(()),
                policy => Err(Refusal::new(
                    DlqReason::UnknownEventType,
                    DlqStage::Route,
                    match policy {
                        UnknownEventTypePolicy::Dlq => format!(
                            "event type `{}` is not declared in topology.yaml (unknown_event_types: dlq)",
                            e.event_type
                        ),
                        _ => format!(
                            "event type `{}` is not declared in topology.yaml and topic `{topic}` does not exist",
                            e.event_type
                        ),
                    },
                )),
            };
        };
        for field in required {
            let present = match field.as_str() {
                "order_id" => e.order_id.is_some(),
                "customer_id" => e.customer_id.is_some(),
                f => match e.data.get(f) {
                    None | Some(serde_json::Value::Null) => false,
                    Some(serde_json::Value::String(s)) => !s.trim().is_empty(),
                    Some(_) => true,
                },
            };
            if !present {
                return Err(Refusal::new(
                    DlqReason::MissingRequiredField,
                    DlqStage::Validate,
                    format!("{} requires `{field}` (topology.yaml rule)", e.event_type),
                )
                .field(field.clone()));
            }
        }
        self.schemas.check(e).map_err(|v| Refusal {
            reason: DlqReason::SchemaViolation,
            stage: DlqStage::Validate,
            detail: v.detail,
            field: v.field,
            schema: Some(Box::new((v.subject, v.version))),
            sink_code: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, data: serde_json::Value) -> CanonicalEvent {
        crate::model::event::test_event(t, data)
    }

    #[test]
    fn original_rules() {
        let t = Topology::builtin();
        let v = Validator::new(&t);
        let none = HashSet::new();
        let topic = |x: &str| t.event_topic(x);
        assert!(v
            .check(
                &ev(
                    "OrderPlaced",
                    serde_json::json!({"order_id": "1", "customerId": "c"})
                ),
                &none,
                topic
            )
            .is_ok());
        let r = v
            .check(
                &ev("OrderPlaced", serde_json::json!({"order_id": "1"})),
                &none,
                topic,
            )
            .unwrap_err();
        assert_eq!(
            (r.reason, r.field.as_deref()),
            (DlqReason::MissingRequiredField, Some("customer_id"))
        );
        let r = v
            .check(
                &ev(
                    "PaymentProcessed",
                    serde_json::json!({"order_id": "1", "amount": null}),
                ),
                &none,
                topic,
            )
            .unwrap_err();
        assert_eq!(r.field.as_deref(), Some("amount"));
        assert!(v
            .check(
                &ev(
                    "PaymentProcessed",
                    serde_json::json!({"order_id": "1", "amount": 0})
                ),
                &none,
                topic
            )
            .is_ok());
        let r = v
            .check(
                &ev("InventoryReserved", serde_json::json!({})),
                &none,
                topic,
            )
            .unwrap_err();
        assert_eq!(r.field.as_deref(), Some("order_id"));
    }

    #[test]
    fn unknown_types_follow_the_policy() {
        let mut t = Topology::builtin();
        let v = Validator::new(&t);
        let e = ev("ShipmentSent", serde_json::json!({}));
        let topic = |x: &str| Topology::builtin().event_topic(x);
        let r = v.check(&e, &HashSet::new(), topic).unwrap_err();
        assert_eq!(
            (r.reason, r.stage),
            (DlqReason::UnknownEventType, DlqStage::Route)
        );
        let exists: HashSet<String> = ["helios.events.ShipmentSent".to_string()].into();
        assert!(v.check(&e, &exists, topic).is_ok());
        t.unknown_event_types = UnknownEventTypePolicy::Dlq;
        assert!(Validator::new(&t).check(&e, &exists, topic).is_err());
    }
}
