//! Avro schemas of the event payloads (`schemas/<EventType>.avsc`): each event's `data` must
//! resolve against its type's schema. A failure names the subject, the schema version and the
//! field, for the DLQ headers.

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use std::collections::HashMap;

use crate::model::CanonicalEvent;
use crate::topology::Topology;

/// Schemas shipped in the binary, used when no topology file (and so no schemas/ folder) is at hand.
const BUILTIN: &[(&str, &str)] = &[
    (
        "OrderPlaced",
        include_str!("../../schemas/OrderPlaced.avsc"),
    ),
    (
        "PaymentProcessed",
        include_str!("../../schemas/PaymentProcessed.avsc"),
    ),
    (
        "InventoryReserved",
        include_str!("../../schemas/InventoryReserved.avsc"),
    ),
];

/// The canonical event's own schema (Avro fan-out mode).
pub const CANONICAL_EVENT: &str = include_str!("../../schemas/CanonicalEvent.avsc");

/// One event type's payload schema.
#[derive(Debug, Clone)]
pub struct TypeSchema {
    pub schema: Schema,
    pub subject: String,
    pub version: String,
}

/// A payload that does not fit its schema.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaViolation {
    pub subject: String,
    pub version: String,
    pub field: Option<String>,
    pub detail: String,
}

/// The payload schemas by event type.
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    by_type: HashMap<String, TypeSchema>,
}

fn parse(text: &str, origin: &str, subject: String) -> anyhow::Result<TypeSchema> {
    let schema = Schema::parse_str(text)
        .map_err(|e| anyhow::anyhow!("{origin}: not a valid Avro schema: {e}"))?;
    if !matches!(schema, Schema::Record(_)) {
        anyhow::bail!("{origin}: a payload schema must be an Avro record");
    }
    let version = serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("helios.schema.version").map(|x| x.to_string()))
        .unwrap_or_else(|| "1".into());
    Ok(TypeSchema {
        schema,
        subject,
        version,
    })
}

impl SchemaSet {
    /// Loads the schema of each declared event type: its explicit `schema:` path (which must
    /// exist), else `schemas/<Type>.avsc` beside the topology file when present. Without a
    /// topology file (built-in topology), the schemas shipped in the binary.
    pub fn load(topology: &Topology) -> anyhow::Result<SchemaSet> {
        let mut by_type = HashMap::new();
        for (name, spec) in &topology.event_types {
            let subject = format!("{}-value", topology.event_topic(name));
            let (text, origin) = match (&topology.base_dir, &spec.schema) {
                (Some(base), Some(p)) => {
                    let path = base.join(p);
                    let text = std::fs::read_to_string(&path).map_err(|e| {
                        anyhow::anyhow!("event_types.{name}.schema {}: {e}", path.display())
                    })?;
                    (text, path.display().to_string())
                }
                (Some(base), None) => {
                    let path = base.join("schemas").join(format!("{name}.avsc"));
                    match std::fs::read_to_string(&path) {
                        Ok(t) => (t, path.display().to_string()),
                        Err(_) => continue,
                    }
                }
                (None, _) => match BUILTIN.iter().find(|(n, _)| n == name) {
                    Some((_, t)) => (t.to_string(), format!("built-in {name}.avsc")),
                    None => continue,
                },
            };
            by_type.insert(name.clone(), parse(&text, &origin, subject)?);
        }
        Ok(SchemaSet { by_type })
    }

    /// The schema of a type, if it has one.
    pub fn get(&self, event_type: &str) -> Option<&TypeSchema> {
        self.by_type.get(event_type)
    }

    /// Checks an event's payload against its type's schema (types without one pass).
    pub fn check(&self, e: &CanonicalEvent) -> Result<(), SchemaViolation> {
        let Some(ts) = self.by_type.get(&e.event_type) else {
            return Ok(());
        };
        let violation = |field: Option<String>, detail: String| SchemaViolation {
            subject: ts.subject.clone(),
            version: ts.version.clone(),
            field,
            detail,
        };
        let Schema::Record(record) = &ts.schema else {
            return Ok(());
        };
        let Some(obj) = e.data.as_object() else {
            return Err(violation(None, "the payload is not a JSON object".into()));
        };
        // Field by field, so the DLQ names the one at fault; fields the schema does not list
        // are allowed (schemas describe what they know, payloads may carry more).
        for f in &record.fields {
            let value = match obj.get(&f.name) {
                Some(v) => match AvroValue::try_from(v.clone()) {
                    Ok(v) => v,
                    Err(e) => {
                        return Err(violation(
                            Some(f.name.clone()),
                            format!("field `{}`: {e}", f.name),
                        ))
                    }
                },
                None if f.default.is_some() => continue,
                None => AvroValue::Null,
            };
            if let Err(err) = value.resolve(&f.schema) {
                let got = obj
                    .get(&f.name)
                    .map(|v| v.to_string())
                    .unwrap_or_else(|| "nothing".into());
                let got: String = got.chars().take(80).collect();
                return Err(violation(
                    Some(f.name.clone()),
                    format!(
                        "field `{}` does not match schema {} v{}: got {got} ({err})",
                        f.name, ts.subject, ts.version
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(t: &str, data: serde_json::Value) -> CanonicalEvent {
        crate::model::event::test_event(t, data)
    }

    #[test]
    fn builtin_schemas_accept_good_payloads_and_name_the_bad_field() {
        let s = SchemaSet::load(&Topology::builtin()).unwrap();
        let ok = ev(
            "OrderPlaced",
            serde_json::json!({"order_id": "O", "customer_id": "C", "amount": 10, "extra": {"x": 1},
            "items": [{"sku": "S", "qty": 2}]}),
        );
        assert_eq!(s.check(&ok), Ok(()));
        let bad = s
            .check(&ev(
                "PaymentProcessed",
                serde_json::json!({"order_id": "O", "amount": "ten"}),
            ))
            .unwrap_err();
        assert_eq!(bad.field.as_deref(), Some("amount"));
        assert_eq!(bad.subject, "helios.events.PaymentProcessed-value");
        assert_eq!(bad.version, "1");
        assert!(s
            .check(&ev("ShipmentSent", serde_json::json!({"anything": 1})))
            .is_ok());
        assert!(s.check(&ev("OrderPlaced", serde_json::json!([1]))).is_err());
    }

    #[test]
    fn repository_schemas_parse_including_the_canonical_event() {
        Schema::parse_str(CANONICAL_EVENT).unwrap();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let t = Topology::load(&dir.join("topology.yaml")).unwrap();
        let s = SchemaSet::load(&t).unwrap();
        for name in ["OrderPlaced", "PaymentProcessed", "InventoryReserved"] {
            assert!(s.get(name).is_some(), "{name}");
        }
    }
}
