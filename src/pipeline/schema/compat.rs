//! What a schema change breaks, field by field, and for whom: the explanation `helios schemas
//! check` prints beside the registry's verdict. Pure; Avro's resolution rules
//! ([`SchemaCompatibility::can_read`]) decide each field's type change.
//!
//! Two directions, as the registry's modes name them:
//! - **backward** (BACKWARD, FULL): consumers on the *new* schema read events written with an
//!   old one. An added field without a default breaks them (old events lack it).
//! - **forward** (FORWARD, FULL): consumers still on an *old* schema read events written with
//!   the new one. A removed field the old schema has no default for breaks them.

use apache_avro::schema::RecordSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::Schema;

/// Who a break hurts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Whom {
    /// Consumers (and HELIOS's validation) on the new schema, reading events written with an
    /// old version.
    NewReaders,
    /// Consumers still on an old version, reading events written with the new schema.
    OldReaders,
}

/// One incompatibility, for one field (or the record as a whole: `field` is `None`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Break {
    pub field: Option<String>,
    pub against: u32,
    pub whom: Whom,
    pub detail: String,
}

fn short(s: &Schema) -> String {
    let c = s.canonical_form();
    if c.len() > 80 {
        format!("{}…", c.chars().take(80).collect::<String>())
    } else {
        c
    }
}

fn record(s: &Schema) -> Option<&RecordSchema> {
    match s {
        Schema::Record(r) => Some(r),
        _ => None,
    }
}

/// One direction of reading: `reader` reads data written with `writer`; a break hurts `whom`.
struct Direction<'a> {
    writer: &'a Schema,
    reader: &'a Schema,
    whom: Whom,
}

/// The whole-schema verdict of Avro resolution, for what the field walk does not name.
fn whole(dirs: &[Direction<'_>], version: u32) -> Vec<Break> {
    dirs.iter()
        .filter_map(|d| {
            SchemaCompatibility::can_read(d.writer, d.reader)
                .err()
                .map(|e| Break {
                    field: None,
                    against: version,
                    whom: d.whom,
                    detail: e.to_string(),
                })
        })
        .collect()
}

/// The reader's fields against the writer's: one missing without a default, or of a type the
/// reader cannot read from the writer's, is a break.
fn fields(w: &RecordSchema, r: &RecordSchema, whom: Whom, version: u32) -> Vec<Break> {
    let find = |name: &str| {
        w.fields
            .iter()
            .find(|f| f.name == name || f.aliases.iter().any(|a| a == name))
    };
    let mut out = vec![];
    for f in &r.fields {
        let detail = match find(&f.name) {
            None if f.default.is_some() => continue,
            None => match whom {
                Whom::NewReaders => format!(
                    "added without a default: consumers on the new schema cannot read events written with v{version} (they lack `{}`); give it a default, or make it optional",
                    f.name
                ),
                Whom::OldReaders => format!(
                    "removed, and v{version} has no default for it: consumers still on v{version} cannot read events written with the new schema; keep it, or give it a default in v{version} first",
                ),
            },
            Some(wf) => match SchemaCompatibility::can_read(&wf.schema, &f.schema) {
                Ok(_) => continue,
                // Told from the old schema's type to the new one's, whoever reads.
                Err(e) => match whom {
                    Whom::NewReaders => format!(
                        "type changes from {} to {}: consumers on the new schema cannot read v{version}'s values ({e})",
                        short(&wf.schema),
                        short(&f.schema)
                    ),
                    Whom::OldReaders => format!(
                        "type changes from {} to {}: consumers still on v{version} cannot read the new values ({e})",
                        short(&f.schema),
                        short(&wf.schema)
                    ),
                },
            },
        };
        out.push(Break {
            field: Some(f.name.clone()),
            against: version,
            whom,
            detail,
        });
    }
    out
}

/// What `new` breaks against version `version` (`old`) in the given directions.
pub fn explain(
    old: &Schema,
    version: u32,
    new: &Schema,
    backward: bool,
    forward: bool,
) -> Vec<Break> {
    let mut dirs = vec![];
    if backward {
        dirs.push(Direction {
            writer: old,
            reader: new,
            whom: Whom::NewReaders,
        });
    }
    if forward {
        dirs.push(Direction {
            writer: new,
            reader: old,
            whom: Whom::OldReaders,
        });
    }
    let (Some(o), Some(n)) = (record(old), record(new)) else {
        // Not records (HELIOS's payload schemas always are): the whole-schema verdict only.
        return whole(&dirs, version);
    };
    let mut out = vec![];
    let renamed = o.name.fullname(None) != n.name.fullname(None)
        && !n
            .aliases
            .iter()
            .flatten()
            .any(|a| a.fullname(None) == o.name.fullname(None));
    for d in &dirs {
        if renamed {
            out.push(Break {
                field: None,
                against: version,
                whom: d.whom,
                detail: format!(
                    "the record is renamed from `{}` to `{}` (without an alias): Avro resolves records by name",
                    o.name.fullname(None),
                    n.name.fullname(None)
                ),
            });
        }
        if let (Some(w), Some(r)) = (record(d.writer), record(d.reader)) {
            out.extend(fields(w, r, d.whom, version));
        }
    }
    if out.is_empty() {
        // Anything Avro refuses that the field walk did not name (nested types, enums...).
        out = whole(&dirs, version);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema(fields: &str) -> Schema {
        Schema::parse_str(&format!(
            r#"{{"type": "record", "name": "OrderPlaced", "namespace": "io.helios.events", "fields": [{fields}]}}"#
        ))
        .unwrap()
    }

    const V1: &str = r#"{"name": "order_id", "type": "string"}, {"name": "amount", "type": ["null", "double"], "default": null}"#;

    #[test]
    fn an_added_optional_field_breaks_nobody() {
        let v2 = schema(&format!(
            r#"{V1}, {{"name": "currency", "type": ["null", "string"], "default": null}}"#
        ));
        assert!(explain(&schema(V1), 1, &v2, true, true).is_empty());
    }

    #[test]
    fn an_added_required_field_breaks_new_readers_only() {
        let v2 = schema(&format!(
            r#"{V1}, {{"name": "currency", "type": "string"}}"#
        ));
        let b = explain(&schema(V1), 1, &v2, true, true);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].field.as_deref(), Some("currency"));
        assert_eq!(b[0].whom, Whom::NewReaders);
        assert!(b[0].detail.contains("without a default"), "{}", b[0].detail);
        assert!(explain(&schema(V1), 1, &v2, false, true).is_empty());
    }

    #[test]
    fn removing_a_required_field_breaks_old_readers_only() {
        let v2 = schema(r#"{"name": "amount", "type": ["null", "double"], "default": null}"#);
        let b = explain(&schema(V1), 3, &v2, true, true);
        assert_eq!(b.len(), 1, "{b:?}");
        assert_eq!(b[0].field.as_deref(), Some("order_id"));
        assert_eq!(b[0].whom, Whom::OldReaders);
        assert_eq!(b[0].against, 3);
        assert!(explain(&schema(V1), 3, &v2, true, false).is_empty());
        // An optional field may go: old readers fill in its default.
        let v3 = schema(r#"{"name": "order_id", "type": "string"}"#);
        assert!(explain(&schema(V1), 1, &v3, true, true).is_empty());
    }

    #[test]
    fn type_changes_follow_avro_promotion() {
        let int = schema(r#"{"name": "qty", "type": "int"}"#);
        let long = schema(r#"{"name": "qty", "type": "long"}"#);
        // int → long: new readers promote old ints; old int readers cannot take longs.
        assert!(explain(&int, 1, &long, true, false).is_empty());
        let b = explain(&int, 1, &long, false, true);
        assert_eq!(b.len(), 1);
        assert_eq!(b[0].field.as_deref(), Some("qty"));
        assert!(b[0].detail.contains("type changes"), "{}", b[0].detail);
        let s = schema(r#"{"name": "qty", "type": "string"}"#);
        assert_eq!(explain(&int, 1, &s, true, true).len(), 2);
    }

    #[test]
    fn a_rename_without_alias_breaks_both_ways() {
        let other = Schema::parse_str(
            r#"{"type": "record", "name": "Order", "namespace": "io.helios.events", "fields": [{"name": "order_id", "type": "string"}, {"name": "amount", "type": ["null", "double"], "default": null}]}"#,
        )
        .unwrap();
        let b = explain(&schema(V1), 1, &other, true, true);
        assert_eq!(b.len(), 2, "{b:?}");
        assert!(b.iter().all(|b| b.field.is_none()));
    }
}
