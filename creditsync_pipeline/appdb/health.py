"""Read-only looks for ``creditsync doctor``: schema, free plan, webhook backlog."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import Engine, func, inspect, select, text

from .errors import errors
from .schema import billing_webhook_events, instances, metadata, plans
from .timestamps import to_utc_datetime

#: ``billing_webhook_events.outcome`` of a row the sensor gave up on (``realtime.FAILED``)
GIVEN_UP_OUTCOME = "failed"


def ping(engine: Engine) -> None:
    """Open a connection and run ``SELECT 1`` (raises ``AppDatabaseError``)."""
    with errors(engine, "connecting"), engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def missing_tables(engine: Engine) -> list[str]:
    """The creditsync tables the database does not have (empty: the schema is applied)."""
    with errors(engine, "inspecting the schema"), engine.connect() as conn:
        have = set(inspect(conn).get_table_names())
    return sorted(t for t in metadata.tables if t not in have)


def free_plan_ids(engine: Engine) -> list[str]:
    """The ``plan_id`` of every plan with ``is_free`` (exactly one is required)."""
    stmt = select(plans.c.plan_id).where(plans.c.is_free.is_(True)).order_by(plans.c.plan_id)
    with errors(engine, "reading plans"), engine.connect() as conn:
        return [str(p) for p in conn.execute(stmt).scalars()]


def some_instance_ids(engine: Engine, limit: int = 3) -> list[str]:
    """A few instance ids (a provider that proves access on an instance needs them)."""
    stmt = select(instances.c.instance_id).order_by(instances.c.instance_id).limit(limit)
    with errors(engine, "reading instances"), engine.connect() as conn:
        return [str(i) for i in conn.execute(stmt).scalars()]


@dataclass(frozen=True)
class WebhookBacklog:
    """Unprocessed webhook rows: ``waiting`` older than the limit, ``given_up`` by the sensor."""

    waiting: int
    given_up: int
    oldest_waiting: datetime | None


def webhook_backlog(engine: Engine, *, now: datetime, older_than: timedelta) -> WebhookBacklog:
    """Rows not processed and received before ``now - older_than``, and rows given up."""
    e = billing_webhook_events
    cutoff = to_utc_datetime(now) - older_than
    pending = e.c.processed_at.is_(None)
    not_given_up = (e.c.outcome.is_(None)) | (e.c.outcome != GIVEN_UP_OUTCOME)
    waiting = select(func.count(), func.min(e.c.received_at)).where(pending, not_given_up, e.c.received_at < cutoff)
    given_up = select(func.count()).where(pending, e.c.outcome == GIVEN_UP_OUTCOME)
    with errors(engine, "reading webhook rows"), engine.connect() as conn:
        count, oldest = conn.execute(waiting).one()
        failed = conn.execute(given_up).scalar_one()
    return WebhookBacklog(waiting=int(count), given_up=int(failed), oldest_waiting=oldest)
