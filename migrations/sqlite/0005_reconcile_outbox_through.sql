-- As PostgreSQL's 0006: the outbox keeps, per partition, the id up to which every outcome was
-- published, instead of a mark per row.
CREATE TABLE IF NOT EXISTS reconcile_outbox (
    part              INTEGER PRIMARY KEY,
    published_through INTEGER NOT NULL,
    updated_at        TEXT    NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
INSERT OR IGNORE INTO reconcile_outbox (part, published_through)
SELECT part, COALESCE(min(CASE WHEN published_at IS NULL THEN id END) - 1, max(id))
FROM reconciliation_results WHERE part IS NOT NULL GROUP BY part;
ALTER TABLE reconciliation_results DROP COLUMN published_at;
