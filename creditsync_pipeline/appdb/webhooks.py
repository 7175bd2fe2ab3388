"""``billing_webhook_events``: landing rows, reading, claiming and marking them."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import Engine, or_, select, update

from . import dialects, limits
from .engine import write_transaction
from .errors import AppDatabaseError, errors
from .schema import billing_webhook_events
from .timestamps import to_utc_datetime
from .values import chunks


def land_webhook_event(
    engine: Engine,
    *,
    event_id: str,
    event_type: str,
    instance_id: str | None,
    payload: str | None,
) -> bool:
    """Land one billing webhook as a ``billing_webhook_events`` row, idempotently.

    Returns ``True`` when the row was inserted and committed, ``False`` when a
    row with that ``event_id`` already existed (nothing changed).
    """
    values = {
        "event_id": event_id,
        "event_type": event_type,
        "instance_id": instance_id,
        "payload": payload,
    }
    stmt = dialects.of(engine).insert_ignoring(billing_webhook_events, values, key=["event_id"])
    if stmt is None:
        raise AppDatabaseError(f"landing webhook events is not supported on {engine.dialect.name}")
    with errors(engine, "landing a webhook event"), write_transaction(engine) as conn:
        return conn.execute(stmt).rowcount == 1


@dataclass(frozen=True)
class WebhookEvent:
    """One ``billing_webhook_events`` row as the real-time nets read it."""

    id: int
    event_id: str
    instance_id: str | None
    event_type: str
    payload: str | None
    attempts: int
    processed_at: datetime | None
    outcome: str | None
    #: an earlier row (smaller ``id``) carries the same ``event_id``
    duplicate: bool


def _webhook_select() -> Any:
    e = billing_webhook_events
    earlier = e.alias("earlier")
    duplicate = select(earlier.c.id).where(earlier.c.event_id == e.c.event_id, earlier.c.id < e.c.id).exists()
    return select(
        e.c.id, e.c.event_id, e.c.instance_id, e.c.event_type, e.c.payload,
        e.c.attempts, e.c.processed_at, e.c.outcome, duplicate.label("duplicate"),
    )


def _webhook_event(row: Any) -> WebhookEvent:
    return WebhookEvent(
        id=int(row.id),
        event_id=row.event_id,
        instance_id=row.instance_id,
        event_type=row.event_type,
        payload=row.payload,
        attempts=int(row.attempts or 0),
        processed_at=row.processed_at,
        outcome=row.outcome,
        duplicate=bool(row.duplicate),
    )


def unprocessed_webhook_events(
    engine: Engine,
    *,
    after_id: int | None = None,
    upto_id: int | None = None,
    max_attempts: int | None = None,
    skip_outcomes: Sequence[str] = (),
    limit: int = 1000,
) -> list[WebhookEvent]:
    """Rows with ``processed_at`` null, lowest ``id`` first.

    Optionally only ``after_id < id <= upto_id``, rows with fewer than
    ``max_attempts`` attempts and rows whose outcome is not one of
    ``skip_outcomes``; at most ``limit`` rows.
    """
    e = billing_webhook_events
    stmt = _webhook_select().where(e.c.processed_at.is_(None))
    if after_id is not None:
        stmt = stmt.where(e.c.id > int(after_id))
    if upto_id is not None:
        stmt = stmt.where(e.c.id <= int(upto_id))
    if max_attempts is not None:
        stmt = stmt.where(e.c.attempts < int(max_attempts))
    if skip_outcomes:
        stmt = stmt.where(or_(e.c.outcome.is_(None), e.c.outcome.not_in(list(skip_outcomes))))
    stmt = stmt.order_by(e.c.id).limit(max(0, int(limit)))
    with errors(engine, "reading webhook events"), engine.connect() as conn:
        return [_webhook_event(row) for row in conn.execute(stmt)]


def webhook_events_by_id(engine: Engine, ids: Iterable[int]) -> list[WebhookEvent]:
    """The named ``billing_webhook_events`` rows (processed or not), by ``id``."""
    e = billing_webhook_events
    wanted = sorted({int(i) for i in ids})
    rows: list[Any] = []
    with errors(engine, "reading webhook events"), engine.connect() as conn:
        for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
            rows.extend(conn.execute(_webhook_select().where(e.c.id.in_(chunk)).order_by(e.c.id)))
    return [_webhook_event(row) for row in rows]


def claim_webhook_events(engine: Engine, ids: Iterable[int]) -> list[WebhookEvent]:
    """Count one attempt on each named row that is still unprocessed; return those rows.

    The returned rows carry ``attempts`` after the increment. Rows already
    processed (or absent) are left alone and not returned.
    """
    e = billing_webhook_events
    wanted = sorted({int(i) for i in ids})
    claimed: list[int] = []
    rows: list[Any] = []
    with errors(engine, "claiming webhook events"), write_transaction(engine) as conn:
        for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
            stmt = (
                update(e)
                .where(e.c.id.in_(chunk), e.c.processed_at.is_(None))
                .values(attempts=e.c.attempts + 1)
                .returning(e.c.id)
            )
            claimed.extend(int(i) for i in conn.execute(stmt).scalars())
        for chunk in chunks(sorted(claimed), limits.READ_CHUNK_SIZE):
            rows.extend(conn.execute(_webhook_select().where(e.c.id.in_(chunk)).order_by(e.c.id)))
    return [_webhook_event(row) for row in rows]


def mark_webhook_events(
    engine: Engine,
    outcomes: Mapping[int, str],
    *,
    processed: bool = True,
    now: datetime | None = None,
) -> int:
    """Record an ``outcome`` on rows still unprocessed; return how many rows changed.

    With ``processed`` (the default) ``processed_at`` is set too (``now``, or the
    current time); without it only ``outcome`` is written (a failed attempt).
    """
    e = billing_webhook_events
    by_outcome: dict[str, list[int]] = {}
    for row_id, outcome in outcomes.items():
        by_outcome.setdefault(str(outcome), []).append(int(row_id))
    stamp = to_utc_datetime(now) or datetime.now(timezone.utc)
    changed = 0
    with errors(engine, "marking webhook events"), write_transaction(engine) as conn:
        for outcome, row_ids in by_outcome.items():
            values: dict[str, Any] = {"outcome": outcome}
            if processed:
                values["processed_at"] = stamp
            for chunk in chunks(sorted(row_ids), limits.READ_CHUNK_SIZE):
                stmt = update(e).where(e.c.id.in_(chunk), e.c.processed_at.is_(None)).values(**values)
                changed += int(conn.execute(stmt).rowcount or 0)
    return changed
