-- creditsync reference schema for the app database (SQLite).
-- Idempotent: every statement is CREATE ... IF NOT EXISTS, so applying the file
-- twice is a no-op. The loader splits statements on a ';' at the end of a line,
-- so no statement may contain a ';' of its own.
-- TEXT primary keys are declared NOT NULL: SQLite would otherwise accept NULL keys.
-- Timestamps are stored as UTC text ('YYYY-MM-DD HH:MM:SS[.ffffff]'), which
-- compares correctly as a string.

CREATE TABLE IF NOT EXISTS plans (
    plan_id  TEXT    PRIMARY KEY NOT NULL,
    credits  INTEGER NOT NULL CHECK (credits >= 0),
    is_free  BOOLEAN NOT NULL CHECK (is_free IN (0, 1))
);

-- At most one plan is the free plan.
CREATE UNIQUE INDEX IF NOT EXISTS ux_plans_single_free
    ON plans (is_free) WHERE is_free = 1;

-- No foreign key to plans: an app may hold a plan billing does not know; the
-- reconciler reports it instead of the database refusing it.
CREATE TABLE IF NOT EXISTS instances (
    instance_id    TEXT      PRIMARY KEY NOT NULL,
    plan_id        TEXT      NOT NULL,
    credits_total  INTEGER   NOT NULL,
    credits_used   INTEGER   NOT NULL DEFAULT 0,
    created_at     TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMP DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS ix_instances_created_at
    ON instances (created_at);

-- Later columns (claimed_by, claimed_until) are added by 002_webhook_leases.sql.
CREATE TABLE IF NOT EXISTS billing_webhook_events (
    id            INTEGER   PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT      NOT NULL UNIQUE,
    instance_id   TEXT,
    event_type    TEXT      NOT NULL,
    payload       TEXT,
    received_at   TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    processed_at  TIMESTAMP,
    outcome       TEXT,
    attempts      INTEGER   NOT NULL DEFAULT 0
);

-- The webhook sensor scans only the rows still waiting to be processed.
CREATE INDEX IF NOT EXISTS ix_billing_webhook_events_unprocessed
    ON billing_webhook_events (id) WHERE processed_at IS NULL;

-- One row per applied correction, written in the same transaction as the correction.
CREATE TABLE IF NOT EXISTS credit_sync_audit (
    id                 INTEGER   PRIMARY KEY AUTOINCREMENT,
    run_id             TEXT      NOT NULL,
    trigger            TEXT      NOT NULL,
    instance_id        TEXT      NOT NULL,
    old_plan_id        TEXT,
    new_plan_id        TEXT      NOT NULL,
    old_credits_total  INTEGER,
    new_credits_total  INTEGER   NOT NULL,
    reason             TEXT,
    applied_at         TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP
);

CREATE INDEX IF NOT EXISTS ix_credit_sync_audit_instance_id
    ON credit_sync_audit (instance_id);

CREATE INDEX IF NOT EXISTS ix_credit_sync_audit_run_id
    ON credit_sync_audit (run_id);
