//! Avro fan-out mode: with `SCHEMA_REGISTRY_URL` set, fan-out values are the canonical event in
//! Confluent wire format (magic 0, 4-byte schema id, Avro binary), encoded with
//! `schemas/CanonicalEvent.avsc`, which is registered on first use under the topic's `-value`
//! subject (TopicNameStrategy) through schema_registry_converter and then cached. A registry
//! failure fails the batch, which is retried (never DLQ'd: the events are fine, the registry is not).

use apache_avro::types::Value;
use schema_registry_converter::async_impl::avro::AvroEncoder;
use schema_registry_converter::async_impl::schema_registry::SrSettings;
use schema_registry_converter::schema_registry_common::{
    SchemaType, SubjectNameStrategy, SuppliedSchema,
};

use super::schema::CANONICAL_EVENT;
use crate::model::CanonicalEvent;

/// Encodes canonical events for the fan-out topics.
pub struct AvroFanOut {
    encoder: AvroEncoder,
}

/// The registry could not register or serve the schema (the batch is retried).
#[derive(Debug, thiserror::Error)]
#[error("schema registry: {0}")]
pub struct RegistryError(pub String);

impl AvroFanOut {
    pub fn new(registry_url: &str) -> anyhow::Result<Self> {
        let settings = SrSettings::new_builder(registry_url.trim_end_matches('/').to_string())
            .set_timeout(std::time::Duration::from_secs(5))
            .build()
            .map_err(|e| anyhow::anyhow!("SCHEMA_REGISTRY_URL {registry_url}: {e}"))?;
        Ok(AvroFanOut {
            encoder: AvroEncoder::new(settings),
        })
    }

    /// The Confluent-framed Avro value of `e` for `topic`.
    pub async fn encode(&self, topic: &str, e: &CanonicalEvent) -> Result<Vec<u8>, RegistryError> {
        let strategy = SubjectNameStrategy::TopicNameStrategyWithSchema(
            topic.to_string(),
            false,
            SuppliedSchema::new(
                Some("io.helios.CanonicalEvent".into()),
                SchemaType::Avro,
                CANONICAL_EVENT.to_string(),
            ),
        );
        self.encoder
            .encode_value(to_value(e), &strategy)
            .await
            .map_err(|err| RegistryError(err.to_string()))
    }
}

fn opt(s: &Option<String>) -> Value {
    match s {
        Some(v) => Value::Union(1, Box::new(Value::String(v.clone()))),
        None => Value::Union(0, Box::new(Value::Null)),
    }
}

/// The canonical event as an Avro record of `schemas/CanonicalEvent.avsc`.
pub fn to_value(e: &CanonicalEvent) -> Value {
    let source_index = e.source.index() as u32;
    Value::Record(vec![
        ("event_id".into(), Value::String(e.event_id.clone())),
        ("event_type".into(), Value::String(e.event_type.clone())),
        (
            "source".into(),
            Value::Enum(source_index, e.source.as_str().into()),
        ),
        (
            "occurred_at".into(),
            Value::TimestampMicros(e.occurred_at.timestamp_micros()),
        ),
        (
            "ingested_at".into(),
            Value::TimestampMicros(e.ingested_at.timestamp_micros()),
        ),
        ("order_id".into(), opt(&e.order_id)),
        ("customer_id".into(), opt(&e.customer_id)),
        ("data".into(), Value::String(e.data.to_string())),
        (
            "metadata".into(),
            Value::Map(
                e.metadata
                    .iter()
                    .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                    .collect(),
            ),
        ),
        ("raw_topic".into(), Value::String(e.raw.topic.clone())),
        ("raw_partition".into(), Value::Int(e.raw.partition)),
        ("raw_offset".into(), Value::Long(e.raw.offset)),
        ("raw_index".into(), Value::Int(e.raw.index as i32)),
    ])
}
