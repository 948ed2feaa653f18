//! Avro schemas of the event payloads (`schemas/<EventType>.avsc`): each event's `data` must
//! resolve against its type's schema. A failure names the subject, the schema version and the
//! field, for the DLQ headers.
//!
//! A payload schema's subject is its record's full name (`io.helios.events.OrderPlaced`, the
//! registry's RecordNameStrategy): the fan-out topics' `-value` subjects hold the canonical
//! event in Avro mode, a different schema. An event may say which version it was written with
//! ([`writer_version`]); with a registry, it is validated against that version
//! ([`WriterSchemas`]), so producers on an older schema keep working during a rollout.

pub mod compat;
pub mod registry;
mod writers;

pub use writers::{Lookup, WriterSchemas};

use apache_avro::types::Value as AvroValue;
use apache_avro::Schema;
use std::collections::HashMap;

use crate::model::CanonicalEvent;
use crate::topology::Topology;

/// Schemas shipped in the binary, used when no topology file (and so no schemas/ folder) is at hand.
const BUILTIN: &[(&str, &str)] = &[
    (
        "OrderPlaced",
        include_str!("../../../schemas/OrderPlaced.avsc"),
    ),
    (
        "PaymentProcessed",
        include_str!("../../../schemas/PaymentProcessed.avsc"),
    ),
    (
        "InventoryReserved",
        include_str!("../../../schemas/InventoryReserved.avsc"),
    ),
];

/// The canonical event's own schema (Avro fan-out mode).
pub const CANONICAL_EVENT: &str = include_str!("../../../schemas/CanonicalEvent.avsc");

/// One event type's payload schema (a local file, or a version fetched from the registry).
#[derive(Debug, Clone)]
pub struct TypeSchema {
    pub schema: Schema,
    /// The registry subject: the record's full name.
    pub subject: String,
    pub version: String,
    /// The schema as written (what `helios schemas register` sends).
    pub text: String,
    /// Where it came from (a path, `built-in ...`, or `registry`).
    pub origin: String,
}

/// A payload that does not fit its schema.
#[derive(Debug, Clone, PartialEq)]
pub struct SchemaViolation {
    pub subject: String,
    pub version: String,
    pub field: Option<String>,
    pub detail: String,
}

/// The payload schemas by event type, and the registry's older versions when one is set.
#[derive(Debug, Clone, Default)]
pub struct SchemaSet {
    by_type: HashMap<String, TypeSchema>,
    writers: Option<std::sync::Arc<WriterSchemas>>,
}

/// Parses a payload schema; `version` overrides the file's `helios.schema.version` (a
/// registry version).
pub fn parse(text: &str, origin: &str, version: Option<u32>) -> anyhow::Result<TypeSchema> {
    let schema = Schema::parse_str(text)
        .map_err(|e| anyhow::anyhow!("{origin}: not a valid Avro schema: {e}"))?;
    let Schema::Record(r) = &schema else {
        anyhow::bail!("{origin}: a payload schema must be an Avro record");
    };
    let subject = r.name.fullname(None);
    let version = version
        .or_else(|| file_version(text))
        .unwrap_or(1)
        .to_string();
    Ok(TypeSchema {
        subject,
        version,
        text: text.to_string(),
        origin: origin.to_string(),
        schema,
    })
}

/// The file's own `helios.schema.version` (a positive integer, or digits in a string).
pub fn file_version(text: &str) -> Option<u32> {
    let v = serde_json::from_str::<serde_json::Value>(text).ok()?;
    positive(v.get("helios.schema.version")?)
}

fn positive(v: &serde_json::Value) -> Option<u32> {
    match v {
        serde_json::Value::Number(n) => n.as_u64().and_then(|n| u32::try_from(n).ok()),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|n| *n > 0)
}

/// The schema version an event says it was written with, from what its cloud carries:
/// `schema_version` (direct ingestion's envelope, a Pub/Sub attribute), a CloudEvents
/// `dataschema` ending in `/versions/<n>` (the registry's own URL form), or an Event Grid
/// `dataVersion` of `<n>` or `<n>.0`. Anything else: no version (the current schema applies).
pub fn writer_version(e: &CanonicalEvent) -> Option<u32> {
    let m = &e.metadata;
    if let Some(v) = m.get("schema_version") {
        return positive(&serde_json::Value::String(v.clone()));
    }
    if let Some(u) = m.get("dataschema") {
        let mut parts = u.trim_end_matches('/').rsplit('/');
        let (n, versions) = (parts.next(), parts.next());
        return match (versions, n) {
            (Some("versions"), Some(n)) => n.parse().ok().filter(|n| *n > 0),
            _ => None,
        };
    }
    let v = m.get("data_version")?;
    let v = v.strip_suffix(".0").unwrap_or(v);
    v.parse().ok().filter(|n| *n > 0)
}

impl SchemaSet {
    /// Loads the schema of each declared event type: its explicit `schema:` path (which must
    /// exist), else `schemas/<Type>.avsc` beside the topology file when present. Without a
    /// topology file (built-in topology), the schemas shipped in the binary.
    pub fn load(topology: &Topology) -> anyhow::Result<SchemaSet> {
        let mut by_type = HashMap::new();
        for (name, spec) in &topology.event_types {
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
            by_type.insert(name.clone(), parse(&text, &origin, None)?);
        }
        let mut subjects: HashMap<&str, &str> = HashMap::new();
        for (name, ts) in &by_type {
            if let Some(other) = subjects.insert(&ts.subject, name) {
                anyhow::bail!(
                    "event types `{other}` and `{name}` have schemas with the same record name `{}` (the registry subject): give each its own name",
                    ts.subject
                );
            }
        }
        Ok(SchemaSet {
            by_type,
            writers: None,
        })
    }

    /// Validates events against the version they say they were written with, fetched from
    /// this registry (the current schema when they say none).
    pub fn with_writers(mut self, writers: std::sync::Arc<WriterSchemas>) -> SchemaSet {
        self.writers = Some(writers);
        self
    }

    /// The registry's versions, when set.
    pub fn writers(&self) -> Option<&std::sync::Arc<WriterSchemas>> {
        self.writers.as_ref()
    }

    /// The schema of a type, if it has one.
    pub fn get(&self, event_type: &str) -> Option<&TypeSchema> {
        self.by_type.get(event_type)
    }

    /// Every type's schema, by type name.
    pub fn iter(&self) -> impl Iterator<Item = (&String, &TypeSchema)> {
        self.by_type.iter()
    }

    /// The (subject, version) an event needs fetched from the registry before it can be
    /// checked; `None` when it can be checked now.
    pub fn pending(&self, e: &CanonicalEvent) -> Option<(String, u32)> {
        let current = self.by_type.get(&e.event_type)?;
        let writers = self.writers.as_ref()?;
        let v = writer_version(e).filter(|v| v.to_string() != current.version)?;
        match writers.lookup(&current.subject, v) {
            Lookup::Pending => Some((current.subject.clone(), v)),
            _ => None,
        }
    }

    /// Checks an event's payload against its type's schema (types without one pass).
    ///
    /// The schema is the version the event says it was written with when a registry is set
    /// and has it, else the current one. A version the registry does not have is a violation
    /// (curable: register it, and `dlq heal` takes the event again).
    pub fn check(&self, e: &CanonicalEvent) -> Result<(), SchemaViolation> {
        let Some(current) = self.by_type.get(&e.event_type) else {
            return Ok(());
        };
        let declared = writer_version(e).filter(|v| v.to_string() != current.version);
        let fetched;
        let ts = match (declared, &self.writers) {
            (Some(v), Some(w)) => match w.lookup(&current.subject, v) {
                Lookup::Found(ts) => {
                    fetched = ts;
                    &*fetched
                }
                Lookup::Unusable(why) => {
                    return Err(SchemaViolation {
                        subject: current.subject.clone(),
                        version: v.to_string(),
                        field: None,
                        detail: why,
                    })
                }
                Lookup::NotRegistered | Lookup::Pending => {
                    return Err(SchemaViolation {
                        subject: current.subject.clone(),
                        version: v.to_string(),
                        field: None,
                        detail: format!(
                            "the event says it was written with version {v} of {}, which the schema registry does not have (register it; `helios dlq heal` then takes the event again)",
                            current.subject
                        ),
                    })
                }
            },
            _ => current,
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
        assert_eq!(bad.subject, "io.helios.events.PaymentProcessed");
        assert_eq!(bad.version, "1");
        assert!(s
            .check(&ev("ShipmentSent", serde_json::json!({"anything": 1})))
            .is_ok());
        assert!(s.check(&ev("OrderPlaced", serde_json::json!([1]))).is_err());
    }

    #[test]
    fn the_writer_version_comes_from_what_each_cloud_carries() {
        let with = |k: &str, v: &str| {
            let mut e = ev("OrderPlaced", serde_json::json!({}));
            e.metadata.insert(k.into(), v.into());
            writer_version(&e)
        };
        assert_eq!(with("schema_version", "2"), Some(2));
        assert_eq!(with("schema_version", " 3 "), Some(3));
        assert_eq!(with("schema_version", "0"), None);
        assert_eq!(with("schema_version", "v2"), None);
        assert_eq!(
            with(
                "dataschema",
                "https://registry:8081/subjects/io.helios.events.OrderPlaced/versions/4"
            ),
            Some(4)
        );
        assert_eq!(
            with("dataschema", "https://example.com/schemas/order.json"),
            None
        );
        assert_eq!(with("data_version", "1.0"), Some(1));
        assert_eq!(with("data_version", "2"), Some(2));
        assert_eq!(with("data_version", "2.1"), None);
        assert_eq!(
            writer_version(&ev("OrderPlaced", serde_json::json!({}))),
            None
        );
    }

    #[test]
    fn subjects_are_record_names_and_two_types_may_not_share_one() {
        let s = SchemaSet::load(&Topology::builtin()).unwrap();
        assert_eq!(
            s.get("OrderPlaced").unwrap().subject,
            "io.helios.events.OrderPlaced"
        );
        let dir = std::env::temp_dir().join(format!("helios-schema-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("schemas")).unwrap();
        let same = r#"{"type": "record", "name": "Same", "fields": []}"#;
        for t in ["OrderPlaced", "PaymentProcessed"] {
            std::fs::write(dir.join(format!("schemas/{t}.avsc")), same).unwrap();
        }
        let mut t = Topology::builtin();
        t.base_dir = Some(dir.clone());
        let err = SchemaSet::load(&t).unwrap_err().to_string();
        assert!(err.contains("same record name `Same`"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn without_a_registry_a_declared_version_is_checked_against_the_current_schema() {
        let s = SchemaSet::load(&Topology::builtin()).unwrap();
        let mut e = ev(
            "PaymentProcessed",
            serde_json::json!({"order_id": "O", "amount": "x"}),
        );
        e.metadata.insert("schema_version".into(), "7".into());
        assert_eq!(s.pending(&e), None);
        assert_eq!(s.check(&e).unwrap_err().version, "1");
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
