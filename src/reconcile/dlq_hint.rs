//! `helios reconcile show`: where a missing step may be. An order whose step never came is often
//! one whose step was dead-lettered (an invalid payload, a schema refused): the recent records
//! of the DLQ topic are searched for the order id (in the raw body, and inside a Pub/Sub push's
//! base64 `message.data`), so `show` can say "a dead-lettered record mentions it" with the
//! record's coordinates and reason.

use std::time::{Duration, Instant};

use base64::Engine;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use serde_json::{json, Value};

use crate::config::KafkaSettings;
use crate::model::headers::dlq;

/// Records looked at per DLQ partition (the newest).
pub const SCAN_PER_PARTITION: i64 = 10_000;

fn header<'a>(m: &'a rdkafka::message::BorrowedMessage<'_>, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// Whether a DLQ record's body names `key` (as a JSON string, directly or in a Pub/Sub push's
/// base64 data).
fn mentions(body: &[u8], key: &str) -> bool {
    let quoted = format!("\"{key}\"");
    let found = |b: &[u8]| b.windows(quoted.len()).any(|w| w == quoted.as_bytes());
    if found(body) {
        return true;
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v["message"]["data"].as_str().map(str::to_string))
        .and_then(|d| base64::engine::general_purpose::STANDARD.decode(d).ok())
        .is_some_and(|d| found(&d))
}

/// DLQ records (of the newest [`SCAN_PER_PARTITION`] per partition) that mention `key`.
pub fn search(settings: &KafkaSettings, topic: &str, key: &str) -> anyhow::Result<Vec<Value>> {
    let c: BaseConsumer = crate::kafka::reader(settings, "reconcile-show")?;
    let timeout = Duration::from_secs(5);
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = rdkafka::TopicPartitionList::new();
    let mut ends = vec![];
    for t in md.topics().iter().filter(|t| t.name() == topic) {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
            if high > low {
                let from = low.max(high - SCAN_PER_PARTITION);
                tpl.add_partition_offset(topic, p.id(), rdkafka::Offset::Offset(from))?;
                ends.push((p.id(), high));
            }
        }
    }
    let mut found = vec![];
    if ends.is_empty() {
        return Ok(found);
    }
    c.assign(&tpl)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut done: Vec<i32> = vec![];
    while done.len() < ends.len() && Instant::now() < deadline {
        let Some(Ok(m)) = c.poll(Duration::from_millis(200)) else {
            continue;
        };
        if let Some((_, high)) = ends.iter().find(|(p, _)| *p == m.partition()) {
            if m.offset() + 1 >= *high && !done.contains(&m.partition()) {
                done.push(m.partition());
            }
        }
        if m.payload().is_some_and(|b| mentions(b, key)) {
            found.push(json!({
                "record": format!("{}/{}/{}", m.topic(), m.partition(), m.offset()),
                "reason": header(&m, dlq::REASON),
                "detail": header(&m, dlq::DETAIL).map(|d| crate::model::text::bounded(d, 200)),
                "failed_at": header(&m, dlq::FAILED_AT),
            }));
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_found_in_a_body_or_a_pubsub_push() {
        assert!(mentions(br#"{"order_id":"O-1"}"#, "O-1"));
        assert!(!mentions(br#"{"order_id":"O-10"}"#, "O-1"));
        let data = base64::engine::general_purpose::STANDARD.encode(r#"{"order_id": "O-7"}"#);
        let push = format!(r#"{{"message": {{"data": "{data}"}}}}"#);
        assert!(mentions(push.as_bytes(), "O-7"));
    }
}
