//! What the reconciler reads from a fan-out record: the event's type, id, cloud, event time and
//! order id, from the CloudEvents and lineage headers (the value is read only when the key
//! could be the event id rather than an order id).

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use rdkafka::message::{Headers, Message};

use super::engine::Sighting;
use crate::model::headers::lineage;
use crate::pipeline::guard::MAX_ID_BYTES;

/// A fan-out event as the reconciler sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub order_id: String,
    pub sighting: Sighting,
    /// When the ingress received it (the `helios-ingested-at` header, else the record's
    /// timestamp).
    pub ingested_at: DateTime<Utc>,
}

impl Seen {
    /// The event time to count under `max_clock_skew`: the event's `occurred_at`, unless it is
    /// further ahead of its reception than that (a wrong or hostile clock): then the reception
    /// time, with the claimed time kept as `untrusted_occurred_at`.
    pub fn trust(&self, max_clock_skew: std::time::Duration) -> Sighting {
        let mut s = self.sighting.clone();
        let skew = chrono::Duration::from_std(max_clock_skew).unwrap_or_default();
        if s.occurred_at > self.ingested_at + skew {
            s.untrusted_occurred_at = Some(s.occurred_at);
            s.occurred_at = self.ingested_at;
        }
        s
    }
}

/// Why a record is not counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// Not a HELIOS fan-out record (headers missing or unreadable).
    NotAnEvent,
    /// The event has no order id.
    NoKey,
    /// An id longer than the processor ever writes ([`MAX_ID_BYTES`]): not from HELIOS.
    TooLong,
    /// A new order on a partition that has `max_open_per_partition` open already.
    InstanceCap,
}

impl Skip {
    pub fn as_str(self) -> &'static str {
        match self {
            Skip::NotAnEvent => "not_an_event",
            Skip::NoKey => "no_order_id",
            Skip::TooLong => "id_too_long",
            Skip::InstanceCap => "instance_cap",
        }
    }
}

fn header<'a, M: Message>(m: &'a M, name: &str) -> Option<&'a str> {
    m.headers()?
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

#[derive(serde::Deserialize)]
struct OrderOnly {
    order_id: Option<String>,
}

/// Largest field value kept for a `match` check (bytes of its JSON).
const MAX_FIELD_BYTES: usize = 256;

/// The `match` fields an event has: `data.<field>`, else the canonical event's own field.
fn match_fields(payload: &[u8], fields: &[String]) -> BTreeMap<String, serde_json::Value> {
    let mut out = BTreeMap::new();
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(payload) else {
        return out;
    };
    for f in fields {
        let found = v
            .get("data")
            .and_then(|d| d.get(f))
            .or_else(|| v.get(f))
            .filter(|x| !x.is_null());
        if let Some(x) = found {
            if x.to_string().len() <= MAX_FIELD_BYTES {
                out.insert(f.clone(), x.clone());
            }
        }
    }
    out
}

/// Reads one fan-out record; `fields` are the `match` fields of the flows reading its topic.
pub fn read<M: Message>(m: &M, now: DateTime<Utc>, fields: &[String]) -> Result<Seen, Skip> {
    let event_type = header(m, "ce_type").ok_or(Skip::NotAnEvent)?;
    let event_id = header(m, "ce_id").ok_or(Skip::NotAnEvent)?;
    let source = header(m, lineage::SOURCE).ok_or(Skip::NotAnEvent)?;
    let occurred_at = header(m, "ce_time")
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .ok_or(Skip::NotAnEvent)?;
    let key = m
        .key()
        .and_then(|k| std::str::from_utf8(k).ok())
        .ok_or(Skip::NoKey)?;
    // The fan-out key is the order id, else the event id: only then is the value needed.
    let order_id = if key != event_id {
        key.to_string()
    } else {
        let json = header(m, "content-type").is_some_and(|c| c.contains("json"));
        m.payload()
            .filter(|_| json)
            .and_then(|v| serde_json::from_slice::<OrderOnly>(v).ok())
            .and_then(|o| o.order_id)
            .ok_or(Skip::NoKey)?
    };
    if order_id.len() > MAX_ID_BYTES || event_id.len() > MAX_ID_BYTES || source.len() > 16 {
        return Err(Skip::TooLong);
    }
    // PostgreSQL stores no NUL in text or JSON: such an event could never be written (the
    // processor never fans one out; another producer might).
    if [order_id.as_str(), event_id, source]
        .iter()
        .any(|s| s.contains('\0'))
    {
        return Err(Skip::NotAnEvent);
    }
    let raw = match (
        header(m, lineage::RAW_TOPIC),
        header(m, lineage::RAW_PARTITION),
        header(m, lineage::RAW_OFFSET),
    ) {
        (Some(t), Some(p), Some(o)) => Some(format!("{t}/{p}/{o}")),
        _ => None,
    };
    let ingested_at = header(m, lineage::INGESTED_AT)
        .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
        .map(|t| t.with_timezone(&Utc))
        .or_else(|| {
            m.timestamp()
                .to_millis()
                .and_then(DateTime::from_timestamp_millis)
        })
        .unwrap_or(now);
    let fields = if fields.is_empty() {
        BTreeMap::new()
    } else {
        m.payload()
            .map(|v| match_fields(v, fields))
            .unwrap_or_default()
    };
    Ok(Seen {
        order_id,
        ingested_at,
        sighting: Sighting {
            step: event_type.to_string(),
            source: source.to_string(),
            event_id: event_id.to_string(),
            occurred_at,
            untrusted_occurred_at: None,
            fields,
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            raw,
            seen_at: now,
        },
    })
}
