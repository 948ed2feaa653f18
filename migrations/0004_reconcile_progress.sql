-- How far event time had come on each fan-out topic-partition a reconciler group reads, as of
-- the offsets it committed (written in the same transaction as the states). A reconciler that
-- is assigned a partition — after a restart or a rebalance — takes the newest event time over
-- from here: the records read before are not read again, and without it the watermark would
-- start over from the records that come next (deadlines already passed would never fire).
CREATE TABLE IF NOT EXISTS reconcile_progress (
    consumer_group    text        NOT NULL,
    topic             text        NOT NULL,
    part              integer     NOT NULL,
    newest_event_time timestamptz NOT NULL,
    -- The offset after the last record counted (informational: Kafka's committed offset is
    -- where reading resumes).
    next_offset       bigint      NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, part)
);
