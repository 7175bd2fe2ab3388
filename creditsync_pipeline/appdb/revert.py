"""Rollback: undo one run's corrections from its audit rows (SPEC, Rollback)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, Text, and_, func, insert, literal, null, select

from . import frames
from .corrections import (
    audit_applied,
    cas_matches,
    cas_update,
    create_scratch_tables,
    drop_scratch_tables,
)
from .engine import write_transaction
from .errors import AppDatabaseError, UnknownRunError, errors, one_line
from .schema import credit_sync_audit, instances
from .scratch import tmp_corrections
from .timestamps import to_utc_datetime

#: The audit trigger of a revert's rows.
REVERT_TRIGGER = "revert"

REVERT_COLUMNS = (
    "instance_id",
    "current_plan_id",
    "current_credits_total",
    "target_plan_id",
    "target_credits_total",
)
_REVERT_SPEC: dict[str, frames.ColumnMaker] = {
    "instance_id": frames.str_series,
    "current_plan_id": frames.str_series,
    "current_credits_total": frames.nullable_int_series,
    "target_plan_id": frames.str_series,
    "target_credits_total": frames.nullable_int_series,
}


def revert_reason(run_id: str) -> str:
    """The ``reason`` of every audit row a revert of ``run_id`` writes."""
    return f"revert of run {run_id}"


@dataclass(frozen=True)
class RevertResult:
    """Outcome of :func:`revert_run`.

    ``reverted``: the instances put back (``current_*`` = what they held, ``target_*`` =
    what they hold now). ``skipped``: the instances changed since the run (or deleted,
    or without old values to restore), left alone (``current_*`` = what they hold now,
    NA when the row is gone). Columns: :data:`REVERT_COLUMNS`. With ``dry_run`` the
    frames say what would happen; nothing was written.
    """

    run_id: str
    revert_run_id: str
    reverted: pd.DataFrame
    skipped: pd.DataFrame
    already_reverted: bool
    dry_run: bool


def revert_run(
    engine: Engine, run_id: str, *, revert_run_id: str, now: datetime, dry_run: bool = False
) -> RevertResult:
    """Undo the corrections of ``run_id``, from its audit rows, in one transaction.

    Each instance goes back to the audit's old plan and allowance, compare-and-set
    against the audit's new values: a row that no longer holds them is skipped and
    counted, never overwritten. An instance audited several times in the run (several
    rounds) goes back to its earliest old values, compared against its latest new
    ones. ``credits_used`` is untouched, ``updated_at = now``; each reverted instance
    gets one audit row (trigger ``revert``, run id ``revert_run_id``, reason
    ``revert of run <run_id>``). The run's own ``revert`` rows are never reverted.

    Raises :class:`UnknownRunError` when ``run_id`` has no audit rows. A run already
    reverted (its revert's audit rows exist) reverts nothing: ``already_reverted``.
    ``dry_run`` computes the same frames and writes nothing. Bulk: the plan is built
    by one ``INSERT ... SELECT`` from the audit into the corrections scratch table,
    then the same compare-and-set UPDATE and audit INSERT as :func:`apply_corrections`.
    """
    now_utc = to_utc_datetime(now) if isinstance(now, datetime) else None
    if now_utc is None:
        raise AppDatabaseError("revert_run needs a datetime for `now`")
    if not isinstance(run_id, str) or not isinstance(revert_run_id, str) or not revert_run_id:
        raise AppDatabaseError("revert_run needs text run ids")
    reason = revert_reason(run_id)

    def result(reverted: pd.DataFrame, skipped: pd.DataFrame, already: bool) -> RevertResult:
        return RevertResult(run_id=run_id, revert_run_id=revert_run_id, reverted=reverted,
                            skipped=skipped, already_reverted=already, dry_run=dry_run)

    action = f"reverting run {one_line(run_id)[:80]!r}"
    note = " (dry run)" if dry_run else ", nothing written"
    with errors(engine, action, note=note), _transaction(engine, write=not dry_run) as conn:
        if not _has_rows(conn, credit_sync_audit.c.run_id == run_id):
            raise UnknownRunError(f"unknown run id {one_line(run_id)[:200]!r}: no audit rows")
        if _has_rows(conn, credit_sync_audit.c.trigger == REVERT_TRIGGER, credit_sync_audit.c.reason == reason):
            empty = frames.frame([], _REVERT_SPEC)
            return result(empty, empty.copy(), already=True)
        create_scratch_tables(conn)
        _load_plan(conn, run_id, reason)
        restorable = and_(tmp_corrections.c.new_plan_id.is_not(None), tmp_corrections.c.new_credits_total.is_not(None))
        if dry_run:
            applied = cas_matches(conn, condition=restorable)
        else:
            applied = cas_update(conn, now=now_utc, condition=restorable)
            audit_applied(conn, applied, run_id=revert_run_id, trigger=REVERT_TRIGGER, now=now_utc)
        reverted, skipped = _report(conn, set(applied))
        drop_scratch_tables(conn)
    return result(reverted, skipped, already=False)


@contextmanager
def _transaction(engine: Engine, *, write: bool) -> Iterator[Connection]:
    """A write transaction, or a plain one that is always rolled back (a dry run)."""
    if write:
        with write_transaction(engine) as conn:
            yield conn
        return
    with engine.connect() as conn:
        tx = conn.begin()
        try:
            yield conn
        finally:
            tx.rollback()


def _has_rows(conn: Connection, *where: Any) -> bool:
    stmt = select(credit_sync_audit.c.id).where(*where).limit(1)
    return conn.execute(stmt).first() is not None


def _load_plan(conn: Connection, run_id: str, reason: str) -> None:
    """One row per instance of the run: expect its latest new values, restore its earliest old ones."""
    a = credit_sync_audit
    span = (
        select(
            a.c.instance_id,
            func.min(a.c.id).label("first_id"),
            func.max(a.c.id).label("last_id"),
        )
        .where(a.c.run_id == run_id, a.c.trigger != REVERT_TRIGGER)
        .group_by(a.c.instance_id)
        .subquery("span")
    )
    first = a.alias("first_row")
    last = a.alias("last_row")
    source = select(
        span.c.first_id,
        span.c.instance_id,
        last.c.new_plan_id,
        first.c.old_plan_id,
        last.c.new_credits_total,
        first.c.old_credits_total,
        literal(reason, Text),
        null(),
    ).select_from(
        span.join(first, first.c.id == span.c.first_id).join(last, last.c.id == span.c.last_id)
    )
    names = ["seq", "instance_id", "old_plan_id", "new_plan_id",
             "old_credits_total", "new_credits_total", "reason", "basis_at"]
    conn.execute(insert(tmp_corrections).from_select(names, source))


def _report(conn: Connection, applied: set[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The planned rows split into reverted and skipped, with current and target values."""
    t = tmp_corrections
    stmt = (
        select(
            t.c.instance_id, t.c.old_plan_id, t.c.old_credits_total,
            t.c.new_plan_id, t.c.new_credits_total,
            instances.c.plan_id, instances.c.credits_total,
        )
        .select_from(t.outerjoin(instances, instances.c.instance_id == t.c.instance_id))
        .order_by(t.c.seq)
    )
    reverted: list[tuple[Any, ...]] = []
    skipped: list[tuple[Any, ...]] = []
    for iid, held_plan, held_credits, target_plan, target_credits, now_plan, now_credits in conn.execute(stmt):
        if iid in applied:
            reverted.append((iid, held_plan, held_credits, target_plan, target_credits))
        else:
            skipped.append((iid, now_plan, now_credits, target_plan, target_credits))
    return frames.frame(reverted, _REVERT_SPEC), frames.frame(skipped, _REVERT_SPEC)
