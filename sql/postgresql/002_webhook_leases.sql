-- Webhook row leases. A receiver that just landed a row syncs it at
-- once; the webhook sensor, the backstop, never syncs a row another process holds:
-- claimed_by owns the row until claimed_until (UTC). Both NULL: nobody holds it.
-- A database created by an older 001 gains the columns here; init_db skips an
-- ALTER TABLE ... ADD COLUMN whose column already exists, so this file is idempotent.

ALTER TABLE billing_webhook_events ADD COLUMN claimed_by TEXT;

ALTER TABLE billing_webhook_events ADD COLUMN claimed_until TIMESTAMPTZ;
