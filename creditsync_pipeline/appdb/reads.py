"""Reads: plans, instances, audit rows, new instances."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Engine, func, select

from . import dialects, frames, limits
from .errors import errors
from .schema import credit_sync_audit, instances, plans
from .timestamps import to_utc_datetime
from .values import chunks, isna


def load_plans(engine: Engine) -> pd.DataFrame:
    """All plans: ``plan_id`` (str), ``credits`` (int64), ``is_free`` (bool)."""
    stmt = select(plans.c.plan_id, plans.c.credits, plans.c.is_free).order_by(plans.c.plan_id)
    with errors(engine, "loading plans"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return frames.frame(rows, frames.PLAN_SPEC)


def read_instances(
    engine: Engine, instance_ids: Iterable[str] | None = None, *, ordered: bool = True
) -> pd.DataFrame:
    """Instances (all, or the named ones; unknown ids are absent from the result).

    Columns: ``instance_id``, ``plan_id`` (str), ``credits_total``, ``credits_used``
    (int64), ``created_at``, ``updated_at`` (datetime64[ns, UTC], NaT when null: the
    shipped DDL has ``created_at NOT NULL``, an app's own table may not); ordered by
    ``instance_id`` unless ``ordered=False`` (the database's own order: a full
    read then needs no sort).

    On PostgreSQL (psycopg2) the rows are streamed with ``COPY ... TO STDOUT`` as
    CSV and parsed by pandas' C reader (no Python object per row); named ids go
    in ``= ANY(array)`` chunks of ``COPY_READ_CHUNK_SIZE``. Elsewhere named ids
    are read with bound parameters in chunks of at most ``READ_CHUNK_SIZE``.
    """
    if isinstance(instance_ids, (str, bytes)):
        raise TypeError("instance_ids must be an iterable of ids, not a single string")
    wanted = (
        None if instance_ids is None
        else sorted({
            i if type(i) is str else str(i)
            for i in instance_ids
            if type(i) is str or (i is not None and not isna(i))
        })
    )
    columns = [instances.c[name] for name in frames.INSTANCE_SPEC]
    base = select(*columns)
    if ordered:
        base = base.order_by(instances.c.instance_id)
    rows: list[Any] = []
    with errors(engine, "reading instances"), engine.connect() as conn:
        fast = dialects.of(conn).read_instances(conn, wanted, ordered=ordered)
        if fast is not None:
            return fast
        if wanted is None:
            rows = list(conn.execute(base))
        else:
            for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
                rows.extend(conn.execute(base.where(instances.c.instance_id.in_(chunk))))
    return frames.frame(rows, frames.INSTANCE_SPEC)


def count_instances(engine: Engine) -> int:
    """Number of rows in ``instances``."""
    with errors(engine, "counting instances"), engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def read_audit(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Audit rows (all, or one run's) ordered by ``id``."""
    columns = [credit_sync_audit.c[name] for name in frames.AUDIT_SPEC]
    stmt = select(*columns).order_by(credit_sync_audit.c.id)
    if run_id is not None:
        stmt = stmt.where(credit_sync_audit.c.run_id == run_id)
    with errors(engine, "reading audit"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return frames.frame(rows, frames.AUDIT_SPEC)


def instances_created_since(
    engine: Engine, since: datetime, *, limit: int | None = None
) -> list[tuple[str, datetime]]:
    """``(instance_id, created_at)`` of the rows created at or after ``since``, oldest first."""
    stmt = (
        select(instances.c.instance_id, instances.c.created_at)
        .where(instances.c.created_at >= to_utc_datetime(since))
        .order_by(instances.c.created_at, instances.c.instance_id)
    )
    if limit is not None:
        stmt = stmt.limit(max(0, int(limit)))
    with errors(engine, "reading new instances"), engine.connect() as conn:
        return [(str(row.instance_id), row.created_at) for row in conn.execute(stmt)]
