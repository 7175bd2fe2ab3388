-- A revert writes its audit rows with trigger 'revert' and reason 'revert of run <id>';
-- "was this run reverted already?" looks them up here instead of scanning the audit.
-- MySQL has no partial index: (trigger, reason prefix) narrows the look-up to the revert
-- rows just as well. MySQL has no CREATE INDEX IF NOT EXISTS either: init_db skips a
-- CREATE INDEX whose index already exists on the table (asked of the inspector).

CREATE INDEX ix_credit_sync_audit_reverts
    ON credit_sync_audit (`trigger`, reason(300));
