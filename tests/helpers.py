"""Shared test helpers: seeding, table dumps, end-state reads."""

from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import DemoData, demo_dataset, seed_database

TOKEN = "tok-SECRET-9f3c1e77b2"
NOW = datetime.now(timezone.utc)


def seeded(db_url: str, size: int = 200) -> DemoData:
    """Seed the demo data set into ``db_url``; return it with its expected end state."""
    data = demo_dataset(NOW, size=size)
    seed_database(db_url, data)
    return data


def dump_tables(db_url: str) -> dict[str, list[tuple]]:
    """Every row of every creditsync table, sorted: a byte-for-byte comparison basis."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            return {
                table.name: sorted(
                    (tuple(repr(v) for v in row) for row in conn.execute(sa.select(table))),
                )
                for table in appdb.metadata.sorted_tables
            }
    finally:
        engine.dispose()


def end_state(db_url: str) -> dict[str, tuple[str, int, int]]:
    """instance_id -> (plan_id, credits_total, credits_used)."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        df = appdb.read_instances(engine)
    finally:
        engine.dispose()
    return {
        r.instance_id: (r.plan_id, int(r.credits_total), int(r.credits_used)) for r in df.itertuples(index=False)
    }


def audit_rows(db_url: str):
    engine = appdb.create_engine_from_url(db_url)
    try:
        return appdb.read_audit(engine)
    finally:
        engine.dispose()
