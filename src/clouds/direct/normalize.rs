//! Direct normalization (processor side): one event object or an array of them, each
//! self-describing (`event_type`, `event_id`, `occurred_at`, `data`).

use crate::model::draft::{generic_draft, json, object_or_array};
use crate::model::{DlqReason, NormalizeError, Normalized, RawRecord};
use crate::source::Source;

/// Normalizes a direct ingestion: one event object or an array of them. An event without an
/// id gets one derived from its raw record position (stable across reprocessing; send your own
/// `event_id` to have resubmissions deduplicated).
pub fn normalize(raw: &RawRecord) -> Normalized {
    let v = match json(&raw.value) {
        Ok(v) => v,
        Err(e) => return Normalized::Failed(e),
    };
    let items = match object_or_array(&v, "direct") {
        Ok(items) => items,
        Err(e) => return Normalized::Failed(e),
    };
    let out = items
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let i = i as u32;
            if !e.is_object() {
                return Err(NormalizeError::new(
                    DlqReason::UnrecognizedPayload,
                    "array element is not an event object",
                )
                .at(i));
            }
            let mut d = generic_draft(e);
            if d.event_id.is_none() {
                // From the original raw record's position, so a redriven copy derives the same id.
                d.event_id = Some(format!("raw-{}/{i}", raw.origin()));
            }
            d.finish(Source::Direct, raw, i)
        })
        .collect();
    Normalized::events(out)
}
