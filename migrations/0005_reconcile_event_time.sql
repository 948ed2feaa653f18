-- Reconciliation you can trust after an outage (event time that waits for every source,
-- retractions, an outbox for `helios.reconciliation`).
--
-- New outcomes: `arrived_late` (a step reported missing came after all: supersedes the
-- `missing`), `ended` (a terminal event type of the flow), `mismatch` (two steps disagree on a
-- `match` field).
ALTER TABLE reconciliation_results DROP CONSTRAINT IF EXISTS reconciliation_results_outcome_check;
ALTER TABLE reconciliation_results ADD CONSTRAINT reconciliation_results_outcome_check CHECK (outcome IN
    ('completed', 'missing', 'late', 'arrived_late', 'out_of_order', 'duplicate_step', 'orphan', 'ended', 'mismatch'));
-- The outbox: an outcome is published to `helios.reconciliation` after the transaction that
-- wrote it, from the row (its `id` is the record's stable id), and marked published then. A crash
-- in between publishes it again (a duplicate, never an invention). Rows written before this
-- migration were published with their transaction.
ALTER TABLE reconciliation_results ADD COLUMN IF NOT EXISTS part integer;
ALTER TABLE reconciliation_results ADD COLUMN IF NOT EXISTS published_at timestamptz;
UPDATE reconciliation_results SET published_at = detected_at WHERE published_at IS NULL;
CREATE INDEX IF NOT EXISTS reconciliation_results_unpublished ON reconciliation_results (part, id)
    WHERE published_at IS NULL;
-- Event time reached per cloud on each fan-out topic-partition (as of the offsets committed):
-- the instance assigned the partition next takes it over, so a lagging cloud goes on holding
-- event time back across a restart.
CREATE TABLE IF NOT EXISTS reconcile_sources (
    consumer_group    text        NOT NULL,
    topic             text        NOT NULL,
    part              integer     NOT NULL,
    source            text        NOT NULL,
    newest_event_time timestamptz NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, part, source)
);
-- Per flow and partition: the watermark reached (it never goes back, also across a restart)
-- and what held it (`helios status` shows it).
CREATE TABLE IF NOT EXISTS reconcile_watermarks (
    consumer_group text        NOT NULL,
    flow           text        NOT NULL,
    part           integer     NOT NULL,
    watermark      timestamptz NOT NULL,
    held_by        text        NOT NULL DEFAULT '',
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, flow, part)
);
