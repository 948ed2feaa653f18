//! A record read from a raw topic: the exact request body plus the headers the ingress set.

use chrono::{DateTime, Utc};

use super::event::{parse_time, RawRef};
use super::headers;

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
        self.header(headers::raw::RECEIVED_AT)
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

    /// `topic/partition/offset` of the raw record this one stands for: for a record redriven
    /// from the DLQ, the original (so ids derived from a position stay the same); else itself.
    pub fn origin(&self) -> String {
        match self.header(headers::REDRIVE_OF) {
            Some(orig) if !orig.is_empty() && orig.len() <= 512 => orig.to_string(),
            _ => format!("{}/{}/{}", self.topic, self.partition, self.offset),
        }
    }

    /// Bytes this record holds in memory (value, key and headers), for batch budgets.
    pub fn size(&self) -> usize {
        self.value.len()
            + self.key.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}
