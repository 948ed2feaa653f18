//! Normalization: pure functions from a raw record (bytes + headers) to canonical events.
//! The dispatch lives here; what each cloud's envelope means lives with that cloud in
//! `crate::clouds`. No I/O, no clock except the record's own received-at time: the easiest code
//! in HELIOS to test and fuzz.

use crate::clouds;
use crate::model::headers::raw as h;
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};
use crate::source::Source;

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
        Source::Aws => clouds::aws::normalize::normalize(raw),
        Source::Gcp => clouds::gcp::normalize::normalize(raw),
        Source::Azure => clouds::azure::normalize::normalize(raw),
        Source::Direct => clouds::direct::normalize::normalize(raw),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::CanonicalEvent;

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
            Normalized::Events { events, .. } => {
                events.into_iter().map(|r| r.expect("event")).collect()
            }
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
    fn sns_type_comes_from_signed_content_never_from_message_attributes() {
        // A genuine envelope re-posted with another (unsigned) attribute keeps its signed type.
        let body = serde_json::json!({"Type": "Notification", "MessageId": "sns-4", "TopicArn": "t",
            "Subject": "OrderPlaced", "Message": "{\"order_id\":\"O-9\"}", "Timestamp": "2026-11-22T09:15:03.000Z",
            "MessageAttributes": {"eventType": {"Type": "String", "Value": "RefundIssued"}}});
        let e = events(normalize(&raw(
            "aws",
            "sns",
            body.to_string().as_bytes(),
            &[],
        )));
        assert_eq!(e[0].event_type, "OrderPlaced");
        // The Message's own type wins over the Subject; an attribute alone types nothing.
        let own = serde_json::json!({"Type": "Notification", "MessageId": "sns-5", "TopicArn": "t",
            "Subject": "OrderPlaced", "Message": "{\"event_type\":\"PaymentProcessed\",\"order_id\":\"O-9\"}",
            "Timestamp": "2026-11-22T09:15:03.000Z"});
        let e = events(normalize(&raw(
            "aws",
            "sns",
            own.to_string().as_bytes(),
            &[],
        )));
        assert_eq!(e[0].event_type, "PaymentProcessed");
        let attr_only = serde_json::json!({"Type": "Notification", "MessageId": "sns-6", "TopicArn": "t",
            "Message": "{\"order_id\":\"O-9\"}", "Timestamp": "2026-11-22T09:15:03.000Z",
            "MessageAttributes": {"eventType": {"Type": "String", "Value": "InventoryReserved"}}});
        match normalize(&raw("aws", "sns", attr_only.to_string().as_bytes(), &[])) {
            Normalized::Events { events: v, .. } => assert_eq!(
                v[0].as_ref().unwrap_err().reason,
                DlqReason::MissingEventType
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn sns_plain_message_takes_type_from_the_subject_and_id_from_message_id() {
        let body = serde_json::json!({"Type": "Notification", "MessageId": "sns-2", "TopicArn": "t",
            "Subject": "InventoryReserved", "Message": "{\"order_id\":\"O-9\"}", "Timestamp": "2026-11-22T09:15:03.000Z"});
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
            Normalized::Events { events: v, .. } => assert_eq!(
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
            Normalized::Events { events: v, .. } => assert_eq!(
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
