-- `helios dlq heal`: one row per run (its audit record), and which run chose each redrive.
CREATE TABLE IF NOT EXISTS dlq_heal_runs (
    id            bigserial PRIMARY KEY,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz,
    dry_run       boolean NOT NULL,
    -- ok, or the error that ended the run
    outcome       text NOT NULL DEFAULT 'running',
    examined      integer NOT NULL DEFAULT 0,
    healed        integer NOT NULL DEFAULT 0,
    still_failing integer NOT NULL DEFAULT 0,
    -- per reason: {"unknown_event_type": {"healed": 3, "still_failing": 1, "manual": 0, ...}}
    by_reason     jsonb NOT NULL DEFAULT '{}'::jsonb
);

ALTER TABLE dlq_redrives ADD COLUMN IF NOT EXISTS heal_run bigint;
