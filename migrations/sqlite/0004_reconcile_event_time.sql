-- As PostgreSQL's 0005: the outbox columns, event time per cloud, watermarks.
ALTER TABLE reconciliation_results ADD COLUMN part INTEGER;
ALTER TABLE reconciliation_results ADD COLUMN published_at TEXT;
UPDATE reconciliation_results SET published_at = detected_at WHERE published_at IS NULL;
CREATE TABLE IF NOT EXISTS reconcile_sources (
    consumer_group    TEXT    NOT NULL,
    topic             TEXT    NOT NULL,
    part              INTEGER NOT NULL,
    source            TEXT    NOT NULL,
    newest_event_time TEXT    NOT NULL,
    updated_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, part, source)
);
CREATE TABLE IF NOT EXISTS reconcile_watermarks (
    consumer_group TEXT    NOT NULL,
    flow           TEXT    NOT NULL,
    part           INTEGER NOT NULL,
    watermark      TEXT    NOT NULL,
    held_by        TEXT    NOT NULL DEFAULT '',
    updated_at     TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, flow, part)
);
