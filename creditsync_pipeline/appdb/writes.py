"""Plain writes: seeding instances, upserting plans."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from sqlalchemy import Engine, insert, update

from . import dialects, limits
from .engine import write_transaction
from .errors import errors
from .schema import instances, plans
from .values import chunks


def insert_instances(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert instance rows in one transaction; return how many were inserted.

    Each row needs ``instance_id``, ``plan_id``, ``credits_total``; ``credits_used``
    defaults to 0 and ``created_at`` / ``updated_at`` to the database's clock.
    """
    optional = ("created_at", "updated_at")
    total = 0
    with errors(engine, "inserting instances"), write_transaction(engine) as conn:
        for batch in chunks(rows, limits.INSERT_CHUNK_SIZE):
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in batch:
                record = {
                    "instance_id": row["instance_id"],
                    "plan_id": row["plan_id"],
                    "credits_total": int(row["credits_total"]),
                    "credits_used": int(row.get("credits_used", 0) or 0),
                }
                record.update({key: row[key] for key in optional if key in row})
                groups.setdefault(tuple(record), []).append(record)
            for records in groups.values():
                conn.execute(insert(instances), records)
                total += len(records)
    return total


def upsert_plans(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert or update plans by ``plan_id`` in one transaction."""
    records = [
        {"plan_id": str(r["plan_id"]), "credits": int(r["credits"]), "is_free": bool(r["is_free"])}
        for r in rows
    ]
    if not records:
        return
    # Demote before promoting so moving the free flag never trips the one-free index.
    records.sort(key=lambda r: r["is_free"])
    dialect = dialects.of(engine)
    with errors(engine, "upserting plans"), write_transaction(engine) as conn:
        for record in records:
            stmt = dialect.upsert(plans, record, key=["plan_id"], update=["credits", "is_free"])
            if stmt is None:  # portable fallback
                changed = conn.execute(
                    update(plans)
                    .where(plans.c.plan_id == record["plan_id"])
                    .values(credits=record["credits"], is_free=record["is_free"])
                ).rowcount
                if not changed:
                    conn.execute(insert(plans).values(record))
                continue
            conn.execute(stmt)
