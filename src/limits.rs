//! Record sizes, all derived from one setting: `HELIOS_MAX_BODY_BYTES`, the largest request body
//! the ingress accepts. From it follow the largest raw record (the body plus its headers), the
//! output producer's `message.max.bytes` (a raw record plus the DLQ headers, so every DLQ copy of
//! a raw record fits), the size every fan-out record is checked against before it is sent, and
//! the `max.message.bytes` every topic must allow — checked at start-up, with an error that names
//! the settings when they disagree.

/// Room for a raw record's headers on top of its body (the ingress copies the cloud's delivery
/// headers: a Pub/Sub unwrapped push carries each of up to 100 attributes, 256-byte key and
/// 1,024-byte value, as a header; the HTTP server reads at most [`MAX_HEAD_BYTES`] of them).
pub const RAW_HEADER_ALLOWANCE: usize = 192 * 1024;
/// The most bytes of request line and headers the ingress reads per request (hyper's read
/// buffer): the Pub/Sub attributes above, with room to spare.
pub const MAX_HEAD_BYTES: usize = 176 * 1024;
/// The most header fields per request (Pub/Sub's 100 attributes plus the HTTP ones).
pub const MAX_HEADERS: usize = 192;
/// Default largest request body: a maximal Event Grid event (1 MB) in its array and envelope,
/// with room to spare (1 MiB exactly would refuse it with a 413 Event Grid never retries).
pub const DEFAULT_MAX_BODY_BYTES: usize = 1024 * 1024 + 128 * 1024;
/// Room for the headers the processor adds to a DLQ record (each bounded, see `pipeline::dlq`).
pub const DLQ_HEADER_ALLOWANCE: usize = 16 * 1024;
/// Kafka's framing of a one-record batch (batch header, record header, varints), rounded up.
pub const BATCH_OVERHEAD: usize = 1024;
/// Kafka's own default `message.max.bytes` (a topic without an override inherits it).
pub const KAFKA_DEFAULT_MAX_MESSAGE_BYTES: usize = 1_048_588;

/// The size limits of one deployment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeLimits {
    /// The largest request body the ingress accepts (`HELIOS_MAX_BODY_BYTES`).
    pub max_body_bytes: usize,
}

impl Default for SizeLimits {
    fn default() -> Self {
        SizeLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// What a topic holds, for its size requirement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// `helios.raw.<source>`: request bodies with their headers.
    Raw,
    /// `helios.dlq` and `helios.events.<Type>`: what the processor writes.
    Output,
}

impl SizeLimits {
    /// The largest raw record the ingress produces (its producer's `message.max.bytes`).
    pub fn raw_record_max(&self) -> usize {
        self.max_body_bytes + RAW_HEADER_ALLOWANCE
    }

    /// The largest record the processor produces (its producer's `message.max.bytes`): any raw
    /// record with DLQ headers fits; a fan-out record over it is dead-lettered as `too_large`.
    pub fn output_record_max(&self) -> usize {
        self.raw_record_max() + DLQ_HEADER_ALLOWANCE
    }

    /// The `max.message.bytes` a topic of `kind` must allow at least.
    pub fn required_topic_bytes(&self, kind: TopicKind) -> usize {
        BATCH_OVERHEAD
            + match kind {
                TopicKind::Raw => self.raw_record_max(),
                TopicKind::Output => self.output_record_max(),
            }
    }

    /// Checks one topic's `max.message.bytes` (`found`, and where that value came from).
    pub fn check_topic(
        &self,
        topic: &str,
        kind: TopicKind,
        found: usize,
        origin: &str,
    ) -> Result<(), String> {
        let need = self.required_topic_bytes(kind);
        if found >= need {
            return Ok(());
        }
        let what = match kind {
            TopicKind::Raw => format!(
                "the ingress accepts bodies of HELIOS_MAX_BODY_BYTES={} plus {} bytes of headers",
                self.max_body_bytes, RAW_HEADER_ALLOWANCE
            ),
            TopicKind::Output => format!(
                "the processor writes records of up to {} bytes (HELIOS_MAX_BODY_BYTES={} plus {} bytes of raw headers and {} of DLQ headers)",
                self.output_record_max(),
                self.max_body_bytes,
                RAW_HEADER_ALLOWANCE,
                DLQ_HEADER_ALLOWANCE
            ),
        };
        Err(format!(
            "topic {topic} allows max.message.bytes={found} ({origin}), but {what}: it needs at least {need}. \
             Raise max.message.bytes (topology.yaml `topic_config`, then `kafka-configs --alter` for existing topics) \
             or lower HELIOS_MAX_BODY_BYTES"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_derives_from_the_body_limit() {
        let l = SizeLimits::default();
        assert_eq!(l.raw_record_max(), 1_179_648 + 192 * 1024);
        // A maximal Event Grid event with its envelope fits; every record fits a 2 MiB topic.
        assert!(l.max_body_bytes > 1_048_576 + 4096);
        assert!(l.output_record_max() > l.raw_record_max());
        assert!(l.check_topic("t", TopicKind::Raw, 2_097_152, "x").is_ok());
        let err = l
            .check_topic(
                "helios.raw.aws",
                TopicKind::Raw,
                KAFKA_DEFAULT_MAX_MESSAGE_BYTES,
                "broker default",
            )
            .unwrap_err();
        assert!(err.contains("HELIOS_MAX_BODY_BYTES=1179648"), "{err}");
        assert!(err.contains("helios.raw.aws"), "{err}");
    }
}
