-- Not a numbered migration: the partitioned layout of `events`, created by the take-over
-- (src/db/partitions.rs) when topology.yaml sets `events_table.partition`. The same columns as
-- 0001_events.sql; the primary key holds the partition key, `occurred_at` (an event keeps its
-- occurred_at, so the key stays idempotent; see the README's "Partitioned events table").
CREATE TABLE events (
    source        text        NOT NULL,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    ingested_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    data          jsonb       NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    order_id      text GENERATED ALWAYS AS (coalesce(data->>'order_id', data->>'orderId')) STORED,
    customer_id   text GENERATED ALWAYS AS (coalesce(data->>'customer_id', data->>'customerId')) STORED,
    raw_topic     text        NOT NULL,
    raw_partition integer     NOT NULL,
    raw_offset    bigint      NOT NULL,
    raw_index     integer     NOT NULL DEFAULT 0,
    replay_id     text,
    CONSTRAINT events_pkey PRIMARY KEY (source, event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);

CREATE INDEX events_order_id_idx ON events (order_id) WHERE order_id IS NOT NULL;
CREATE INDEX events_customer_id_idx ON events (customer_id) WHERE customer_id IS NOT NULL;
CREATE INDEX events_type_time_idx ON events (event_type, occurred_at);
CREATE INDEX events_occurred_at_idx ON events (occurred_at);

-- Rows no partition takes: older than every partition, or further ahead than `create_ahead`.
-- Watched: helios_events_default_partition_rows.
CREATE TABLE events_default PARTITION OF events DEFAULT;

-- The keys of events without a time of their own (occurred_at is then their raw record's receive
-- time, which a redelivery in another raw record does not share): claimed here, in the same
-- transaction as the row, by the raw record that wrote it. Narrow and unpartitioned, so one
-- lookup per key answers "stored already?" across every partition; rows past retention are
-- deleted by the partition maintenance.
CREATE TABLE IF NOT EXISTS events_timeless_keys (
    source        text        NOT NULL,
    event_id      text        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    raw_topic     text        NOT NULL,
    raw_partition integer     NOT NULL,
    raw_offset    bigint      NOT NULL,
    raw_index     integer     NOT NULL,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX IF NOT EXISTS events_timeless_keys_occurred_at_idx ON events_timeless_keys (occurred_at);
