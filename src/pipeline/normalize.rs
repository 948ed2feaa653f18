//! Normalization: pure functions from a raw record (bytes + headers) to canonical events.
//! The dispatch lives here; what each cloud's envelope means lives with that cloud in
//! `crate::clouds`. No I/O, no clock except the record's own received-at time: the easiest code
//! in HELIOS to test and fuzz.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde_json::Value;

use super::event::{id_field, normalize_type, parse_time, CanonicalEvent, RawRef};
use crate::clouds;
use crate::ingress::landing::headers as h;
use crate::source::Source;

/// A record read from a raw topic.
#[derive(Debug, Clone, Default)]
pub struct RawRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Kafka timestamp, milliseconds since the epoch.
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    pub value: Vec<u8>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl RawRecord {
    /// A header's value as text (the first one of that name).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// When the ingress received it (falls back to the Kafka timestamp, then the epoch).
    pub fn received_at(&self) -> DateTime<Utc> {
        self.header(h::RECEIVED_AT)
            .and_then(parse_time)
            .or_else(|| self.timestamp_ms.and_then(DateTime::from_timestamp_millis))
            .unwrap_or_default()
    }

    /// Lineage of the `index`-th event in this record.
    pub fn raw_ref(&self, index: u32) -> RawRef {
        RawRef {
            topic: self.topic.clone(),
            partition: self.partition,
            offset: self.offset,
            index,
        }
    }
}

/// Why a raw record (or one event in it) cannot become a canonical event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqReason {
    InvalidJson,
    UnrecognizedPayload,
    InvalidPayload,
    MissingEventId,
    MissingEventType,
    UnknownSource,
    MissingRequiredField,
    SchemaViolation,
    UnknownEventType,
    RedriveLimit,
}

impl DlqReason {
    /// The value of the `helios-dlq-reason` header and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::InvalidJson => "invalid_json",
            DlqReason::UnrecognizedPayload => "unrecognized_payload",
            DlqReason::InvalidPayload => "invalid_payload",
            DlqReason::MissingEventId => "missing_event_id",
            DlqReason::MissingEventType => "missing_event_type",
            DlqReason::UnknownSource => "unknown_source",
            DlqReason::MissingRequiredField => "missing_required_field",
            DlqReason::SchemaViolation => "schema_violation",
            DlqReason::UnknownEventType => "unknown_event_type",
            DlqReason::RedriveLimit => "redrive_limit",
        }
    }
}

/// A normalization failure: the reason code, a human message, and which event of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizeError {
    pub reason: DlqReason,
    pub detail: String,
    pub index: Option<u32>,
}

impl NormalizeError {
    pub fn new(reason: DlqReason, detail: impl Into<String>) -> Self {
        NormalizeError {
            reason,
            detail: detail.into(),
            index: None,
        }
    }

    pub fn at(mut self, index: u32) -> Self {
        self.index = Some(index);
        self
    }
}

/// What a raw record turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    /// A handshake kept for the audit trail: counted and skipped.
    Handshake,
    /// One result per event carried by the record (arrays carry several).
    Events(Vec<Result<CanonicalEvent, NormalizeError>>),
    /// The record as a whole cannot be read.
    Failed(NormalizeError),
}

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

/// Normalizes one raw record according to its `helios-source` and delivery headers.
pub fn normalize(raw: &RawRecord) -> Normalized {
    if raw.header(h::KIND) == Some("handshake") {
        return Normalized::Handshake;
    }
    let Some(source) = raw.header(h::SOURCE).and_then(Source::parse) else {
        return Normalized::Failed(NormalizeError::new(
            DlqReason::UnknownSource,
            format!("helios-source header is {:?}", raw.header(h::SOURCE)),
        ));
    };
    match source {
        Source::Aws => {
            if raw.header("x-amz-sns-message-type").is_some()
                || raw.header(h::ENDPOINT) == Some("sns")
            {
                clouds::aws::sns::normalize(raw)
            } else {
                clouds::aws::eventbridge::normalize(raw)
            }
        }
        Source::Gcp => clouds::gcp::pubsub::normalize(raw),
        Source::Azure => clouds::azure::eventgrid::normalize(raw),
        Source::Direct => clouds::direct::normalize(raw),
    }
}

/// Wraps a single draft result as the record's outcome.
pub fn single(source: Source, raw: &RawRecord, d: Result<Draft, NormalizeError>) -> Normalized {
    match d {
        Ok(d) => Normalized::Events(vec![d.finish(source, raw, 0)]),
        Err(e) => Normalized::Failed(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn raw(source: &str, endpoint: &str, body: &[u8], extra: &[(&str, &str)]) -> RawRecord {
        let mut headers = vec![
            (h::SOURCE.to_string(), source.as_bytes().to_vec()),
            (h::ENDPOINT.to_string(), endpoint.as_bytes().to_vec()),
            (h::KIND.to_string(), b"event".to_vec()),
            (
                h::RECEIVED_AT.to_string(),
                b"2026-11-22T10:00:00.000Z".to_vec(),
            ),
        ];
        headers.extend(
            extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())),
        );
        RawRecord {
            topic: format!("helios.raw.{source}"),
            partition: 2,
            offset: 41,
            timestamp_ms: None,
            key: None,
            value: body.to_vec(),
            headers,
        }
    }

    fn events(n: Normalized) -> Vec<CanonicalEvent> {
        match n {
            Normalized::Events(v) => v.into_iter().map(|r| r.expect("event")).collect(),
            other => panic!("expected events, got {other:?}"),
        }
    }

    #[test]
    fn eventbridge_envelope() {
        let e = events(normalize(&raw(
            "aws",
            "eventbridge",
            include_bytes!("../../samples/aws-eventbridge-order.json"),
            &[],
        )));
        assert_eq!(e.len(), 1);
        let e = &e[0];
        assert_eq!(e.event_id, "0d1c7b9e-2f4a-4a53-9d51-7d3c2a6f1b01");
        assert_eq!(e.event_type, "OrderPlaced");
        assert_eq!(e.order_id.as_deref(), Some("O-1001"));
        assert_eq!(e.customer_id.as_deref(), Some("C-42"));
        assert_eq!(e.occurred_at.to_rfc3339(), "2026-11-22T09:15:02+00:00");
        assert_eq!(e.metadata["aws_account"], "111122223333");
        assert_eq!(e.metadata["aws_region"], "eu-west-1");
        assert_eq!(e.raw.owner(), "helios.raw.aws/2/41/0");
        let ec2 = events(normalize(&raw(
            "aws",
            "eventbridge",
            include_bytes!("../../samples/aws-eventbridge.json"),
            &[],
        )));
        assert_eq!(ec2[0].event_type, "EC2InstanceStateChangeNotification");
        assert_eq!(
            ec2[0].metadata["provider_type"],
            "EC2 Instance State-change Notification"
        );
    }

    #[test]
    fn sns_notification_with_eventbridge_inside_keeps_the_inner_id() {
        let inner =
            String::from_utf8(include_bytes!("../../samples/aws-eventbridge-order.json").to_vec())
                .unwrap();
        let body = serde_json::json!({"Type": "Notification", "MessageId": "sns-1", "TopicArn": "arn:aws:sns:eu-west-1:1:t",
            "Message": inner.trim(), "Timestamp": "2026-11-22T09:15:03.000Z"});
        let e = events(normalize(&raw(
            "aws",
            "sns",
            body.to_string().as_bytes(),
            &[("x-amz-sns-message-type", "Notification")],
        )));
        assert_eq!(e[0].event_id, "0d1c7b9e-2f4a-4a53-9d51-7d3c2a6f1b01");
        assert_eq!(e[0].event_type, "OrderPlaced");
        assert_eq!(e[0].metadata["sns_message_id"], "sns-1");
    }

    #[test]
    fn sns_plain_message_takes_type_from_attributes_and_id_from_message_id() {
        let body = serde_json::json!({"Type": "Notification", "MessageId": "sns-2", "TopicArn": "t",
            "Message": "{\"order_id\":\"O-9\"}", "Timestamp": "2026-11-22T09:15:03.000Z",
            "MessageAttributes": {"eventType": {"Type": "String", "Value": "InventoryReserved"}}});
        let e = events(normalize(&raw(
            "aws",
            "sns",
            body.to_string().as_bytes(),
            &[],
        )));
        assert_eq!(e[0].event_id, "sns-2");
        assert_eq!(e[0].event_type, "InventoryReserved");
        assert_eq!(e[0].order_id.as_deref(), Some("O-9"));
        let text = serde_json::json!({"Type": "Notification", "MessageId": "sns-3", "TopicArn": "t",
            "Message": "hello", "Timestamp": "2026-11-22T09:15:03.000Z"});
        match normalize(&raw("aws", "sns", text.to_string().as_bytes(), &[])) {
            Normalized::Events(v) => assert_eq!(
                v[0].as_ref().unwrap_err().reason,
                DlqReason::MissingEventType
            ),
            other => panic!("{other:?}"),
        }
        let confirm = serde_json::json!({"Type": "SubscriptionConfirmation", "MessageId": "x"});
        assert_eq!(
            normalize(&raw("aws", "sns", confirm.to_string().as_bytes(), &[])),
            Normalized::Handshake
        );
    }

    #[test]
    fn pubsub_wrapped_and_unwrapped() {
        let data = base64::Engine::encode(
            &base64::engine::general_purpose::STANDARD,
            br#"{"order_id":"O-5","amount":10}"#,
        );
        let body = serde_json::json!({"message": {"data": data, "attributes": {"eventType": "PaymentProcessed"},
            "messageId": "m-1", "message_id": "m-1", "publish_time": "2026-11-22T08:00:00Z"},
            "subscription": "projects/p/subscriptions/s"});
        let e = events(normalize(&raw(
            "gcp",
            "pubsub",
            body.to_string().as_bytes(),
            &[],
        )));
        assert_eq!(e[0].event_id, "m-1");
        assert_eq!(e[0].event_type, "PaymentProcessed");
        assert_eq!(e[0].data["amount"], 10);
        assert_eq!(e[0].occurred_at.to_rfc3339(), "2026-11-22T08:00:00+00:00");
        assert_eq!(
            e[0].metadata["gcp_subscription"],
            "projects/p/subscriptions/s"
        );

        let e = events(normalize(&raw(
            "gcp",
            "pubsub",
            br#"{"order_id":"O-6"}"#,
            &[
                ("x-goog-pubsub-message-id", "m-2"),
                ("eventtype", "OrderPlaced"),
            ],
        )));
        assert_eq!(
            (e[0].event_id.as_str(), e[0].event_type.as_str()),
            ("m-2", "OrderPlaced")
        );

        let sample = normalize(&raw(
            "gcp",
            "pubsub",
            include_bytes!("../../samples/gcp-pubsub-wrapped.json"),
            &[],
        ));
        match sample {
            Normalized::Events(v) => assert_eq!(
                v[0].as_ref().unwrap_err().reason,
                DlqReason::MissingEventType
            ),
            other => panic!("{other:?}"),
        }
        let bad = serde_json::json!({"message": {"data": "!!!", "messageId": "m"}});
        assert!(matches!(
            normalize(&raw("gcp", "pubsub", bad.to_string().as_bytes(), &[])),
            Normalized::Failed(NormalizeError {
                reason: DlqReason::InvalidPayload,
                ..
            })
        ));
    }

    #[test]
    fn eventgrid_and_cloudevents() {
        let e = events(normalize(&raw(
            "azure",
            "eventgrid",
            include_bytes!("../../samples/azure-eventgrid.json"),
            &[],
        )));
        assert_eq!(e[0].event_type, "BlobCreated");
        assert_eq!(e[0].event_id, "831e1650-001e-001b-66ab-eeb76e069631");
        let e = events(normalize(&raw(
            "azure",
            "eventgrid",
            include_bytes!("../../samples/azure-cloudevents-batch.json"),
            &[],
        )));
        assert_eq!(e.len(), 2);
        assert_eq!(e[1].event_type, "OrderPlaced");
        assert_eq!(e[1].event_id, "/orders/account/123#A234-1234-1235");
        assert_eq!(e[1].raw.index, 1);
        assert_eq!(e[1].order_id.as_deref(), Some("O-28965"));
        let v = normalize(&raw(
            "azure",
            "eventgrid",
            include_bytes!("../../samples/azure-eventgrid-validation.json"),
            &[],
        ));
        assert_eq!(v, Normalized::Handshake);
    }

    #[test]
    fn direct_single_and_batch() {
        let e = events(normalize(&raw(
            "direct",
            "ingest",
            include_bytes!("../../samples/direct-batch.json"),
            &[],
        )));
        assert_eq!(
            e.iter().map(|e| e.event_type.as_str()).collect::<Vec<_>>(),
            ["PaymentProcessed", "InventoryReserved"]
        );
        let e = events(normalize(&raw(
            "direct",
            "ingest",
            br#"{"event_type":"OrderPlaced","data":{"order_id":"O"}}"#,
            &[],
        )));
        assert_eq!(e[0].event_id, "raw-helios.raw.direct/2/41/0");
    }

    #[test]
    fn handshakes_and_garbage_never_panic() {
        let mut r = raw("azure", "eventgrid", b"", &[]);
        r.headers.push((h::KIND.into(), b"handshake".to_vec()));
        r.headers.retain(|(k, v)| !(k == h::KIND && v == b"event"));
        assert_eq!(normalize(&r), Normalized::Handshake);
        for src in ["aws", "gcp", "azure", "direct", "nope"] {
            for body in [
                &b""[..],
                b"\xff",
                b"null",
                b"[]",
                b"[null]",
                b"{}",
                b"{\"message\":1}",
                b"{\"Type\":\"Notification\"}",
            ] {
                let _ = normalize(&raw(src, "x", body, &[]));
                let _ = normalize(&raw(src, "sns", body, &[("x-amz-sns-rawdelivery", "true")]));
            }
        }
    }
}
