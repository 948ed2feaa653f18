-- The reconciler's event-time progress per fan-out topic-partition (as PostgreSQL's).
CREATE TABLE IF NOT EXISTS reconcile_progress (
    consumer_group    TEXT    NOT NULL,
    topic             TEXT    NOT NULL,
    part              INTEGER NOT NULL,
    newest_event_time TEXT    NOT NULL,
    next_offset       INTEGER NOT NULL,
    updated_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
    PRIMARY KEY (consumer_group, topic, part)
);
