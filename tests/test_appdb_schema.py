"""Schema and init_db on SQLite and PostgreSQL (see the ``engine`` fixture)."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
from sqlalchemy import inspect
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    AppDatabaseError,
    create_engine_from_url,
    init_db,
    load_plans,
    upsert_plans,
)

from .appdb_support import PLANS, dump_db, instance_row, seed


# ------------------------------------------------------------------------ schema


def test_init_db_is_idempotent(engine: Engine) -> None:
    seed(engine, [instance_row("keep-me")])
    before = dump_db(engine)
    files = ["001_schema.sql", "002_webhook_leases.sql", "003_customer_links.sql", "004_audit_reverts.sql"]
    assert init_db(engine) == files
    assert init_db(engine) == files
    assert dump_db(engine) == before


def test_ddl_matches_sqlalchemy_tables(engine: Engine) -> None:
    inspector = inspect(engine)
    assert set(appdb.metadata.tables) <= set(inspector.get_table_names())
    for table in appdb.metadata.sorted_tables:
        reflected = {c["name"]: c for c in inspector.get_columns(table.name)}
        assert list(reflected) == [c.name for c in table.columns], table.name
        for column in table.columns:
            got = reflected[column.name]
            rowid_alias = engine.dialect.name == "sqlite" and column.primary_key and column.name == "id"
            if not rowid_alias:  # SQLite reports INTEGER PRIMARY KEY as nullable
                assert got["nullable"] == column.nullable, (table.name, column.name)
            assert got["type"].python_type is column.type.python_type, (table.name, column.name)
            if column.type.python_type is datetime and engine.dialect.name == "postgresql":
                assert got["type"].timezone, (table.name, column.name)  # TIMESTAMPTZ
        pk = inspector.get_pk_constraint(table.name)["constrained_columns"]
        assert pk == [c.name for c in table.primary_key.columns], table.name
        index_names = {ix["name"] for ix in inspector.get_indexes(table.name)}
        assert {ix.name for ix in table.indexes} <= index_names, table.name
    unique_event = [
        u for u in inspector.get_unique_constraints("billing_webhook_events")
        if u["column_names"] == ["event_id"]
    ]
    assert unique_event


@pytest.mark.postgres
def test_instances_leave_room_for_hot_updates_on_postgresql(pg_url: str) -> None:
    """fillfactor 90 on PostgreSQL: corrections and credits_used updates stay on their page."""
    engine = appdb.create_engine_from_url(pg_url)
    try:
        init_db(engine)
        with engine.connect() as conn:
            options = conn.exec_driver_sql(
                "SELECT reloptions FROM pg_class WHERE oid = 'instances'::regclass"
            ).scalar_one()
    finally:
        engine.dispose()
    assert options == ["fillfactor=90"]


def test_init_db_unknown_dialect_is_an_error() -> None:
    fake = SimpleNamespace(dialect=SimpleNamespace(name="oracle"))
    with pytest.raises(AppDatabaseError, match="unsupported app database dialect: oracle"):
        init_db(fake)  # type: ignore[arg-type]


def test_init_db_sql_dir_override(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql_dir = tmp_path / "custom_sql" / "sqlite"
    sql_dir.mkdir(parents=True)
    (sql_dir / "010_second.sql").write_text(
        "CREATE TABLE IF NOT EXISTS b (x TEXT DEFAULT '100% :literal');\n"
    )
    (sql_dir / "001_first.sql").write_text(
        "-- comment only chunk;\nCREATE TABLE IF NOT EXISTS a (x INTEGER);\n"
        "CREATE INDEX IF NOT EXISTS ix_a ON a (x);\n"
    )
    monkeypatch.setenv("CREDITSYNC_SQL_DIR", str(tmp_path / "custom_sql"))
    eng = create_engine_from_url(sqlite_url)
    try:
        assert init_db(eng) == ["001_first.sql", "010_second.sql"]
        assert {"a", "b"} <= set(inspect(eng).get_table_names())
        (sql_dir / "020_broken.sql").write_text("CREATE TABLE c (x INTEGER);\nNOT SQL AT ALL;\n")
        with pytest.raises(AppDatabaseError, match=r"init-db \(020_broken.sql\) failed"):
            init_db(eng)
        assert "c" not in inspect(eng).get_table_names()  # the whole run rolled back
    finally:
        eng.dispose()


def test_sqlite_engine_pragmas(sqlite_url: str) -> None:
    eng = create_engine_from_url(sqlite_url)
    try:
        with eng.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    finally:
        eng.dispose()


# ------------------------------------------------------------------------- plans


def test_plans_roundtrip_and_single_free_plan(engine: Engine) -> None:
    upsert_plans(engine, PLANS)
    frame = load_plans(engine)
    assert list(frame.columns) == ["plan_id", "credits", "is_free"]
    assert pd.api.types.is_string_dtype(frame["plan_id"])
    assert frame["credits"].dtype == "int64"
    assert frame["is_free"].dtype == "bool"
    assert frame.set_index("plan_id")["credits"].to_dict() == {"free": 100, "pro": 5000, "team": 20000}

    # Moving the free flag in one call works (demote before promote) ...
    upsert_plans(engine, [{"plan_id": "starter", "credits": 50, "is_free": True},
                          {"plan_id": "free", "credits": 100, "is_free": False}])
    assert load_plans(engine).query("is_free")["plan_id"].tolist() == ["starter"]
    # ... but two free plans are refused, and the refusal writes nothing.
    before = dump_db(engine)
    with pytest.raises(AppDatabaseError):
        upsert_plans(engine, [{"plan_id": "gratis", "credits": 10, "is_free": True}])
    assert dump_db(engine) == before


def test_negative_plan_credits_refused(engine: Engine) -> None:
    with pytest.raises(AppDatabaseError):
        upsert_plans(engine, [{"plan_id": "broken", "credits": -1, "is_free": False}])
    assert load_plans(engine).empty


# The billing_webhook_events table as the first release created it (no lease columns).
_OLD_WEBHOOK_TABLE = {
    "sqlite": """
CREATE TABLE billing_webhook_events (
    id            INTEGER   PRIMARY KEY AUTOINCREMENT,
    event_id      TEXT      NOT NULL UNIQUE,
    instance_id   TEXT,
    event_type    TEXT      NOT NULL,
    payload       TEXT,
    received_at   TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP,
    processed_at  TIMESTAMP,
    outcome       TEXT,
    attempts      INTEGER   NOT NULL DEFAULT 0
)""",
    "postgresql": """
CREATE TABLE billing_webhook_events (
    id            BIGINT      GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    event_id      TEXT        NOT NULL UNIQUE,
    instance_id   TEXT,
    event_type    TEXT        NOT NULL,
    payload       TEXT,
    received_at   TIMESTAMPTZ NOT NULL DEFAULT CURRENT_TIMESTAMP,
    processed_at  TIMESTAMPTZ,
    outcome       TEXT,
    attempts      INTEGER     NOT NULL DEFAULT 0
)""",
}


def test_init_db_adds_the_lease_columns_to_an_old_webhook_table(db_url: str) -> None:
    engine = create_engine_from_url(db_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(_OLD_WEBHOOK_TABLE[engine.dialect.name])
            conn.exec_driver_sql(
                "INSERT INTO billing_webhook_events (event_id, instance_id, event_type, outcome, attempts) "
                "VALUES ('evt_old', 'site-1', 'subscription.updated', 'error', 3)"
            )
        old_columns = [c["name"] for c in inspect(engine).get_columns("billing_webhook_events")]
        assert "claimed_by" not in old_columns

        first = init_db(engine)
        after_first = dump_db(engine)
        assert init_db(engine) == first  # the second run skips the columns that exist
        assert dump_db(engine) == after_first

        columns = [c["name"] for c in inspect(engine).get_columns("billing_webhook_events")]
        assert columns == old_columns + ["claimed_by", "claimed_until"]
        [row] = appdb.webhook_events_by_id(engine, [1])
        assert (row.event_id, row.instance_id, row.outcome, row.attempts) == ("evt_old", "site-1", "error", 3)
        assert (row.claimed_by, row.claimed_until) == (None, None)
        # The new columns work: the old row can be leased.
        claimed = appdb.claim_webhook_events(engine, [1], owner="run", lease_seconds=60)
        assert [(r.claimed_by, r.attempts) for r in claimed] == [("run", 4)]
    finally:
        engine.dispose()


def test_init_db_add_column_of_a_missing_table_fails_with_the_servers_message(
    sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sql_dir = tmp_path / "sql" / "sqlite"
    sql_dir.mkdir(parents=True)
    (sql_dir / "001_a.sql").write_text("CREATE TABLE IF NOT EXISTS a (x INTEGER);\n"
                                       "ALTER TABLE a ADD COLUMN y TEXT;\n")
    (sql_dir / "002_b.sql").write_text("ALTER TABLE nowhere ADD COLUMN y TEXT;\n")
    monkeypatch.setenv("CREDITSYNC_SQL_DIR", str(tmp_path / "sql"))
    eng = create_engine_from_url(sqlite_url)
    try:
        with pytest.raises(AppDatabaseError, match=r"init-db \(002_b.sql\) failed.*no such table"):
            init_db(eng)
        assert "a" not in inspect(eng).get_table_names()  # nothing of the run stayed
        (sql_dir / "002_b.sql").write_text('ALTER TABLE "a" ADD "y" TEXT;\n-- quoted, no COLUMN keyword\n')
        assert init_db(eng) == ["001_a.sql", "002_b.sql"]
        assert init_db(eng) == ["001_a.sql", "002_b.sql"]
        assert [c["name"] for c in inspect(eng).get_columns("a")] == ["x", "y"]
    finally:
        eng.dispose()
