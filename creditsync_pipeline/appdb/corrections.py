"""Bulk compare-and-set corrections of ``instances``, audited in the same transaction."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, Text, and_, delete, func, insert, literal, select, update
from sqlalchemy.sql import ColumnElement

# The corrections frame is the rules' output; one definition of its columns.
from ..rules import CORRECTION_COLUMNS
from . import dialects, limits, scratch
from .engine import write_transaction
from .errors import AppDatabaseError, wrap
from .schema import credit_sync_audit, instances
from .scratch import tmp_applied, tmp_corrections
from .timestamps import UTCDateTime, to_utc_datetime
from .values import datetime_list, int_list, object_list


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of :func:`apply_corrections`: the rows written and the rows skipped."""

    applied: pd.DataFrame
    skipped: pd.DataFrame


def apply_corrections(
    engine: Engine,
    corrections: pd.DataFrame,
    *,
    run_id: str,
    trigger: str,
    now: datetime,
    read_started_at: datetime | None = None,
) -> ApplyResult:
    """Apply corrections with compare-and-set and audit them, all in one transaction.

    A row is updated (``plan_id``, ``credits_total``, ``updated_at = now``; never
    ``credits_used``) only if it still holds ``old_plan_id`` / ``old_credits_total``
    and the billing data is not older than the state it overwrites::

        COALESCE(updated_at, created_at, :fallback) <= basis_at

    ``fallback`` is ``read_started_at`` (when the run started reading the rows), or
    ``now`` when not given: a row with neither timestamp is only overwritten by
    billing data observed after the run started reading it. A null ``basis_at``
    never applies. Every applied row gets one ``credit_sync_audit`` row. Any
    failure rolls everything back and raises :class:`AppDatabaseError`.
    """
    missing = [c for c in CORRECTION_COLUMNS if c not in corrections.columns]
    if missing:
        raise AppDatabaseError(f"corrections are missing columns: {', '.join(missing)}")
    if corrections.empty:
        empty = corrections.iloc[0:0].reset_index(drop=True)
        return ApplyResult(applied=empty, skipped=empty.copy())
    now_utc = to_utc_datetime(now) if isinstance(now, datetime) else None
    if now_utc is None:
        raise AppDatabaseError("apply_corrections needs a datetime for `now`")
    if read_started_at is not None and not isinstance(read_started_at, datetime):
        raise AppDatabaseError("apply_corrections needs a datetime (or None) for `read_started_at`")
    fallback = to_utc_datetime(read_started_at) or now_utc
    columns = _correction_columns(corrections)
    ids = columns["instance_id"]

    batch_size = max(1, int(limits.APPLY_BATCH_SIZE))
    applied_ids: set[str] = set()
    try:
        with write_transaction(engine) as conn:
            create_scratch_tables(conn)
            fresh = _fresh(fallback)
            for start in range(0, len(ids), batch_size):
                batch = {name: values[start : start + batch_size] for name, values in columns.items()}
                clear_scratch_tables(conn)
                scratch.load(conn, tmp_corrections, batch)
                applied = cas_update(conn, now=now_utc, condition=fresh)
                audit_applied(conn, applied, run_id=run_id, trigger=trigger, now=now_utc)
                applied_ids.update(applied)
            drop_scratch_tables(conn)
    except Exception as exc:
        raise wrap(engine, "applying corrections", exc, note=", nothing written") from exc

    mask = np.fromiter((i in applied_ids for i in ids), dtype=bool, count=len(ids))
    return ApplyResult(
        applied=corrections.loc[mask].reset_index(drop=True),
        skipped=corrections.loc[~mask].reset_index(drop=True),
    )


def _correction_columns(corrections: pd.DataFrame) -> dict[str, list[Any]]:
    """Validate the corrections frame and turn it into bind-ready columns (one list each)."""
    ids = object_list(corrections["instance_id"])
    if any(i is None for i in ids):
        raise AppDatabaseError("corrections contain a row without instance_id")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        listed = ", ".join(map(repr, dupes))
        raise AppDatabaseError(f"corrections name an instance more than once: {listed}")
    new_plans = object_list(corrections["new_plan_id"])
    new_credits = int_list(corrections["new_credits_total"])
    if any(p is None for p in new_plans) or any(c is None for c in new_credits):
        raise AppDatabaseError("corrections contain a row without new_plan_id or new_credits_total")
    old_plans = object_list(corrections["old_plan_id"])
    old_credits = int_list(corrections["old_credits_total"])
    reasons = object_list(corrections["reason"])
    basis = datetime_list(corrections["basis_at"])
    return {
        "seq": list(range(len(ids))),
        "instance_id": ids,
        "old_plan_id": [None if p is None else str(p) for p in old_plans],
        "new_plan_id": [str(p) for p in new_plans],
        "old_credits_total": old_credits,
        "new_credits_total": new_credits,
        "reason": [None if r is None else str(r) for r in reasons],
        "basis_at": basis,
    }


# ------------------------------------------------ the machinery (revert reuses it)


def create_scratch_tables(conn: Connection) -> None:
    """Tune the transaction for bulk work and create the empty scratch tables."""
    dialects.of(conn).tune_bulk(conn)
    scratch.create(conn, tmp_corrections, tmp_applied)


def clear_scratch_tables(conn: Connection) -> None:
    conn.execute(delete(tmp_applied))
    conn.execute(delete(tmp_corrections))


def drop_scratch_tables(conn: Connection) -> None:
    scratch.drop(conn, tmp_corrections, tmp_applied)


def _fresh(fallback: datetime) -> ColumnElement[bool]:
    """The billing data (``basis_at``) is not older than the state it overwrites."""
    seen = func.coalesce(instances.c.updated_at, instances.c.created_at, literal(fallback, UTCDateTime()))
    return seen <= tmp_corrections.c.basis_at


def cas_update(conn: Connection, *, now: datetime, condition: ColumnElement[bool] | None = None) -> list[str]:
    """Compare-and-set ``instances`` from the loaded ``tmp_corrections``; return the ids changed.

    A row gets ``new_plan_id`` / ``new_credits_total`` and ``updated_at = now`` (never
    ``credits_used``) only while it still holds ``old_plan_id`` / ``old_credits_total``
    and ``condition`` (if any) holds.
    """
    t = tmp_corrections
    stmt = (
        update(instances)
        .where(*_cas_holds(condition))
        .values(plan_id=t.c.new_plan_id, credits_total=t.c.new_credits_total, updated_at=now)
        .returning(instances.c.instance_id)
    )
    return list(conn.execute(stmt).scalars())


def cas_matches(conn: Connection, *, condition: ColumnElement[bool] | None = None) -> list[str]:
    """The ids :func:`cas_update` would change now, changing nothing (a dry run)."""
    t = tmp_corrections
    joined = t.join(instances, and_(*_cas_holds(condition)))
    return list(conn.execute(select(t.c.instance_id).select_from(joined).order_by(t.c.seq)).scalars())


def _cas_holds(condition: ColumnElement[bool] | None) -> list[ColumnElement[bool]]:
    """The compare-and-set: the row still holds what the plan expects (and ``condition``)."""
    t = tmp_corrections
    holds = [
        instances.c.instance_id == t.c.instance_id,
        instances.c.plan_id == t.c.old_plan_id,
        instances.c.credits_total == t.c.old_credits_total,
    ]
    return holds if condition is None else [*holds, condition]


def audit_applied(conn: Connection, applied: list[str], *, run_id: str, trigger: str, now: datetime) -> None:
    """One ``credit_sync_audit`` row per applied id, from the loaded ``tmp_corrections``."""
    if applied:
        scratch.load(conn, tmp_applied, {"instance_id": applied})
        _insert_audit(conn, run_id=run_id, trigger=trigger, now=now)


def _insert_audit(conn: Connection, *, run_id: str, trigger: str, now: datetime) -> None:
    """Audit every correction of the current batch that was applied."""
    t = tmp_corrections
    source = (
        select(
            literal(run_id, Text),
            literal(trigger, Text),
            t.c.instance_id,
            t.c.old_plan_id,
            t.c.new_plan_id,
            t.c.old_credits_total,
            t.c.new_credits_total,
            t.c.reason,
            literal(now, UTCDateTime()),
        )
        .where(t.c.instance_id.in_(select(tmp_applied.c.instance_id)))
        .order_by(t.c.seq)
    )
    target = [
        "run_id",
        "trigger",
        "instance_id",
        "old_plan_id",
        "new_plan_id",
        "old_credits_total",
        "new_credits_total",
        "reason",
        "applied_at",
    ]
    conn.execute(insert(credit_sync_audit).from_select(target, source))
