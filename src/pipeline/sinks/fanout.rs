//! Fan-out records (`helios.events.<EventType>`): keyed by the order id (else the event id), the
//! canonical event as JSON (or Avro through the registry), CloudEvents binary-mode headers plus
//! lineage back to the raw record.

use chrono::SecondsFormat;
use rdkafka::message::{Header, OwnedHeaders};

use crate::model::headers::{lineage, REPLAY_ID};
use crate::model::CanonicalEvent;

/// `application/json` or `application/avro`.
pub fn content_type(avro: bool) -> &'static str {
    if avro {
        "application/avro"
    } else {
        "application/json"
    }
}

/// The header pairs of an event's fan-out record.
fn pairs<'a>(
    e: &'a CanonicalEvent,
    content_type: &'a str,
    replay_id: Option<&'a str>,
    trace: Option<&'a str>,
) -> Vec<(&'static str, std::borrow::Cow<'a, str>)> {
    let mut v: Vec<(&'static str, std::borrow::Cow<'a, str>)> = vec![
        ("ce_specversion", "1.0".into()),
        ("ce_id", e.event_id.as_str().into()),
        ("ce_source", format!("/helios/{}", e.source.as_str()).into()),
        ("ce_type", e.event_type.as_str().into()),
        (
            "ce_time",
            e.occurred_at
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .into(),
        ),
        ("content-type", content_type.into()),
        (lineage::SOURCE, e.source.as_str().into()),
        (lineage::RAW_TOPIC, e.raw.topic.as_str().into()),
        (lineage::RAW_PARTITION, e.raw.partition.to_string().into()),
        (lineage::RAW_OFFSET, e.raw.offset.to_string().into()),
        (lineage::RAW_INDEX, e.raw.index.to_string().into()),
        (
            lineage::INGESTED_AT,
            e.ingested_at
                .to_rfc3339_opts(SecondsFormat::Millis, true)
                .into(),
        ),
    ];
    if let Some(id) = replay_id {
        v.push((REPLAY_ID, id.into()));
    }
    // The processor span's context (traces on), else the delivery's W3C trace context,
    // validated at normalization.
    if let Some(t) = trace.or(e.metadata.get("traceparent").map(String::as_str)) {
        v.push(("traceparent", t.into()));
    }
    v
}

/// The fan-out record's headers: CloudEvents binary mode plus lineage; `trace` is the
/// processor span's `traceparent` when traces are exported.
pub fn headers(
    e: &CanonicalEvent,
    content_type: &str,
    replay_id: Option<&str>,
    trace: Option<&str>,
) -> OwnedHeaders {
    let p = pairs(e, content_type, replay_id, trace);
    let mut h = OwnedHeaders::new_with_capacity(p.len());
    for (k, v) in &p {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_ref()),
        });
    }
    h
}

/// Bytes the key and headers of an event's fan-out record take (for the size check).
pub fn key_and_headers_size(e: &CanonicalEvent, replay_id: Option<&str>) -> usize {
    // Measured with a processor span's `traceparent` (same length as any valid one).
    const SOME_TRACE: &str = "00-00000000000000000000000000000001-0000000000000001-01";
    e.partition_key().len()
        + pairs(e, content_type(true), replay_id, Some(SOME_TRACE))
            .iter()
            .map(|(k, v)| k.len() + v.len() + 8)
            .sum::<usize>()
}

/// The JSON value of an event's fan-out record.
pub fn json_payload(e: &CanonicalEvent) -> Vec<u8> {
    // Serializing a CanonicalEvent cannot fail: string keys, no non-finite floats.
    serde_json::to_vec(e).unwrap_or_default()
}

/// The order to send events in so that no later record of a key overtakes an earlier one on its
/// topic: `keys[i]` is event i's (topic, key); round r holds the r-th event of every (topic,
/// key), in batch order. Each round is sent only once the one before was acknowledged, so a
/// failure surfaced in round r leaves every later record of its key unsent (and the retry
/// resumes there). A batch without repeated keys is one round.
pub fn rounds<'a>(keys: impl IntoIterator<Item = (usize, (&'a str, &'a str))>) -> Vec<Vec<usize>> {
    let mut seen: std::collections::HashMap<(&str, &str), usize> = Default::default();
    let mut rounds: Vec<Vec<usize>> = vec![];
    for (i, k) in keys {
        let r = seen.entry(k).or_insert(0);
        if rounds.len() <= *r {
            rounds.push(vec![]);
        }
        rounds[*r].push(i);
        *r += 1;
    }
    rounds
}

#[cfg(test)]
mod tests {
    use super::rounds;

    #[test]
    fn each_round_holds_one_event_per_topic_and_key_in_batch_order() {
        let keys = [
            ("t.OrderPlaced", "O-1"),
            ("t.OrderPlaced", "O-2"),
            ("t.OrderUpdated", "O-1"),
            ("t.OrderPlaced", "O-1"),
            ("t.OrderPlaced", "O-1"),
        ];
        let r = rounds(keys.iter().copied().enumerate());
        assert_eq!(r, vec![vec![0, 1, 2], vec![3], vec![4]]);
        assert!(rounds(std::iter::empty()).is_empty());
    }
}
