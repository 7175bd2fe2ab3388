"""App database access: schema, reads, bulk compare-and-set corrections and audit.

SQLAlchemy Core only. Works on PostgreSQL (production), MySQL/MariaDB
(``mysql+pymysql://``, see docs/mysql.md) and SQLite (embedded default). Every error
that leaves this package is an :class:`AppDatabaseError` with a one-line message that
never contains a password.

Modules (one concern each): :mod:`.errors` (errors, URL redaction),
:mod:`.timestamps` (UTC column type), :mod:`.schema` (tables), :mod:`.migrations`
(``init_db``), :mod:`.engine` (engines, transactions), :mod:`.reads`,
:mod:`.writes` (seeding), :mod:`.corrections` (compare-and-set + audit),
:mod:`.revert` (undo one run from its audit rows),
:mod:`.webhooks` (webhook rows and their leases), :mod:`.links` (billing customer
links), :mod:`.scratch` (bulk scratch tables),
:mod:`.dialects` (everything that differs per server), :mod:`.limits` (batch sizes).
Callers use the names re-exported here: ``appdb.read_instances(...)``.
"""

from ..rules import CORRECTION_COLUMNS
from . import limits
from .corrections import ApplyResult, apply_corrections
from .engine import (
    check_connection,
    create_engine_from_url,
    database_now,
    shares_data_across_connections,
)
from .errors import AppDatabaseError, SchemaMissingError, UnknownRunError, redact_url
from .links import customer_links_for, instances_for_customers, remember_customer_links
from .migrations import init_db
from .reads import count_instances, instances_created_since, load_plans, read_audit, read_instances
from .health import WebhookBacklog, free_plan_ids, missing_tables, ping, some_instance_ids, webhook_backlog
from .revert import REVERT_COLUMNS, REVERT_TRIGGER, RevertResult, revert_reason, revert_run
from .schema import (
    billing_customer_links,
    billing_webhook_events,
    credit_sync_audit,
    instances,
    metadata,
    plans,
)
from .timestamps import UTCDateTime
from .webhooks import (
    DEFAULT_LEASE_SECONDS,
    LandedEvent,
    WebhookEvent,
    claim_webhook_events,
    land_webhook_event,
    mark_webhook_events,
    unprocessed_webhook_events,
    webhook_events_by_id,
)
from .writes import insert_instances, upsert_plans

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "AppDatabaseError",
    "ApplyResult",
    "REVERT_COLUMNS",
    "REVERT_TRIGGER",
    "RevertResult",
    "SchemaMissingError",
    "UnknownRunError",
    "CORRECTION_COLUMNS",
    "UTCDateTime",
    "WebhookEvent",
    "apply_corrections",
    "billing_customer_links",
    "billing_webhook_events",
    "check_connection",
    "claim_webhook_events",
    "count_instances",
    "create_engine_from_url",
    "credit_sync_audit",
    "customer_links_for",
    "database_now",
    "init_db",
    "insert_instances",
    "instances",
    "instances_created_since",
    "instances_for_customers",
    "LandedEvent",
    "land_webhook_event",
    "limits",
    "load_plans",
    "mark_webhook_events",
    "metadata",
    "plans",
    "read_audit",
    "read_instances",
    "redact_url",
    "remember_customer_links",
    "revert_reason",
    "revert_run",
    "WebhookBacklog",
    "free_plan_ids",
    "missing_tables",
    "ping",
    "some_instance_ids",
    "webhook_backlog",
    "shares_data_across_connections",
    "unprocessed_webhook_events",
    "upsert_plans",
    "webhook_events_by_id",
]
