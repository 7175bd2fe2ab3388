"""The app database's tables as SQLAlchemy Core objects.

They mirror the DDL under ``sql/<dialect>/`` (which ``init_db`` applies; the
tests check that both agree column by column).
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    func,
    text,
)

from .timestamps import UTCDateTime

metadata = MetaData()

_ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")

plans = Table(
    "plans",
    metadata,
    Column("plan_id", Text, primary_key=True),
    Column("credits", Integer, nullable=False),
    Column("is_free", Boolean, nullable=False),
    CheckConstraint("credits >= 0"),
)
Index(
    "ux_plans_single_free",
    plans.c.is_free,
    unique=True,
    postgresql_where=plans.c.is_free,
    sqlite_where=plans.c.is_free == True,  # noqa: E712 - SQL expression
)

instances = Table(
    "instances",
    metadata,
    Column("instance_id", Text, primary_key=True),
    Column("plan_id", Text, nullable=False),
    Column("credits_total", Integer, nullable=False),
    Column("credits_used", Integer, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    Column("updated_at", UTCDateTime(), nullable=True, server_default=func.current_timestamp()),
)
Index("ix_instances_created_at", instances.c.created_at)

billing_webhook_events = Table(
    "billing_webhook_events",
    metadata,
    Column("id", _ID_TYPE, Identity(), primary_key=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("instance_id", Text, nullable=True),
    Column("event_type", Text, nullable=False),
    Column("payload", Text, nullable=True),
    Column("received_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    Column("processed_at", UTCDateTime(), nullable=True),
    Column("outcome", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    # 002_webhook_leases.sql: who holds the row, and until when (both NULL: nobody).
    Column("claimed_by", Text, nullable=True),
    Column("claimed_until", UTCDateTime(), nullable=True),
    sqlite_autoincrement=True,
)
Index(
    "ix_billing_webhook_events_unprocessed",
    billing_webhook_events.c.id,
    postgresql_where=billing_webhook_events.c.processed_at.is_(None),
    sqlite_where=billing_webhook_events.c.processed_at.is_(None),
)

credit_sync_audit = Table(
    "credit_sync_audit",
    metadata,
    Column("id", _ID_TYPE, Identity(), primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("old_plan_id", Text, nullable=True),
    Column("new_plan_id", Text, nullable=False),
    Column("old_credits_total", Integer, nullable=True),
    Column("new_credits_total", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("applied_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    sqlite_autoincrement=True,
)
Index("ix_credit_sync_audit_instance_id", credit_sync_audit.c.instance_id)
Index("ix_credit_sync_audit_run_id", credit_sync_audit.c.run_id)
# 004_audit_reverts.sql: finds a run's revert (trigger 'revert', reason 'revert of run <id>').
Index(
    "ix_credit_sync_audit_reverts",
    credit_sync_audit.c.reason,
    postgresql_where=credit_sync_audit.c.trigger == "revert",
    sqlite_where=credit_sync_audit.c.trigger == "revert",
)

# 003_customer_links.sql: creditsync's own memory of instance -> billing customer.
billing_customer_links = Table(
    "billing_customer_links",
    metadata,
    Column("provider", Text, primary_key=True),
    Column("instance_id", Text, primary_key=True),
    Column("customer_id", Text, nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
)
Index(
    "ix_billing_customer_links_customer",
    billing_customer_links.c.provider,
    billing_customer_links.c.customer_id,
)
