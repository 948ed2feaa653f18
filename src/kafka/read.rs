//! Reading topics directly, outside any group: a throw-away reader, a record's timestamp,
//! offsets by time.

use std::time::Duration;

use rdkafka::error::KafkaError;

use crate::config::KafkaSettings;

/// A consumer for reading topics directly (assigned partitions, a throw-away group id that is
/// never joined, no commits): `purpose` names it in the broker's logs (`helios-<purpose>-<uuid>`).
pub fn reader(
    settings: &KafkaSettings,
    purpose: &str,
) -> Result<rdkafka::consumer::BaseConsumer, KafkaError> {
    settings
        .client_config()
        .set(
            "group.id",
            format!("helios-{purpose}-{}", uuid::Uuid::new_v4().simple()),
        )
        .set("enable.auto.commit", "false")
        .create()
}

/// Timestamp (ms) of the record at `offset`. Assigns `c` to that partition.
pub fn record_timestamp(
    c: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    offset: i64,
) -> Result<Option<i64>, KafkaError> {
    use rdkafka::consumer::Consumer;
    use rdkafka::message::Message;
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, rdkafka::Offset::Offset(offset))?;
    c.assign(&tpl)?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200)) {
            if m.offset() == offset {
                return Ok(m.timestamp().to_millis());
            }
        }
    }
    Ok(None)
}

/// For each time in `at_ms`, the first offset of `topic`/`partition` (whose offsets run
/// `low..high`) at or after it, with the broker's offsets-for-times; `high` when no record is that
/// recent. Some brokers answer offset 0 for a time after the last record, so each time is checked
/// against the last record's timestamp (read once). Leaves `c` assigned to the partition: assign
/// it afterwards.
pub fn offsets_at_times(
    c: &rdkafka::consumer::BaseConsumer,
    topic: &str,
    partition: i32,
    (low, high): (i64, i64),
    at_ms: &[i64],
) -> Result<Vec<i64>, KafkaError> {
    use rdkafka::consumer::Consumer;
    if high <= low {
        return Ok(vec![high; at_ms.len()]);
    }
    let last = record_timestamp(c, topic, partition, high - 1)?.unwrap_or(i64::MAX);
    at_ms
        .iter()
        .map(|&at| {
            if at > last {
                return Ok(high);
            }
            let mut q = rdkafka::TopicPartitionList::new();
            q.add_partition_offset(topic, partition, rdkafka::Offset::Offset(at))?;
            let found = c
                .offsets_for_times(q, Duration::from_secs(15))?
                .find_partition(topic, partition)
                .map(|e| e.offset());
            Ok(match found {
                Some(rdkafka::Offset::Offset(o)) if o >= 0 => o.clamp(low, high),
                _ => high,
            })
        })
        .collect()
}
