-- creditsync's own table: which billing customer belongs to which instance, per
-- provider (Stripe: learnt from full syncs and webhooks), so a targeted sync can list
-- the instance's subscriptions by customer. Idempotent (IF NOT EXISTS, indexes inline).
-- Exact collation as in 001_schema.sql.

CREATE TABLE IF NOT EXISTS billing_customer_links (
    provider     VARCHAR(64)  NOT NULL,
    instance_id  VARCHAR(256) NOT NULL,
    customer_id  VARCHAR(256) NOT NULL,
    updated_at   DATETIME(6)  NOT NULL DEFAULT (UTC_TIMESTAMP(6)),
    PRIMARY KEY (provider, instance_id),
    -- A customer's webhook names the customer: find its instances.
    KEY ix_billing_customer_links_customer (provider, customer_id)
) ENGINE=InnoDB ROW_FORMAT=DYNAMIC
  DEFAULT CHARACTER SET utf8mb4 COLLATE /*M!100202 utf8mb4_nopad_bin */ /*!80017 utf8mb4_0900_bin */;
