-- A revert writes its audit rows with trigger 'revert' and reason 'revert of run <id>';
-- "was this run reverted already?" looks them up here instead of scanning the audit.
-- Partial: only the (rare) revert rows are indexed. Idempotent (IF NOT EXISTS).

CREATE INDEX IF NOT EXISTS ix_credit_sync_audit_reverts
    ON credit_sync_audit (reason) WHERE "trigger" = 'revert';
