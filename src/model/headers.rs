//! Header names of the records HELIOS writes: the raw-record contract (what the ingress lands),
//! the fan-out lineage, the DLQ's reason headers, and the markers of redrives and replays.
//! Every module that reads or writes one of these names takes it from here.

/// Headers of a raw record (`helios.raw.<source>`), set by the ingress.
pub mod raw {
    pub const SOURCE: &str = "helios-source";
    pub const RECEIVED_AT: &str = "helios-received-at";
    pub const REQUEST_ID: &str = "helios-request-id";
    /// Which endpoint received it (`eventbridge`, `sns`, `pubsub`, `eventgrid`, `ingest`).
    pub const ENDPOINT: &str = "helios-endpoint";
    /// `event` or `handshake`.
    pub const KIND: &str = "helios-kind";
    /// Which handshake a record holds (`sns-subscription-confirmation`, ...). Also set on an
    /// Event Grid delivery that mixes a validation event with business events (kind `event`).
    pub const HANDSHAKE: &str = "helios-handshake";
    pub const CONTENT_TYPE: &str = "content-type";
}

/// Lineage headers of a fan-out record: where its raw record is.
pub mod lineage {
    pub const SOURCE: &str = "helios-source";
    pub const RAW_TOPIC: &str = "helios-raw-topic";
    pub const RAW_PARTITION: &str = "helios-raw-partition";
    pub const RAW_OFFSET: &str = "helios-raw-offset";
    pub const RAW_INDEX: &str = "helios-raw-index";
    /// When the ingress received the event (RFC 3339): the clock HELIOS trusts.
    pub const INGESTED_AT: &str = "helios-ingested-at";
}

/// Headers the processor adds to a DLQ record (the raw record's own headers are kept).
pub mod dlq {
    /// Every DLQ header starts with this; a redrive strips them.
    pub const PREFIX: &str = "helios-dlq-";
    pub const REASON: &str = "helios-dlq-reason";
    pub const DETAIL: &str = "helios-dlq-detail";
    pub const STAGE: &str = "helios-dlq-stage";
    pub const FIELD: &str = "helios-dlq-field";
    /// The first failing event of the record (arrays carry several).
    pub const EVENT_INDEX: &str = "helios-dlq-event-index";
    /// How many events of the record failed.
    pub const FAILED_COUNT: &str = "helios-dlq-failed-count";
    /// JSON list of the failing events: `[{"index":0,"reason":"…","stage":"…"},…]`, bounded.
    pub const FAILURES: &str = "helios-dlq-failures";
    pub const RAW_TOPIC: &str = "helios-dlq-raw-topic";
    pub const RAW_PARTITION: &str = "helios-dlq-raw-partition";
    pub const RAW_OFFSET: &str = "helios-dlq-raw-offset";
    pub const FAILED_AT: &str = "helios-dlq-failed-at";
    pub const SCHEMA_SUBJECT: &str = "helios-dlq-schema-subject";
    pub const SCHEMA_VERSION: &str = "helios-dlq-schema-version";
    /// For `sink_rejected`: the PostgreSQL SQLSTATE or the Kafka error code.
    pub const SINK_CODE: &str = "helios-dlq-sink-code";
    /// For a `too_large` reference record: the reason the record was dead-lettered for.
    pub const ORIGINAL_REASON: &str = "helios-dlq-original-reason";
}

/// Set on records redriven from the DLQ: `topic/partition/offset` of the original raw record.
pub const REDRIVE_OF: &str = "helios-redrive-of";
/// Counts how many times a record was redriven.
pub const REDRIVE_COUNT: &str = "helios-redrive-count";
/// When a record was redriven.
pub const REDRIVEN_AT: &str = "helios-redriven-at";
/// On records (re-)emitted by `helios replay`.
pub const REPLAY_ID: &str = "helios-replay-id";
