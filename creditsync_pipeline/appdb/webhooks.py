"""``billing_webhook_events``: landing rows, reading, leasing (claiming) and marking them.

Leases: a row is *held* by ``claimed_by`` while ``claimed_until`` is in the future.
The process that landed a row (an HTTP receiver) may lease it at once and sync it;
the webhook sensor (the backstop) leaves held rows alone, and a lease that ran out
(its holder crashed) frees the row again. Without an explicit ``now`` the lease
clock is the database's own (:func:`~.engine.database_now`), the one clock every
process shares.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import Connection, Engine, case, or_, select, update
from sqlalchemy.sql import ColumnElement

from . import dialects, limits
from .engine import connection_now, write_transaction
from .errors import AppDatabaseError, errors
from .schema import billing_webhook_events
from .timestamps import to_utc_datetime
from .values import chunks

#: A lease long enough for one targeted sync with billing retries; a crashed holder
#: delays its rows by at most this much.
DEFAULT_LEASE_SECONDS = 300.0

_e = billing_webhook_events


@dataclass(frozen=True)
class LandedEvent:
    """Outcome of :func:`land_webhook_event`."""

    #: the row's ``id`` (the existing row's on a redelivery)
    id: int
    #: this call inserted the row (False: a row with that ``event_id`` existed)
    inserted: bool
    #: the caller now holds the row's lease
    leased: bool


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
    #: the lease holder, if any, and until when it holds the row
    claimed_by: str | None = None
    claimed_until: datetime | None = None


def land_webhook_event(
    engine: Engine,
    *,
    event_id: str,
    event_type: str,
    instance_id: str | None,
    payload: str | None,
    lease_owner: str | None = None,
    lease_seconds: float | None = None,
    now: datetime | None = None,
) -> LandedEvent:
    """Land one billing webhook as a ``billing_webhook_events`` row, idempotently.

    A redelivery (same ``event_id``) inserts nothing and returns the existing
    row's ``id``. With ``lease_owner`` and ``lease_seconds`` the row -- new or
    existing -- is also leased to that owner when it is unprocessed and no other
    owner holds a live lease (``leased`` says whether the caller now holds it);
    landing counts no attempt (the claim that syncs it does). Inserted and
    leased in one transaction, committed before this returns.
    """
    leasing = _lease_request(lease_owner, lease_seconds)
    values = {"event_id": event_id, "event_type": event_type, "instance_id": instance_id, "payload": payload}
    stmt = dialects.of(engine).insert_ignoring(_e, values, key=["event_id"])
    if stmt is None:
        raise AppDatabaseError(f"landing webhook events is not supported on {engine.dialect.name}")
    with errors(engine, "landing a webhook event"), write_transaction(engine) as conn:
        inserted = conn.execute(stmt).rowcount == 1
        row_id = int(conn.execute(select(_e.c.id).where(_e.c.event_id == event_id)).scalar_one())
        leased = False
        if leasing is not None:
            owner, seconds = leasing
            stamp = _stamp(conn, now)
            leased = _lease(conn, [row_id], owner=owner, now=stamp, seconds=seconds, count_attempt=False) == [row_id]
    return LandedEvent(id=row_id, inserted=inserted, leased=leased)


def _webhook_select() -> Any:
    earlier = _e.alias("earlier")
    duplicate = select(earlier.c.id).where(earlier.c.event_id == _e.c.event_id, earlier.c.id < _e.c.id).exists()
    return select(
        _e.c.id, _e.c.event_id, _e.c.instance_id, _e.c.event_type, _e.c.payload,
        _e.c.attempts, _e.c.processed_at, _e.c.outcome, duplicate.label("duplicate"),
        _e.c.claimed_by, _e.c.claimed_until,
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
        claimed_by=row.claimed_by,
        claimed_until=row.claimed_until,
    )


def unprocessed_webhook_events(
    engine: Engine,
    *,
    after_id: int | None = None,
    upto_id: int | None = None,
    max_attempts: int | None = None,
    skip_outcomes: Sequence[str] = (),
    limit: int = 1000,
    now: datetime | None = None,
) -> list[WebhookEvent]:
    """Rows with ``processed_at`` null, lowest ``id`` first.

    Optionally only ``after_id < id <= upto_id``, rows with fewer than
    ``max_attempts`` attempts and rows whose outcome is not one of
    ``skip_outcomes``; at most ``limit`` rows. With ``now``, rows under a live
    lease (``claimed_until > now``) are left out.
    """
    stmt = _webhook_select().where(_e.c.processed_at.is_(None))
    if after_id is not None:
        stmt = stmt.where(_e.c.id > int(after_id))
    if upto_id is not None:
        stmt = stmt.where(_e.c.id <= int(upto_id))
    if max_attempts is not None:
        stmt = stmt.where(_e.c.attempts < int(max_attempts))
    if skip_outcomes:
        stmt = stmt.where(or_(_e.c.outcome.is_(None), _e.c.outcome.not_in(list(skip_outcomes))))
    if now is not None:
        stmt = stmt.where(_unleased(_required_utc(now)))
    stmt = stmt.order_by(_e.c.id).limit(max(0, int(limit)))
    with errors(engine, "reading webhook events"), engine.connect() as conn:
        return [_webhook_event(row) for row in conn.execute(stmt)]


def webhook_events_by_id(engine: Engine, ids: Iterable[int]) -> list[WebhookEvent]:
    """The named ``billing_webhook_events`` rows (processed or not), by ``id``."""
    wanted = sorted({int(i) for i in ids})
    with errors(engine, "reading webhook events"), engine.connect() as conn:
        return _rows_by_id(conn, wanted)


def claim_webhook_events(
    engine: Engine, ids: Iterable[int], *, owner: str, lease_seconds: float, now: datetime | None = None
) -> list[WebhookEvent]:
    """Lease the named rows to ``owner`` and count one attempt on each; return them.

    A row is taken when it is unprocessed and either unleased, leased by
    ``owner`` already, or its lease ran out; it gets ``claimed_by = owner``,
    ``claimed_until = now + lease_seconds`` and ``attempts + 1``. The returned
    rows carry ``attempts`` after the increment. Rows processed, absent or held
    by another owner's live lease are left alone and not returned.
    """
    request = _lease_request(owner, lease_seconds)
    if request is None:
        raise ValueError("claiming webhook rows needs an owner and lease_seconds")
    owner, seconds = request
    wanted = sorted({int(i) for i in ids})
    with errors(engine, "claiming webhook events"), write_transaction(engine) as conn:
        stamp = _stamp(conn, now)
        claimed: list[int] = []
        for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
            claimed.extend(_lease(conn, chunk, owner=owner, now=stamp, seconds=seconds, count_attempt=True))
        return _rows_by_id(conn, claimed)


def mark_webhook_events(
    engine: Engine,
    outcomes: Mapping[int, str],
    *,
    processed: bool = True,
    now: datetime | None = None,
    refund_attempt: bool = False,
) -> int:
    """Record an ``outcome`` on rows still unprocessed and release their leases.

    With ``processed`` (the default) ``processed_at`` is set too (``now``, or the
    current time); without it only ``outcome`` is written (a failed attempt).
    With ``refund_attempt`` the claim's attempt is given back (``attempts - 1``,
    never below 0): the failure was billing's or the database's as a whole, which
    must not use up a row's retry budget. Returns how many rows changed.
    """
    by_outcome: dict[str, list[int]] = {}
    for row_id, outcome in outcomes.items():
        by_outcome.setdefault(str(outcome), []).append(int(row_id))
    stamp = to_utc_datetime(now) or datetime.now(timezone.utc)
    changed = 0
    with errors(engine, "marking webhook events"), write_transaction(engine) as conn:
        for outcome, row_ids in by_outcome.items():
            values: dict[str, Any] = {"outcome": outcome, "claimed_by": None, "claimed_until": None}
            if processed:
                values["processed_at"] = stamp
            if refund_attempt:
                values["attempts"] = case((_e.c.attempts > 0, _e.c.attempts - 1), else_=0)
            for chunk in chunks(sorted(row_ids), limits.READ_CHUNK_SIZE):
                stmt = update(_e).where(_e.c.id.in_(chunk), _e.c.processed_at.is_(None)).values(**values)
                changed += int(conn.execute(stmt).rowcount or 0)
    return changed


# ------------------------------------------------------------------------ leases


def _lease_request(owner: str | None, seconds: float | None) -> tuple[str, float] | None:
    """Validate a lease request: both parts or neither."""
    if owner is None and seconds is None:
        return None
    if not isinstance(owner, str) or not owner:
        raise ValueError("a webhook lease needs a non-empty owner")
    if seconds is None or not math.isfinite(float(seconds)) or float(seconds) <= 0:
        raise ValueError(f"a webhook lease needs a positive number of seconds, not {seconds!r}")
    return owner, float(seconds)


def _required_utc(now: datetime) -> datetime:
    value = to_utc_datetime(now)
    if value is None:
        raise ValueError("now must be a datetime")
    return value


def _stamp(conn: Connection, now: datetime | None) -> datetime:
    """``now`` in UTC, or the database's clock."""
    return connection_now(conn) if now is None else _required_utc(now)


def _unleased(now: datetime) -> ColumnElement[bool]:
    """Nobody holds the row at ``now`` (no holder, or the lease ran out)."""
    return or_(_e.c.claimed_by.is_(None), _e.c.claimed_until.is_(None), _e.c.claimed_until <= now)


def _lease(
    conn: Connection, ids: list[int], *, owner: str, now: datetime, seconds: float, count_attempt: bool
) -> list[int]:
    """Lease those of ``ids`` that are unprocessed and free for ``owner``; return them.

    Locks the eligible rows first (``FOR UPDATE``; SQLite already holds the write
    lock), then updates them by id: no ``UPDATE ... RETURNING`` needed.
    """
    eligible = [
        int(i)
        for i in conn.execute(
            select(_e.c.id)
            .where(_e.c.id.in_(ids), _e.c.processed_at.is_(None), or_(_unleased(now), _e.c.claimed_by == owner))
            .order_by(_e.c.id)
            .with_for_update()
        ).scalars()
    ]
    if eligible:
        values: dict[str, Any] = {"claimed_by": owner, "claimed_until": now + timedelta(seconds=seconds)}
        if count_attempt:
            values["attempts"] = _e.c.attempts + 1
        conn.execute(update(_e).where(_e.c.id.in_(eligible)).values(**values))
    return eligible


def _rows_by_id(conn: Connection, ids: list[int]) -> list[WebhookEvent]:
    rows: list[Any] = []
    for chunk in chunks(sorted(ids), limits.READ_CHUNK_SIZE):
        rows.extend(conn.execute(_webhook_select().where(_e.c.id.in_(chunk)).order_by(_e.c.id)))
    return [_webhook_event(row) for row in rows]
