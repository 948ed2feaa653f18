-- Canonical events, one row per (source, event_id): the idempotency key of every write.
CREATE TABLE IF NOT EXISTS events (
    source        text        NOT NULL,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    occurred_at   timestamptz NOT NULL,
    ingested_at   timestamptz NOT NULL,
    processed_at  timestamptz NOT NULL DEFAULT now(),
    data          jsonb       NOT NULL,
    metadata      jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- Same rule as the processor: snake_case key first, then camelCase.
    order_id      text GENERATED ALWAYS AS (coalesce(data->>'order_id', data->>'orderId')) STORED,
    customer_id   text GENERATED ALWAYS AS (coalesce(data->>'customer_id', data->>'customerId')) STORED,
    -- Lineage: the raw record this row came from.
    raw_topic     text        NOT NULL,
    raw_partition integer     NOT NULL,
    raw_offset    bigint      NOT NULL,
    raw_index     integer     NOT NULL DEFAULT 0,
    replay_id     text,
    PRIMARY KEY (source, event_id)
);

CREATE INDEX IF NOT EXISTS events_order_id_idx ON events (order_id) WHERE order_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_customer_id_idx ON events (customer_id) WHERE customer_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS events_type_time_idx ON events (event_type, occurred_at);
CREATE INDEX IF NOT EXISTS events_occurred_at_idx ON events (occurred_at);

-- One row per `helios replay` run.
CREATE TABLE IF NOT EXISTS replay_history (
    replay_id     text        PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    requested_by  text        NOT NULL,
    topics        text[]      NOT NULL,
    range_from    text,
    range_to      text,
    filters       jsonb       NOT NULL DEFAULT '{}'::jsonb,
    dedup_policy  text        NOT NULL,
    dry_run       boolean     NOT NULL DEFAULT false,
    counts        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    outcome       text        NOT NULL DEFAULT 'running',
    error         text
);
