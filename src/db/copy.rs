//! PostgreSQL's binary `COPY` format for the `events` staging table: a header, one tuple per
//! event (field count, then each field as a length and its binary value), a trailer. Binary
//! avoids every text-format escaping question (tabs, backslashes, newlines in JSON) and lets the
//! server skip parsing of integers and timestamps.

use chrono::{DateTime, Utc};

use crate::model::CanonicalEvent;

/// `PGCOPY\n\377\r\n\0`, flags, header-extension length.
const HEADER: &[u8] = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0";
/// The staging table (session-local, emptied at each commit).
pub const STAGING_DDL: &str = "CREATE TEMP TABLE IF NOT EXISTS helios_events_staging (
    source text, event_id text, event_type text, occurred_at timestamptz, ingested_at timestamptz,
    data jsonb, metadata jsonb, raw_topic text, raw_partition int4, raw_offset int8, raw_index int4
) ON COMMIT DELETE ROWS";
/// The columns of a COPY tuple, in order.
macro_rules! copy_columns {
    () => {
        "source, event_id, event_type, occurred_at, ingested_at, data, metadata, raw_topic, raw_partition, raw_offset, raw_index"
    };
}
/// Loads a batch into the staging table.
pub const COPY_INTO_STAGING: &str = concat!(
    "COPY helios_events_staging (",
    copy_columns!(),
    ") FROM STDIN (FORMAT binary)"
);
/// Plain COPY straight into `events` (no conflict handling): the benchmark's PostgreSQL ceiling.
pub const COPY_INTO_EVENTS: &str = concat!(
    "COPY events (",
    copy_columns!(),
    ") FROM STDIN (FORMAT binary)"
);
/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01T00:00:00Z).
const PG_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// Encodes `events` as one binary COPY stream.
pub fn encode(events: &[&CanonicalEvent]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64 + events.len() * 512);
    buf.extend_from_slice(HEADER);
    for e in events {
        buf.extend_from_slice(&11i16.to_be_bytes());
        text(&mut buf, e.source.as_str());
        text(&mut buf, &e.event_id);
        text(&mut buf, &e.event_type);
        timestamp(&mut buf, e.occurred_at);
        timestamp(&mut buf, e.ingested_at);
        jsonb(&mut buf, |b| serde_json::to_writer(b, &e.data));
        jsonb(&mut buf, |b| serde_json::to_writer(b, &e.metadata));
        text(&mut buf, &e.raw.topic);
        field(&mut buf, &e.raw.partition.to_be_bytes());
        field(&mut buf, &e.raw.offset.to_be_bytes());
        field(&mut buf, &(e.raw.index as i32).to_be_bytes());
    }
    buf.extend_from_slice(&(-1i16).to_be_bytes());
    buf
}

fn field(buf: &mut Vec<u8>, value: &[u8]) {
    buf.extend_from_slice(&(value.len() as i32).to_be_bytes());
    buf.extend_from_slice(value);
}

fn text(buf: &mut Vec<u8>, s: &str) {
    field(buf, s.as_bytes());
}

fn timestamp(buf: &mut Vec<u8>, t: DateTime<Utc>) {
    field(buf, &(t.timestamp_micros() - PG_EPOCH_MICROS).to_be_bytes());
}

/// A jsonb field: version byte 1 and the JSON text, written in place (the length is patched in).
fn jsonb(buf: &mut Vec<u8>, write: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>) {
    let at = buf.len();
    buf.extend_from_slice(&0i32.to_be_bytes());
    buf.push(1);
    // Serializing a JSON value into a Vec cannot fail.
    let _ = write(buf);
    let len = (buf.len() - at - 4) as i32;
    buf[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tuple_has_eleven_length_prefixed_fields() {
        let e = crate::model::event::test_event("OrderPlaced", serde_json::json!({"a": "\t\\\n"}));
        let b = encode(&[&e]);
        assert!(b.starts_with(b"PGCOPY\n\xff\r\n\0"));
        assert_eq!(&b[19..21], &11i16.to_be_bytes());
        assert_eq!(&b[b.len() - 2..], &(-1i16).to_be_bytes());
        // source "direct": length 6, then the bytes.
        assert_eq!(&b[21..25], &6i32.to_be_bytes());
        assert_eq!(&b[25..31], b"direct");
    }
}
