-- The reconciler's claim and event-time progress per fan-out topic-partition (as PostgreSQL's).
CREATE TABLE IF NOT EXISTS reconcile_progress (
    consumer_group    TEXT    NOT NULL,
    topic             TEXT    NOT NULL,
    part              INTEGER NOT NULL,
    generation        INTEGER NOT NULL DEFAULT 1,
    newest_event_time TEXT,
    next_offset       INTEGER,
    updated_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, part)
);
