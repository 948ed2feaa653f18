-- One row per DLQ record sent back to its raw topic by `helios dlq redrive`, so a record is
-- redriven once unless --force is given.
CREATE TABLE IF NOT EXISTS dlq_redrives (
    dlq_topic      text        NOT NULL,
    dlq_partition  integer     NOT NULL,
    dlq_offset     bigint      NOT NULL,
    raw_topic      text        NOT NULL,
    raw_partition  integer     NOT NULL,
    raw_offset     bigint      NOT NULL,
    redrive_count  integer     NOT NULL,
    reason         text,
    redriven_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (dlq_topic, dlq_partition, dlq_offset)
);
