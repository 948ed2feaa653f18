//! DLQ records: at most one per raw record, whatever failed in it. The record is the raw record
//! unchanged (value, key, its own headers) plus bounded `helios-dlq-*` headers: the first
//! failure's reason, stage, detail and field, how many events of the record failed, and a bounded
//! JSON list of the failing indices and reasons. So a DLQ record is never larger than its raw
//! record plus a small constant, and an array whose every element fails costs one record.
//!
//! A DLQ record that still cannot be written (its raw record was larger than HELIOS may write)
//! becomes a *reference record*: no value, only the headers, with reason `too_large` and the raw
//! record's coordinates, so nothing stalls and nothing is lost (the raw topic keeps the value).
//! A reference record refused for its data in turn becomes a *minimal record*: the reason, the
//! stage and the coordinates, nothing echoed from the request.

use chrono::SecondsFormat;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::FutureRecord;

use crate::limits::SizeLimits;
use crate::model::headers::dlq as h;
use crate::model::text::bounded;
use crate::model::{DlqReason, DlqStage, RawRecord, Refusal};

/// Longest `helios-dlq-detail` value, in bytes (longer ones are cut, with a marker).
pub const DETAIL_MAX: usize = 1024;
/// Longest value of the other echoed headers (field, schema subject/version, sink code).
pub const VALUE_MAX: usize = 256;
/// Longest `helios-dlq-failures` list, in bytes.
pub const FAILURES_MAX: usize = 4096;

/// One refused unit: a whole raw record (`index` none) or one event of it.
#[derive(Debug, Clone)]
pub struct DlqItem {
    /// Position of the raw record in its batch.
    pub record: usize,
    /// Which event of the raw record (arrays carry several); none: the record as a whole.
    pub index: Option<u32>,
    pub refusal: Refusal,
}

/// The headers of the DLQ record of `raw`, whose refused units are `items` (at least one).
pub fn record_headers(raw: &RawRecord, items: &[&DlqItem]) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(raw.headers.len() + 12);
    for (k, v) in &raw.headers {
        if !k.starts_with(h::PREFIX) {
            h = h.insert(Header {
                key: k,
                value: Some(v.as_slice()),
            });
        }
    }
    append(h, &dlq_pairs(raw, items))
}

/// The headers of the reference record written instead of a DLQ record of `size` bytes that
/// could not be written (`error`: what the broker or the limit said).
pub fn reference_headers(
    raw: &RawRecord,
    items: &[&DlqItem],
    size: usize,
    error: &str,
) -> OwnedHeaders {
    let first = &items[0].refusal;
    let tl = Refusal::new(
        DlqReason::TooLarge,
        DlqStage::Dlq,
        format!(
            "the DLQ copy of this raw record ({size} bytes) could not be written ({error}); \
             its value stays in the raw topic at the coordinates below. It was refused for: {}",
            first.detail
        ),
    );
    let reference = DlqItem {
        record: items[0].record,
        index: items[0].index,
        refusal: tl,
    };
    let mut pairs = dlq_pairs(raw, &[&reference]);
    pairs.push((h::ORIGINAL_REASON, first.reason.as_str().to_string()));
    if items.len() > 1 {
        pairs.push((h::FAILED_COUNT, items.len().to_string()));
        pairs.push((h::FAILURES, failures_json(items)));
    }
    append(OwnedHeaders::new_with_capacity(pairs.len()), &pairs)
}

/// How a raw record's DLQ record is written: whole, as a reference record (the whole one was over
/// the limit or refused; `why`), or as a minimal record (the reference record was refused too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DlqForm {
    Full,
    Reference(String),
    Minimal(String),
}

impl DlqForm {
    /// The next smaller form after a refusal for its data (`None`: there is none).
    pub fn smaller(&self, why: String) -> Option<DlqForm> {
        match self {
            DlqForm::Full => Some(DlqForm::Reference(why)),
            DlqForm::Reference(_) => Some(DlqForm::Minimal(why)),
            DlqForm::Minimal(_) => None,
        }
    }
}

/// The DLQ record of `raw` for its refused `items`, in `form`; a whole copy over the output limit
/// is written as a reference record instead.
pub fn record<'a>(
    topic: &'a str,
    raw: &'a RawRecord,
    items: &[&DlqItem],
    form: &DlqForm,
    limits: &SizeLimits,
) -> FutureRecord<'a, [u8], [u8]> {
    let reference = |why: &str, size: usize| {
        FutureRecord::to(topic)
            .payload(&[][..])
            .headers(reference_headers(raw, items, size, why))
    };
    match form {
        DlqForm::Full => {
            let full = record_headers(raw, items);
            let size = record_size(raw, &full);
            let limit = limits.output_record_max();
            if size > limit {
                return reference(
                    &format!("{size} bytes is over the {limit}-byte limit"),
                    size,
                );
            }
            let r = FutureRecord::to(topic)
                .payload(raw.value.as_slice())
                .headers(full);
            match &raw.key {
                Some(k) => r.key(k.as_slice()),
                None => r,
            }
        }
        DlqForm::Reference(why) => {
            let size = record_size(raw, &record_headers(raw, items));
            reference(why, size)
        }
        DlqForm::Minimal(why) => FutureRecord::to(topic)
            .payload(&[][..])
            .headers(minimal_headers(raw, items, why)),
    }
}

/// The headers of a minimal record: the first unit's reason and stage, the raw record's
/// coordinates, and why the reference record could not be written (bounded), nothing else.
pub fn minimal_headers(raw: &RawRecord, items: &[&DlqItem], why: &str) -> OwnedHeaders {
    let first = &items[0].refusal;
    let pairs: Vec<(&str, String)> = vec![
        (h::REASON, first.reason.as_str().to_string()),
        (h::STAGE, first.stage.as_str().to_string()),
        (
            h::DETAIL,
            format!(
                "minimal record: the DLQ and reference records of this raw record were refused ({})",
                bounded(why, 256)
            ),
        ),
        (h::RAW_TOPIC, raw.topic.clone()),
        (h::RAW_PARTITION, raw.partition.to_string()),
        (h::RAW_OFFSET, raw.offset.to_string()),
        (h::FAILED_COUNT, items.len().to_string()),
    ];
    append(OwnedHeaders::new_with_capacity(pairs.len()), &pairs)
}

/// Bytes a record with this value, key and headers occupies, for the size check.
pub fn record_size(raw: &RawRecord, headers: &OwnedHeaders) -> usize {
    use rdkafka::message::Headers;
    raw.value.len()
        + raw.key.as_ref().map_or(0, Vec::len)
        + headers
            .iter()
            .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len) + 8)
            .sum::<usize>()
}

fn dlq_pairs(raw: &RawRecord, items: &[&DlqItem]) -> Vec<(&'static str, String)> {
    let first = &items[0].refusal;
    let mut detail = first.detail.clone();
    if items.len() > 1 {
        detail = format!(
            "{} (and {} more failing event(s) of this record, see {})",
            bounded(&detail, DETAIL_MAX - 96),
            items.len() - 1,
            h::FAILURES
        );
    }
    let now = chrono::Utc::now().to_rfc3339_opts(SecondsFormat::Millis, true);
    let mut pairs: Vec<(&'static str, String)> = vec![
        (h::REASON, first.reason.as_str().to_string()),
        (h::STAGE, first.stage.as_str().to_string()),
        (h::DETAIL, bounded(&detail, DETAIL_MAX).into_owned()),
        (h::RAW_TOPIC, raw.topic.clone()),
        (h::RAW_PARTITION, raw.partition.to_string()),
        (h::RAW_OFFSET, raw.offset.to_string()),
        (h::FAILED_AT, now),
    ];
    if let Some(f) = &first.field {
        pairs.push((h::FIELD, bounded(f, VALUE_MAX).into_owned()));
    }
    if let Some(i) = items[0].index {
        pairs.push((h::EVENT_INDEX, i.to_string()));
    }
    if let Some((subject, version)) = first.schema.as_deref() {
        pairs.push((h::SCHEMA_SUBJECT, bounded(subject, VALUE_MAX).into_owned()));
        pairs.push((h::SCHEMA_VERSION, bounded(version, VALUE_MAX).into_owned()));
    }
    if let Some(code) = &first.sink_code {
        pairs.push((h::SINK_CODE, bounded(code, VALUE_MAX).into_owned()));
    }
    if items.len() > 1 {
        pairs.push((h::FAILED_COUNT, items.len().to_string()));
        pairs.push((h::FAILURES, failures_json(items)));
    }
    pairs
}

/// `[{"index":0,"reason":"…","stage":"…"},…]`, cut before FAILURES_MAX with `{"more":N}`.
fn failures_json(items: &[&DlqItem]) -> String {
    let mut out = String::from("[");
    for (n, it) in items.iter().enumerate() {
        let entry = serde_json::json!({
            "index": it.index,
            "reason": it.refusal.reason.as_str(),
            "stage": it.refusal.stage.as_str(),
        })
        .to_string();
        if n > 0 {
            out.push(',');
        }
        if out.len() + entry.len() + 32 > FAILURES_MAX {
            out.push_str(&format!("{{\"more\":{}}}", items.len() - n));
            break;
        }
        out.push_str(&entry);
    }
    out.push(']');
    out
}

fn append(mut h: OwnedHeaders, pairs: &[(&str, String)]) -> OwnedHeaders {
    for (k, v) in pairs {
        h = h.insert(Header {
            key: k,
            value: Some(v.as_str()),
        });
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    fn item(i: u32, detail: &str) -> DlqItem {
        DlqItem {
            record: 0,
            index: Some(i),
            refusal: Refusal::new(DlqReason::MissingEventType, DlqStage::Normalize, detail),
        }
    }

    #[test]
    fn a_refused_record_gets_smaller_until_it_is_minimal() {
        let raw = RawRecord {
            topic: "raw".into(),
            partition: 3,
            offset: 7,
            value: b"{}".to_vec(),
            headers: vec![("x-echoed".into(), b"v".to_vec())],
            ..Default::default()
        };
        let items = [item(0, "no type")];
        let refs: Vec<&DlqItem> = items.iter().collect();
        let limits = SizeLimits::default();
        let full = DlqForm::Full;
        let reference = full.smaller("refused".into()).unwrap();
        let minimal = reference.smaller("refused again".into()).unwrap();
        assert!(matches!(reference, DlqForm::Reference(_)));
        assert!(matches!(minimal, DlqForm::Minimal(_)));
        assert_eq!(minimal.smaller("and again".into()), None);
        let r = record("dlq", &raw, &refs, &minimal, &limits);
        assert_eq!(r.payload.map(<[u8]>::len), Some(0));
        let h = r.headers.unwrap();
        let get = |k: &str| {
            h.iter()
                .find(|x| x.key == k)
                .and_then(|x| x.value)
                .map(|v| String::from_utf8_lossy(v).to_string())
        };
        assert_eq!(get(h::REASON).as_deref(), Some("missing_event_type"));
        assert_eq!(get(h::RAW_OFFSET).as_deref(), Some("7"));
        assert_eq!(get("x-echoed"), None, "nothing of the request is echoed");
    }

    #[test]
    fn headers_stay_bounded_whatever_the_failures() {
        let raw = RawRecord {
            topic: "t".into(),
            value: vec![b'x'; 300_000],
            headers: vec![("helios-dlq-reason".into(), b"forged".to_vec())],
            ..Default::default()
        };
        let huge = "T".repeat(600_000);
        let items: Vec<DlqItem> = (0..100_000)
            .map(|i| item(i, if i == 0 { &huge } else { "no type" }))
            .collect();
        let refs: Vec<&DlqItem> = items.iter().collect();
        let h = record_headers(&raw, &refs);
        let extra = record_size(&raw, &h) - raw.value.len();
        assert!(extra < 8 * 1024, "DLQ headers are {extra} bytes");
        let forged = h.iter().filter(|x| x.key == "helios-dlq-reason").count();
        assert_eq!(
            forged, 1,
            "the raw record's own helios-dlq-* headers are dropped"
        );
        let failures = h.iter().find(|x| x.key == h::FAILURES).unwrap();
        let list: serde_json::Value = serde_json::from_slice(failures.value.unwrap()).unwrap();
        assert!(
            list.as_array().unwrap().last().unwrap()["more"]
                .as_u64()
                .unwrap()
                > 99_000
        );
    }
}
