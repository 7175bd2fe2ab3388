"""Shared data and helpers of the app-database tests (``tests/test_appdb_*.py``)."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pandas as pd
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import insert_instances, upsert_plans

UTC = timezone.utc
T0 = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
NOW = datetime(2024, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
BASIS = datetime(2024, 3, 1, 8, 0, 0, tzinfo=UTC)
PLANS = [
    {"plan_id": "free", "credits": 100, "is_free": True},
    {"plan_id": "pro", "credits": 5000, "is_free": False},
    {"plan_id": "team", "credits": 20000, "is_free": False},
]
ODD_IDS = [
    "o'brien",
    'double"quote',
    "100%",
    "%s",
    "%(name)s",
    ":param",
    "?",
    "a/b\\c",
    "semi;colon -- not a comment",
    "ünïcødé-日本語-🚀",
    "  padded  ",
    "tab\tand\nnewline",
    "",
]


def instance_row(instance_id: str, plan_id: str = "free", credits_total: int = 100, **extra: Any) -> dict:
    row = {"instance_id": instance_id, "plan_id": plan_id, "credits_total": credits_total}
    row.setdefault("updated_at", T0)
    row.update(extra)
    return row


def corrections_frame(rows: list[dict]) -> pd.DataFrame:
    """A corrections frame; each row defaults to free/100 -> pro/5000 seen at BASIS."""
    full = [
        {
            "instance_id": r["instance_id"],
            "old_plan_id": r.get("old_plan_id", "free"),
            "new_plan_id": r.get("new_plan_id", "pro"),
            "old_credits_total": r.get("old_credits_total", 100),
            "new_credits_total": r.get("new_credits_total", 5000),
            "reason": r.get("reason", "wrong_plan"),
            "basis_at": r.get("basis_at", BASIS),
        }
        for r in rows
    ]
    frame = pd.DataFrame(full, columns=list(appdb.CORRECTION_COLUMNS))
    frame["basis_at"] = pd.to_datetime(frame["basis_at"], utc=True).astype("datetime64[ns, UTC]")
    return frame


def dump_db(engine: Engine) -> dict[str, list]:
    """Every table's full contents, as the database stores them."""
    names = sorted(inspect(engine).get_table_names())
    dump: dict[str, list] = {}
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            names.append("sqlite_sequence")
            for name in names:
                dump[name] = conn.exec_driver_sql(f'SELECT * FROM "{name}" ORDER BY 1').all()
        else:
            for name in names:
                dump[name] = conn.exec_driver_sql(
                    f'SELECT CAST(t AS text) FROM "{name}" AS t ORDER BY 1'
                ).all()
    return dump


def seed(engine: Engine, rows: list[dict]) -> None:
    upsert_plans(engine, PLANS)
    insert_instances(engine, rows)


def by_id(frame: pd.DataFrame) -> dict[str, dict]:
    return {row["instance_id"]: row for row in frame.to_dict("records")}


_SQLITE_INSTANCES_NULLABLE_CREATED_AT = """
CREATE TABLE instances (
    instance_id    TEXT      PRIMARY KEY NOT NULL,
    plan_id        TEXT      NOT NULL,
    credits_total  INTEGER   NOT NULL,
    credits_used   INTEGER   NOT NULL DEFAULT 0,
    created_at     TIMESTAMP DEFAULT CURRENT_TIMESTAMP,
    updated_at     TIMESTAMP DEFAULT CURRENT_TIMESTAMP
)
"""


def allow_null_created_at(engine: Engine) -> None:
    """Make the (empty) ``instances`` table an app's own shape: ``created_at`` nullable.

    PostgreSQL alters the column; SQLite cannot, so the empty table is recreated.
    """
    with engine.begin() as conn:
        if engine.dialect.name == "sqlite":
            conn.exec_driver_sql("DROP TABLE instances")
            conn.exec_driver_sql(_SQLITE_INSTANCES_NULLABLE_CREATED_AT)
        else:
            conn.exec_driver_sql("ALTER TABLE instances ALTER COLUMN created_at DROP NOT NULL")
    assert {c["name"]: c["nullable"] for c in inspect(engine).get_columns("instances")}["created_at"]
