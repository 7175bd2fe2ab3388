-- creditsync reference schema for the app database (MySQL 8.0.17+ / MariaDB 10.3+, InnoDB).
-- Idempotent: tables are CREATE TABLE IF NOT EXISTS with their indexes inline (MySQL has
-- no CREATE INDEX IF NOT EXISTS), so applying the file twice is a no-op. The loader splits
-- statements on a ';' at the end of a line, so no statement may contain a ';' of its own.
--
-- Text is utf8mb4 under a *binary, NO PAD* collation, so ids compare exactly as on
-- PostgreSQL and SQLite: 'abc', 'ABC', 'abc ' and 'abç' are four different ids.
-- utf8mb4_bin is not enough: it is PAD SPACE ('abc' = 'abc '). The exact collation has a
-- different name per server, chosen by version comments that each server reads its own way:
-- /*M!100202 ... */ runs on MariaDB only (utf8mb4_nopad_bin), /*!80017 ... */ on MySQL
-- 8.0.17+ only (utf8mb4_0900_bin; MariaDB ignores MySQL 8 version comments).
-- Keys are VARCHAR: ids up to 256 characters (creditsync's own limit, ids.py) are 1,024
-- bytes, under InnoDB's 3,072-byte key limit with ROW_FORMAT=DYNAMIC.
--
-- Timestamps are DATETIME(6) holding UTC, never converted by the server (TIMESTAMP would
-- convert through the session's time zone and end in 2038). Their defaults are
-- UTC_TIMESTAMP(6), not CURRENT_TIMESTAMP, so rows an app inserts from a session in
-- another time zone are stamped in UTC too. creditsync's own sessions run at '+00:00'.

CREATE TABLE IF NOT EXISTS plans (
    plan_id      VARCHAR(256) NOT NULL,
    credits      INT          NOT NULL,
    is_free      BOOLEAN      NOT NULL,
    -- MySQL has no partial unique index: this generated column is 1 for the free plan and
    -- NULL for every other one, and a UNIQUE index allows any number of NULLs -- so at
    -- most one plan is the free plan. Name your columns when inserting into plans.
    free_plan_marker TINYINT GENERATED ALWAYS AS (IF(is_free, 1, NULL)) STORED,
    PRIMARY KEY (plan_id),
    UNIQUE KEY ux_plans_single_free (free_plan_marker),
    CONSTRAINT ck_plans_credits CHECK (credits >= 0)
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC
  DEFAULT CHARACTER SET utf8mb4 COLLATE /*M!100202 utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */;

-- No foreign key to plans: an app may hold a plan billing does not know; the
-- reconciler reports it instead of the database refusing it.
CREATE TABLE IF NOT EXISTS instances (
    instance_id    VARCHAR(256) NOT NULL,
    plan_id        VARCHAR(256) NOT NULL,
    credits_total  INT          NOT NULL,
    credits_used   INT          NOT NULL DEFAULT 0,
    created_at     DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    updated_at     DATETIME(6)  NULL     DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (instance_id),
    KEY ix_instances_created_at (created_at)
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC
  DEFAULT CHARACTER SET utf8mb4 COLLATE /*M!100202 utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */;

-- Later columns (claimed_by, claimed_until) are added by 002_webhook_leases.sql.
-- instance_id is TEXT here: a webhook may name an id no instance can have (too long); it
-- lands and is marked unknown_instance instead of being refused until the provider gives up.
CREATE TABLE IF NOT EXISTS billing_webhook_events (
    id            BIGINT       NOT NULL AUTO_INCREMENT,
    event_id      VARCHAR(512) NOT NULL,
    instance_id   TEXT,
    event_type    TEXT         NOT NULL,
    payload       MEDIUMTEXT,
    received_at   DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    processed_at  DATETIME(6)  NULL,
    outcome       TEXT,
    attempts      INT          NOT NULL DEFAULT 0,
    PRIMARY KEY (id),
    UNIQUE KEY ux_billing_webhook_events_event_id (event_id),
    -- The webhook sensor scans only the rows still waiting to be processed, lowest id
    -- first: (processed_at, id) serves "processed_at IS NULL ORDER BY id" (no partial
    -- indexes here).
    KEY ix_billing_webhook_events_unprocessed (processed_at, id)
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC
  DEFAULT CHARACTER SET utf8mb4 COLLATE /*M!100202 utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */;

-- One row per applied correction, written in the same transaction as the correction.
-- `trigger` is a reserved word in MySQL: always quoted.
CREATE TABLE IF NOT EXISTS credit_sync_audit (
    id                 BIGINT       NOT NULL AUTO_INCREMENT,
    run_id             VARCHAR(256) NOT NULL,
    `trigger`          VARCHAR(64)  NOT NULL,
    instance_id        VARCHAR(256) NOT NULL,
    old_plan_id        VARCHAR(256),
    new_plan_id        VARCHAR(256) NOT NULL,
    old_credits_total  INT,
    new_credits_total  INT          NOT NULL,
    reason             TEXT,
    applied_at         DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (id),
    KEY ix_credit_sync_audit_instance_id (instance_id),
    KEY ix_credit_sync_audit_run_id (run_id)
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC
  DEFAULT CHARACTER SET utf8mb4 COLLATE /*M!100202 utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */;
