//! What becomes of a raw record that cannot (entirely) become events: the reason and the stage
//! that refused it, as they appear in the DLQ headers and the metrics.

use super::event::CanonicalEvent;

/// Why a raw record (or one event in it) went to the DLQ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqReason {
    InvalidJson,
    UnrecognizedPayload,
    InvalidPayload,
    MissingEventId,
    MissingEventType,
    UnknownSource,
    MissingRequiredField,
    SchemaViolation,
    UnknownEventType,
    /// A sink (PostgreSQL, Kafka) refused the event because of its data, or would have (a value
    /// PostgreSQL cannot hold, an id longer than its index allows).
    SinkRejected,
    /// A record over the size HELIOS may write (`HELIOS_MAX_BODY_BYTES` and what derives from it).
    TooLarge,
}

impl DlqReason {
    pub const ALL: [DlqReason; 11] = [
        DlqReason::InvalidJson,
        DlqReason::UnrecognizedPayload,
        DlqReason::InvalidPayload,
        DlqReason::MissingEventId,
        DlqReason::MissingEventType,
        DlqReason::UnknownSource,
        DlqReason::MissingRequiredField,
        DlqReason::SchemaViolation,
        DlqReason::UnknownEventType,
        DlqReason::SinkRejected,
        DlqReason::TooLarge,
    ];

    /// The value of the `helios-dlq-reason` header and the metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            DlqReason::InvalidJson => "invalid_json",
            DlqReason::UnrecognizedPayload => "unrecognized_payload",
            DlqReason::InvalidPayload => "invalid_payload",
            DlqReason::MissingEventId => "missing_event_id",
            DlqReason::MissingEventType => "missing_event_type",
            DlqReason::UnknownSource => "unknown_source",
            DlqReason::MissingRequiredField => "missing_required_field",
            DlqReason::SchemaViolation => "schema_violation",
            DlqReason::UnknownEventType => "unknown_event_type",
            DlqReason::SinkRejected => "sink_rejected",
            DlqReason::TooLarge => "too_large",
        }
    }

    /// Parses a header value.
    pub fn parse(s: &str) -> Option<DlqReason> {
        DlqReason::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// True for the reasons a deploy can cure (a type declared, a rule relaxed, a schema that
    /// now accepts the field) and that a check in memory can confirm: `helios dlq heal` retries
    /// only these. What no deploy cures (the bytes themselves are wrong: not JSON, no id, too
    /// large, a shape no normalizer knows) and what only a sink can judge (`sink_rejected`) is
    /// never healed; `helios dlq redrive` is there for a person who knows better.
    pub fn curable_by_deploy(self) -> bool {
        matches!(
            self,
            DlqReason::MissingRequiredField
                | DlqReason::SchemaViolation
                | DlqReason::UnknownEventType
        )
    }
}

/// The stage that refused a record: the value of `helios-dlq-stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum DlqStage {
    /// The body is not JSON.
    Parse,
    /// The envelope holds no usable event (id, type, shape).
    Normalize,
    /// A business rule or a payload schema refused it.
    Validate,
    /// No fan-out topic for its type.
    Route,
    /// PostgreSQL refused it (or would have).
    Store,
    /// The fan-out topic refused it (or would have: too large).
    Fanout,
    /// The DLQ copy itself could not be written whole (a reference record was written instead).
    Dlq,
}

impl DlqStage {
    pub fn as_str(self) -> &'static str {
        match self {
            DlqStage::Parse => "parse",
            DlqStage::Normalize => "normalize",
            DlqStage::Validate => "validate",
            DlqStage::Route => "route",
            DlqStage::Store => "store",
            DlqStage::Fanout => "fanout",
            DlqStage::Dlq => "dlq",
        }
    }
}

/// A normalization failure: the reason code, a human message, and which event of the record.
#[derive(Debug, Clone, PartialEq)]
pub struct NormalizeError {
    pub reason: DlqReason,
    pub detail: String,
    pub index: Option<u32>,
}

impl NormalizeError {
    pub fn new(reason: DlqReason, detail: impl Into<String>) -> Self {
        NormalizeError {
            reason,
            detail: detail.into(),
            index: None,
        }
    }

    pub fn at(mut self, index: u32) -> Self {
        self.index = Some(index);
        self
    }

    /// The stage this failure belongs to (`parse` for unreadable JSON, else `normalize`).
    pub fn stage(&self) -> DlqStage {
        if self.reason == DlqReason::InvalidJson {
            DlqStage::Parse
        } else {
            DlqStage::Normalize
        }
    }
}

/// What a raw record turned into.
#[derive(Debug, Clone, PartialEq)]
pub enum Normalized {
    /// A handshake kept for the audit trail: counted and skipped.
    Handshake,
    /// One result per event carried by the record (arrays carry several), and how many
    /// handshake elements it also held (an Event Grid delivery may mix a validation event
    /// with business events).
    Events {
        events: Vec<Result<CanonicalEvent, NormalizeError>>,
        handshakes: u32,
    },
    /// The record as a whole cannot be read.
    Failed(NormalizeError),
}

impl Normalized {
    /// A record of events only.
    pub fn events(events: Vec<Result<CanonicalEvent, NormalizeError>>) -> Self {
        Normalized::Events {
            events,
            handshakes: 0,
        }
    }
}

/// Why an event (or a whole raw record) was refused: what its DLQ record will say.
#[derive(Debug, Clone, PartialEq)]
pub struct Refusal {
    pub reason: DlqReason,
    pub stage: DlqStage,
    /// A human-readable sentence (bounded when written to a header).
    pub detail: String,
    /// The field at fault (rules, schemas, guards).
    pub field: Option<String>,
    /// For schema violations: (subject, version).
    pub schema: Option<Box<(String, String)>>,
    /// For sink refusals: the PostgreSQL SQLSTATE or the Kafka error code.
    pub sink_code: Option<String>,
}

impl Refusal {
    pub fn new(reason: DlqReason, stage: DlqStage, detail: impl Into<String>) -> Self {
        Refusal {
            reason,
            stage,
            detail: detail.into(),
            field: None,
            schema: None,
            sink_code: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    pub fn sink_code(mut self, code: impl Into<String>) -> Self {
        self.sink_code = Some(code.into());
        self
    }
}

impl From<NormalizeError> for Refusal {
    fn from(e: NormalizeError) -> Self {
        Refusal::new(e.reason, e.stage(), e.detail)
    }
}
