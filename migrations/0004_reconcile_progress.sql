-- Per reconciler group and fan-out topic-partition: who may write for it, and how far event
-- time had come as of the offsets committed.
-- * `generation` is raised by every instance that is assigned the partition (at a restart or a
--   rebalance) before it reads any state; every write of the reconciler checks, in its own
--   transaction, that the generation is still the one it claimed. A write from an instance the
--   partition was taken from (late, paused, or killed mid-flight) changes nothing, so it never
--   overwrites what the new owner wrote.
-- * `newest_event_time` is written with the states: the instance assigned the partition next
--   goes on from there (the records read before are not read again; without it the watermark
--   would start over from the records that come next, and deadlines already passed would
--   never fire).
CREATE TABLE IF NOT EXISTS reconcile_progress (
    consumer_group    text        NOT NULL,
    topic             text        NOT NULL,
    part              integer     NOT NULL,
    generation        bigint      NOT NULL DEFAULT 1,
    newest_event_time timestamptz,
    -- The offset after the last record counted (informational: Kafka's committed offset is
    -- where reading resumes).
    next_offset       bigint,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, part)
);
