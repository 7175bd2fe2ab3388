-- creditsync's own table: which billing customer belongs to which instance, per
-- provider (Stripe: learnt from full syncs and webhooks), so a targeted sync can list
-- the instance's subscriptions by customer. Idempotent (IF NOT EXISTS).

CREATE TABLE IF NOT EXISTS billing_customer_links (
    provider     TEXT        NOT NULL,
    instance_id  TEXT        NOT NULL,
    customer_id  TEXT        NOT NULL,
    updated_at   TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    PRIMARY KEY (provider, instance_id)
);

-- A customer's webhook names the customer: find its instances.
CREATE INDEX IF NOT EXISTS ix_billing_customer_links_customer
    ON billing_customer_links (provider, customer_id);
