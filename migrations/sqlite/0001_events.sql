-- The embedded (demo) store: the same `events` table as PostgreSQL, in SQLite.
CREATE TABLE IF NOT EXISTS events (
    source        TEXT    NOT NULL,
    event_id      TEXT    NOT NULL,
    event_type    TEXT    NOT NULL,
    occurred_at   TEXT    NOT NULL,
    ingested_at   TEXT    NOT NULL,
    processed_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    data          TEXT    NOT NULL,
    metadata      TEXT    NOT NULL DEFAULT '{}',
    order_id      TEXT GENERATED ALWAYS AS (coalesce(json_extract(data, '$.order_id'), json_extract(data, '$.orderId'))) STORED,
    customer_id   TEXT GENERATED ALWAYS AS (coalesce(json_extract(data, '$.customer_id'), json_extract(data, '$.customerId'))) STORED,
    raw_topic     TEXT    NOT NULL,
    raw_partition INTEGER NOT NULL,
    raw_offset    INTEGER NOT NULL,
    raw_index     INTEGER NOT NULL DEFAULT 0,
    replay_id     TEXT,
    PRIMARY KEY (source, event_id)
);
CREATE INDEX IF NOT EXISTS events_order_id_idx ON events (order_id);
CREATE INDEX IF NOT EXISTS events_customer_id_idx ON events (customer_id);
CREATE INDEX IF NOT EXISTS events_type_time_idx ON events (event_type, occurred_at);

CREATE TABLE IF NOT EXISTS replay_history (
    replay_id     TEXT PRIMARY KEY,
    started_at    TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    finished_at   TEXT,
    requested_by  TEXT NOT NULL,
    topics        TEXT NOT NULL,
    range_from    TEXT,
    range_to      TEXT,
    filters       TEXT NOT NULL DEFAULT '{}',
    dedup_policy  TEXT NOT NULL,
    dry_run       INTEGER NOT NULL DEFAULT 0,
    counts        TEXT NOT NULL DEFAULT '{}',
    outcome       TEXT NOT NULL DEFAULT 'running',
    error         TEXT
);
