-- Reconciliation for the embedded demo: the same tables as PostgreSQL's (JSON as text).
CREATE TABLE IF NOT EXISTS flow_state (
    flow        TEXT    NOT NULL,
    flow_key    TEXT    NOT NULL,
    part        INTEGER NOT NULL,
    state       TEXT    NOT NULL,
    next_due    TEXT,
    completed   INTEGER NOT NULL DEFAULT 0,
    created_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    updated_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (flow, flow_key)
);
CREATE INDEX IF NOT EXISTS flow_state_due ON flow_state (flow, part, next_due);

CREATE TABLE IF NOT EXISTS reconciliation_results (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    flow         TEXT    NOT NULL,
    flow_key     TEXT    NOT NULL,
    outcome      TEXT    NOT NULL,
    step         TEXT    NOT NULL DEFAULT '',
    event_time   TEXT,
    duration_ms  INTEGER,
    detail       TEXT    NOT NULL DEFAULT '{}',
    detected_at  TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    resolved_at  TEXT,
    UNIQUE (flow, flow_key, outcome, step)
);
