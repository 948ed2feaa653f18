//! What `helios status` reads from Kafka: each group's partitions and lag, and the recent DLQ
//! and handshake records (read from the end of their partitions).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::{DlqCount, PartitionStatus, Subscription};
use crate::config::KafkaSettings;
use crate::model::headers::{dlq as dlq_headers, raw as raw_headers};
use crate::model::text::bounded;
use crate::source::Source;
use crate::topology::Topology;

/// Per raw partition: end offset, committed offset, lag. The group is only asked for its
/// committed offsets (this client never joins it).
pub(super) fn partitions(
    settings: &KafkaSettings,
    group: &str,
    raw: &[String],
) -> anyhow::Result<(Vec<PartitionStatus>, Duration)> {
    let c: BaseConsumer = settings
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()?;
    let timeout = Duration::from_secs(10);
    let t0 = Instant::now();
    let md = c.fetch_metadata(None, timeout)?;
    let probe = t0.elapsed();
    let mut tpl = TopicPartitionList::new();
    let mut ends = vec![];
    for t in md
        .topics()
        .iter()
        .filter(|t| raw.iter().any(|r| r == t.name()))
    {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(t.name(), p.id(), timeout)?;
            tpl.add_partition(t.name(), p.id());
            ends.push((t.name().to_string(), p.id(), low, high));
        }
    }
    let committed = c.committed_offsets(tpl, timeout)?;
    let mut out = vec![];
    for (topic, partition, low, high) in ends {
        let done = committed
            .find_partition(&topic, partition)
            .and_then(|e| match e.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            });
        out.push(PartitionStatus {
            lag: high - done.unwrap_or(low).max(low),
            topic,
            partition,
            end_offset: high,
            committed: done,
            in_per_s: None,
            committed_per_s: None,
        });
    }
    out.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok((out, probe))
}

/// Reads `topic` from `since` (at most `limit` records per partition, the latest ones) and
/// hands each record's timestamp and headers to `each`. Returns the records read.
fn scan_recent(
    settings: &KafkaSettings,
    topic: &str,
    since: DateTime<Utc>,
    limit: i64,
    mut each: impl FnMut(Option<i64>, &dyn Fn(&str) -> Option<String>, &[u8]),
) -> anyhow::Result<u64> {
    let c = crate::kafka::reader(settings, "status")?;
    let timeout = Duration::from_secs(10);
    let md = c.fetch_metadata(Some(topic), timeout)?;
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for t in md.topics().iter().filter(|t| t.error().is_none()) {
        for p in t.partitions() {
            let (low, high) = c.fetch_watermarks(topic, p.id(), timeout)?;
            if high <= low {
                continue;
            }
            let from = crate::kafka::offsets_at_times(
                &c,
                topic,
                p.id(),
                (low, high),
                &[since.timestamp_millis()],
            )?[0];
            let start = from.max(high - limit).clamp(low, high);
            if start < high {
                tpl.add_partition_offset(topic, p.id(), Offset::Offset(start))?;
                ends.insert(p.id(), high);
            }
        }
    }
    if ends.is_empty() {
        return Ok(0);
    }
    c.assign(&tpl)?;
    let mut read = 0u64;
    let mut idle = Instant::now();
    while !ends.is_empty() && idle.elapsed() < Duration::from_secs(20) {
        let Some(m) = c.poll(Duration::from_millis(500)) else {
            continue;
        };
        let m = m?;
        idle = Instant::now();
        let end = ends.get(&m.partition()).copied().unwrap_or(0);
        if m.offset() < end {
            read += 1;
            let header = |name: &str| -> Option<String> {
                m.headers()?
                    .iter()
                    .filter(|h| h.key == name)
                    .last()
                    .and_then(|h| std::str::from_utf8(h.value?).ok())
                    .map(|v| bounded(v, 200).into_owned())
            };
            each(
                m.timestamp().to_millis(),
                &header,
                m.payload().unwrap_or_default(),
            );
        }
        if m.offset() + 1 >= end {
            ends.remove(&m.partition());
        }
    }
    Ok(read)
}

/// DLQ records of the last 24 h by reason and source.
pub(super) fn dlq_counts(
    settings: &KafkaSettings,
    topology: &Topology,
    now: DateTime<Utc>,
    limit: i64,
) -> anyhow::Result<(Vec<DlqCount>, u64)> {
    let hour_ago = (now - chrono::Duration::hours(1)).timestamp_millis();
    let mut counts: BTreeMap<(String, String), (u64, u64)> = BTreeMap::new();
    let scanned = scan_recent(
        settings,
        &topology.dlq_topic(),
        now - chrono::Duration::hours(24),
        limit,
        |ts, header, _| {
            let reason = header(dlq_headers::REASON).unwrap_or_else(|| "unknown".into());
            let source = header(raw_headers::SOURCE).unwrap_or_else(|| "unknown".into());
            // Bounded: reasons and sources are HELIOS's own vocabularies; anything else is one key.
            if counts.len() >= 200 && !counts.contains_key(&(reason.clone(), source.clone())) {
                return;
            }
            let e = counts.entry((reason, source)).or_default();
            e.1 += 1;
            if ts.is_some_and(|t| t >= hour_ago) {
                e.0 += 1;
            }
        },
    )?;
    let out = counts
        .into_iter()
        .map(|((reason, source), (h, d))| DlqCount {
            reason,
            source,
            last_hour: h,
            last_24h: d,
        })
        .collect();
    Ok((out, scanned))
}

/// The handshake records of the last 24 h, by source, kind and subscription.
pub(super) fn subscriptions(
    settings: &KafkaSettings,
    topology: &Topology,
    now: DateTime<Utc>,
    limit: i64,
) -> anyhow::Result<Vec<Subscription>> {
    let mut seen: BTreeMap<(String, String, String), (u64, Option<i64>)> = BTreeMap::new();
    for source in [Source::Aws, Source::Azure] {
        scan_recent(
            settings,
            &topology.raw_topic(source),
            now - chrono::Duration::hours(24),
            limit,
            |ts, header, body| {
                if header(raw_headers::KIND).as_deref() != Some("handshake") {
                    return;
                }
                let kind = header(raw_headers::HANDSHAKE).unwrap_or_else(|| "unknown".into());
                let name = header("aeg-subscription-name")
                    .or_else(|| header("x-amz-sns-topic-arn"))
                    .or_else(|| {
                        serde_json::from_slice::<serde_json::Value>(body)
                            .ok()?
                            .get("TopicArn")?
                            .as_str()
                            .map(|s| bounded(s, 200).into_owned())
                    })
                    .unwrap_or_else(|| "(unnamed)".into());
                let key = (source.as_str().to_string(), kind, name);
                if seen.len() >= 100 && !seen.contains_key(&key) {
                    return;
                }
                let e = seen.entry(key).or_default();
                e.0 += 1;
                e.1 = e.1.max(ts);
            },
        )?;
    }
    Ok(seen
        .into_iter()
        .map(
            |((source, handshake, subscription), (count, ts))| Subscription {
                source,
                handshake,
                subscription,
                count,
                last_seen: ts.and_then(DateTime::from_timestamp_millis),
            },
        )
        .collect())
}
