-- The reconciler's write path, cheaper per outcome and per instance.
--
-- The outbox keeps, per partition, the id up to which every outcome was published
-- (`published_through`) instead of marking each row: the owner of a partition is the only writer
-- of its outcomes (fenced), one write at a time, so a partition's ids only grow, and "every row up
-- to this id was published" is one number per partition. The sweep publishes the rows above it.
CREATE TABLE IF NOT EXISTS reconcile_outbox (
    part              integer     PRIMARY KEY,
    published_through bigint      NOT NULL,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
INSERT INTO reconcile_outbox (part, published_through)
SELECT part, COALESCE(min(id) FILTER (WHERE published_at IS NULL) - 1, max(id))
FROM reconciliation_results WHERE part IS NOT NULL GROUP BY part
ON CONFLICT (part) DO NOTHING;
DROP INDEX IF EXISTS reconciliation_results_unpublished;
ALTER TABLE reconciliation_results DROP COLUMN IF EXISTS published_at;
-- An instance's state is HELIOS's own (read and written whole, never queried inside): text,
-- not jsonb, saves PostgreSQL the parse on every upsert and the conversion on every load.
-- (Rewrites the table once.)
ALTER TABLE flow_state ALTER COLUMN state TYPE text USING state::text;
