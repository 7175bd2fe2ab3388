"""Bulk compare-and-set corrections of ``instances``, audited in the same transaction."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import Connection, Engine, Text, delete, insert, literal, or_, select, update

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
) -> ApplyResult:
    """Apply corrections with compare-and-set and audit them, all in one transaction.

    A row is updated (``plan_id``, ``credits_total``, ``updated_at = now``; never
    ``credits_used``) only if it still holds ``old_plan_id`` / ``old_credits_total``
    and was not updated after ``basis_at``; a null ``basis_at`` only matches rows
    whose ``updated_at`` is null. Every applied row gets one ``credit_sync_audit``
    row. Any failure rolls everything back and raises :class:`AppDatabaseError`.
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
    columns = _correction_columns(corrections)
    ids = columns["instance_id"]

    batch_size = max(1, int(limits.APPLY_BATCH_SIZE))
    applied_ids: set[str] = set()
    try:
        with write_transaction(engine) as conn:
            _create_scratch_tables(conn)
            for start in range(0, len(ids), batch_size):
                batch = {name: values[start : start + batch_size] for name, values in columns.items()}
                applied = _apply_batch(conn, batch, run_id=run_id, trigger=trigger, now=now_utc)
                applied_ids.update(applied)
            scratch.drop(conn, tmp_corrections, tmp_applied)
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


def _create_scratch_tables(conn: Connection) -> None:
    dialects.of(conn).tune_bulk(conn)
    scratch.create(conn, tmp_corrections, tmp_applied)


def _apply_batch(
    conn: Connection, batch: Mapping[str, list[Any]], *, run_id: str, trigger: str, now: datetime
) -> list[str]:
    """Load one batch (columns), compare-and-set update ``instances``, audit; return applied ids."""
    conn.execute(delete(tmp_applied))
    conn.execute(delete(tmp_corrections))
    scratch.load(conn, tmp_corrections, batch)
    t = tmp_corrections
    cas_update = (
        update(instances)
        .where(
            instances.c.instance_id == t.c.instance_id,
            instances.c.plan_id == t.c.old_plan_id,
            instances.c.credits_total == t.c.old_credits_total,
            or_(instances.c.updated_at.is_(None), instances.c.updated_at <= t.c.basis_at),
        )
        .values(plan_id=t.c.new_plan_id, credits_total=t.c.new_credits_total, updated_at=now)
        .returning(instances.c.instance_id)
    )
    applied = list(conn.execute(cas_update).scalars())
    if applied:
        scratch.load(conn, tmp_applied, {"instance_id": applied})
        _insert_audit(conn, run_id=run_id, trigger=trigger, now=now)
    return applied


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
