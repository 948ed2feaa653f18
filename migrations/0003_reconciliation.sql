-- Reconciliation (`helios reconcile`): what is known of each flow instance (one order in one
-- flow), and one row per outcome.
CREATE TABLE IF NOT EXISTS flow_state (
    flow        text        NOT NULL,
    flow_key    text        NOT NULL,
    -- The fan-out partition of the key (the same on every step topic): the instance that owns
    -- it fires the deadlines.
    part        integer     NOT NULL,
    -- The events counted (step, cloud, event id, event time, fan-out and raw coordinates), the
    -- steps reported missing, whether an orphan was reported.
    state       jsonb       NOT NULL,
    -- The earliest deadline not yet fired (NULL: nothing pending).
    next_due    timestamptz,
    completed   boolean     NOT NULL DEFAULT false,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (flow, flow_key)
);
CREATE INDEX IF NOT EXISTS flow_state_due ON flow_state (flow, part, next_due) WHERE next_due IS NOT NULL;
CREATE INDEX IF NOT EXISTS flow_state_updated ON flow_state (updated_at);

-- One row per (flow, key, outcome, step): written with the state change that detected it, so a
-- crash, a rebalance or a replay never writes it twice.
CREATE TABLE IF NOT EXISTS reconciliation_results (
    id           bigserial   PRIMARY KEY,
    flow         text        NOT NULL,
    flow_key     text        NOT NULL,
    outcome      text        NOT NULL CHECK (outcome IN ('completed', 'missing', 'late', 'out_of_order', 'duplicate_step', 'orphan')),
    step         text        NOT NULL DEFAULT '',
    event_time   timestamptz,
    duration_ms  bigint,
    detail       jsonb       NOT NULL DEFAULT '{}',
    detected_at  timestamptz NOT NULL DEFAULT now(),
    -- A `missing` whose step arrived late, an `orphan` whose first step arrived.
    resolved_at  timestamptz,
    UNIQUE (flow, flow_key, outcome, step)
);
CREATE INDEX IF NOT EXISTS reconciliation_results_detected ON reconciliation_results (detected_at);
