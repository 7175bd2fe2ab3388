"""App database layer on SQLite and PostgreSQL (see the ``engine`` fixture)."""

from __future__ import annotations

import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy import inspect, text
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    AppDatabaseError,
    apply_corrections,
    count_instances,
    create_engine_from_url,
    init_db,
    insert_instances,
    load_plans,
    read_audit,
    read_instances,
    redact_url,
    upsert_plans,
)

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


# ----------------------------------------------------------------------- helpers


def _instance(instance_id: str, plan_id: str = "free", credits_total: int = 100, **extra: Any) -> dict:
    row = {"instance_id": instance_id, "plan_id": plan_id, "credits_total": credits_total}
    row.setdefault("updated_at", T0)
    row.update(extra)
    return row


def _corrections(rows: list[dict]) -> pd.DataFrame:
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


def _dump(engine: Engine) -> dict[str, list]:
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


def _seed(engine: Engine, rows: list[dict]) -> None:
    upsert_plans(engine, PLANS)
    insert_instances(engine, rows)


def _by_id(frame: pd.DataFrame) -> dict[str, dict]:
    return {row["instance_id"]: row for row in frame.to_dict("records")}


# ------------------------------------------------------------------------ schema


def test_init_db_is_idempotent(engine: Engine) -> None:
    _seed(engine, [_instance("keep-me")])
    before = _dump(engine)
    assert init_db(engine) == ["001_schema.sql"]
    assert init_db(engine) == ["001_schema.sql"]
    assert _dump(engine) == before


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
    before = _dump(engine)
    with pytest.raises(AppDatabaseError):
        upsert_plans(engine, [{"plan_id": "gratis", "credits": 10, "is_free": True}])
    assert _dump(engine) == before


def test_negative_plan_credits_refused(engine: Engine) -> None:
    with pytest.raises(AppDatabaseError):
        upsert_plans(engine, [{"plan_id": "broken", "credits": -1, "is_free": False}])
    assert load_plans(engine).empty


# --------------------------------------------------------------------- instances


def test_read_instances_with_odd_ids(engine: Engine) -> None:
    many = [f"bulk-{i:05d}" for i in range(1_203)]  # forces several IN chunks
    _seed(engine, [_instance(i, credits_total=n) for n, i in enumerate(ODD_IDS + many)])
    assert count_instances(engine) == len(ODD_IDS) + len(many)

    frame = read_instances(engine, ODD_IDS + ["missing", "o'brien"])
    assert sorted(frame["instance_id"].tolist()) == sorted(ODD_IDS)
    got = frame.set_index("instance_id")["credits_total"].to_dict()
    assert got == {i: n for n, i in enumerate(ODD_IDS)}

    chunked = read_instances(engine, iter(many + ["%", "_"]))
    assert sorted(chunked["instance_id"].tolist()) == many
    assert len(read_instances(engine)) == len(ODD_IDS) + len(many)


def test_read_instances_dtypes_nulls_and_empty(engine: Engine) -> None:
    _seed(engine, [
        _instance("with-ts", credits_used=7, updated_at=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))),
        _instance("null-ts", updated_at=None),
    ])
    frame = read_instances(engine)
    assert list(frame.columns) == ["instance_id", "plan_id", "credits_total", "credits_used", "updated_at"]
    assert pd.api.types.is_string_dtype(frame["instance_id"])
    assert pd.api.types.is_string_dtype(frame["plan_id"])
    assert frame["credits_total"].dtype == "int64"
    assert frame["credits_used"].dtype == "int64"
    assert str(frame["updated_at"].dtype) == "datetime64[ns, UTC]"
    rows = _by_id(frame)
    assert rows["with-ts"]["updated_at"] == pd.Timestamp("2024-05-01 12:00", tz="UTC")
    assert rows["with-ts"]["credits_used"] == 7
    assert pd.isna(rows["null-ts"]["updated_at"])

    empty = read_instances(engine, [])
    assert empty.empty
    assert empty.dtypes.to_dict() == frame.dtypes.to_dict()
    assert read_instances(engine, ["nobody"]).empty


def test_read_instances_rejects_a_bare_string(engine: Engine) -> None:
    with pytest.raises(TypeError):
        read_instances(engine, "abc")


# ------------------------------------------------------------- apply_corrections


def test_apply_corrections_applies_and_audits(engine: Engine) -> None:
    _seed(engine, [
        _instance("paid-stuck", credits_used=42),
        _instance("o'brien 🚀", credits_used=99),
        _instance("downgrade", plan_id="team", credits_total=20000, credits_used=1234),
        _instance("untouched", credits_used=5),
    ])
    corrections = _corrections([
        {"instance_id": "paid-stuck"},
        {"instance_id": "o'brien 🚀", "new_plan_id": "team", "new_credits_total": 20000},
        {"instance_id": "downgrade", "old_plan_id": "team", "old_credits_total": 20000,
         "new_plan_id": "free", "new_credits_total": 100, "reason": None},
    ])
    now_cest = NOW.astimezone(timezone(timedelta(hours=2)))  # any aware tz is stored as UTC

    result = apply_corrections(engine, corrections, run_id="run-1", trigger="periodic", now=now_cest)

    assert result.applied["instance_id"].tolist() == ["paid-stuck", "o'brien 🚀", "downgrade"]
    assert list(result.applied.columns) == list(corrections.columns)
    assert result.skipped.empty and list(result.skipped.columns) == list(corrections.columns)

    rows = _by_id(read_instances(engine))
    assert (rows["paid-stuck"]["plan_id"], rows["paid-stuck"]["credits_total"]) == ("pro", 5000)
    assert (rows["o'brien 🚀"]["plan_id"], rows["o'brien 🚀"]["credits_total"]) == ("team", 20000)
    assert (rows["downgrade"]["plan_id"], rows["downgrade"]["credits_total"]) == ("free", 100)
    # credits_used is never touched; updated_at is the run's clock.
    assert {i: r["credits_used"] for i, r in rows.items()} == {
        "paid-stuck": 42, "o'brien 🚀": 99, "downgrade": 1234, "untouched": 5,
    }
    for instance_id in ("paid-stuck", "o'brien 🚀", "downgrade"):
        assert rows[instance_id]["updated_at"] == pd.Timestamp(NOW)
    assert rows["untouched"]["updated_at"] == pd.Timestamp(T0)

    audit = read_audit(engine, "run-1")
    assert audit["id"].is_monotonic_increasing
    records = audit.drop(columns=["id"]).to_dict("records")
    expected = [
        ("paid-stuck", "free", "pro", 100, 5000, "wrong_plan"),
        ("o'brien 🚀", "free", "team", 100, 20000, "wrong_plan"),
        ("downgrade", "team", "free", 20000, 100, None),
    ]
    assert len(records) == len(expected)
    for record, (iid, old_plan, new_plan, old_credits, new_credits, reason) in zip(records, expected):
        assert record["run_id"] == "run-1"
        assert record["trigger"] == "periodic"
        assert record["instance_id"] == iid
        assert record["old_plan_id"] == old_plan
        assert record["new_plan_id"] == new_plan
        assert record["old_credits_total"] == old_credits
        assert record["new_credits_total"] == new_credits
        assert (pd.isna(record["reason"]) if reason is None else record["reason"] == reason)
        assert record["applied_at"] == pd.Timestamp(NOW)
    assert read_audit(engine, "other-run").empty
    assert len(read_audit(engine)) == 3

    # Converges: the same corrections again find nothing left to change.
    again = apply_corrections(engine, corrections, run_id="run-2", trigger="periodic", now=NOW)
    assert again.applied.empty and len(again.skipped) == 3
    assert read_audit(engine, "run-2").empty


def test_compare_and_set_skips_rows_changed_in_between(engine: Engine) -> None:
    _seed(engine, [
        _instance("ok"),
        _instance("plan-changed", plan_id="team", credits_total=100),
        _instance("credits-changed", credits_total=150),
        _instance("both-changed", plan_id="pro", credits_total=5000, credits_used=3),
    ])
    corrections = _corrections([
        {"instance_id": "ok"},
        {"instance_id": "plan-changed"},
        {"instance_id": "credits-changed"},
        {"instance_id": "both-changed"},
        {"instance_id": "deleted-meanwhile"},
    ])
    result = apply_corrections(engine, corrections, run_id="cas", trigger="webhook", now=NOW)

    assert result.applied["instance_id"].tolist() == ["ok"]
    assert result.skipped["instance_id"].tolist() == [
        "plan-changed", "credits-changed", "both-changed", "deleted-meanwhile",
    ]
    rows = _by_id(read_instances(engine))
    assert (rows["plan-changed"]["plan_id"], rows["plan-changed"]["credits_total"]) == ("team", 100)
    assert (rows["credits-changed"]["plan_id"], rows["credits-changed"]["credits_total"]) == ("free", 150)
    assert rows["both-changed"]["credits_used"] == 3
    assert rows["plan-changed"]["updated_at"] == pd.Timestamp(T0)
    assert "deleted-meanwhile" not in rows
    assert read_audit(engine)["instance_id"].tolist() == ["ok"]


def test_concurrent_writer_wins_over_compare_and_set(engine: Engine) -> None:
    """A row changed by a transaction that commits while the apply waits is skipped."""
    _seed(engine, [_instance("raced"), _instance("calm")])
    corrections = _corrections([{"instance_id": "raced"}, {"instance_id": "calm"}])
    outcome: dict[str, Any] = {}

    def run_apply() -> None:
        try:
            outcome["result"] = apply_corrections(
                engine, corrections, run_id="race", trigger="periodic", now=NOW
            )
        except BaseException as exc:  # noqa: BLE001 - reported below
            outcome["error"] = exc

    with engine.connect() as other:
        with other.begin():
            other.execute(
                appdb.instances.update()
                .where(appdb.instances.c.instance_id == "raced")
                .values(plan_id="team", credits_total=20000)
            )
            worker = threading.Thread(target=run_apply)
            worker.start()
            time.sleep(0.5)  # the apply now waits on the other writer's lock
        worker.join(timeout=60)
    assert not worker.is_alive()
    assert "error" not in outcome, outcome.get("error")
    result = outcome["result"]
    assert result.applied["instance_id"].tolist() == ["calm"]
    assert result.skipped["instance_id"].tolist() == ["raced"]
    rows = _by_id(read_instances(engine))
    assert (rows["raced"]["plan_id"], rows["raced"]["credits_total"]) == ("team", 20000)
    assert read_audit(engine)["instance_id"].tolist() == ["calm"]


def test_never_overwrites_state_newer_than_the_basis(engine: Engine) -> None:
    _seed(engine, [
        _instance("older", updated_at=BASIS - timedelta(microseconds=1)),
        _instance("same-instant", updated_at=BASIS),
        _instance("null-ts", updated_at=None),
        _instance("newer", updated_at=BASIS + timedelta(microseconds=1)),
        _instance("much-newer", updated_at=BASIS + timedelta(days=1)),
        # Same instant as the basis, written with another offset.
        _instance("other-tz", updated_at=BASIS.astimezone(timezone(timedelta(hours=-7)))),
    ])
    corrections = _corrections([
        {"instance_id": i}
        for i in ("older", "same-instant", "null-ts", "newer", "much-newer", "other-tz")
    ])
    # The basis may arrive in any timezone; it means the same instant.
    corrections["basis_at"] = corrections["basis_at"].dt.tz_convert("Asia/Tokyo")

    result = apply_corrections(engine, corrections, run_id="stale", trigger="periodic", now=NOW)

    assert sorted(result.applied["instance_id"]) == ["null-ts", "older", "other-tz", "same-instant"]
    assert sorted(result.skipped["instance_id"]) == ["much-newer", "newer"]
    rows = _by_id(read_instances(engine))
    assert rows["newer"]["plan_id"] == "free"
    assert rows["newer"]["updated_at"] == pd.Timestamp(BASIS + timedelta(microseconds=1))
    assert sorted(read_audit(engine)["instance_id"]) == ["null-ts", "older", "other-tz", "same-instant"]


def test_fault_mid_apply_leaves_every_table_unchanged(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(engine, [_instance(f"i{n}", credits_used=n) for n in range(7)])
    apply_corrections(engine, _corrections([{"instance_id": "i6"}]), run_id="earlier", trigger="manual", now=T0 + timedelta(days=30))
    before = _dump(engine)

    real_insert_audit = appdb.corrections._insert_audit
    calls = {"n": 0}

    def failing_insert_audit(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # batches 1 and 2 are already updated and audited
            raise RuntimeError("disk on fire\nsecond line")
        real_insert_audit(*args, **kwargs)

    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 2)
    monkeypatch.setattr(appdb.corrections, "_insert_audit", failing_insert_audit)
    corrections = _corrections([{"instance_id": f"i{n}"} for n in range(6)])
    with pytest.raises(AppDatabaseError) as caught:
        apply_corrections(engine, corrections, run_id="doomed", trigger="periodic", now=NOW)

    assert calls["n"] == 3
    message = str(caught.value)
    assert "\n" not in message and "disk on fire" in message and "nothing written" in message
    assert _dump(engine) == before

    # The connection and its scratch tables are clean: the next run works.
    monkeypatch.setattr(appdb.corrections, "_insert_audit", real_insert_audit)
    result = apply_corrections(engine, corrections, run_id="retry", trigger="periodic", now=NOW)
    assert len(result.applied) == 6
    assert len(read_audit(engine, "retry")) == 6


def test_bad_row_in_a_later_batch_rolls_back_everything(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    _seed(engine, [_instance(f"i{n}") for n in range(5)])
    before = _dump(engine)
    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 2)
    corrections = _corrections(
        [{"instance_id": f"i{n}"} for n in range(4)]
        + [{"instance_id": "i4", "new_credits_total": 2**70}]  # does not fit an INTEGER
    )
    with pytest.raises(AppDatabaseError) as caught:
        apply_corrections(engine, corrections, run_id="bad", trigger="periodic", now=NOW)
    assert "\n" not in str(caught.value)
    assert _dump(engine) == before


@pytest.mark.parametrize(
    ("mutate", "match"),
    [
        (lambda f: f.drop(columns=["basis_at"]), "missing columns: basis_at"),
        (lambda f: pd.concat([f, f.iloc[[0]]], ignore_index=True), "more than once"),
        (lambda f: f.assign(new_plan_id=[None] + f["new_plan_id"].tolist()[1:]), "without new_plan_id"),
        (lambda f: f.assign(instance_id=[None] + f["instance_id"].tolist()[1:]), "without instance_id"),
        (lambda f: f.assign(new_credits_total=[1.5] + [5000] * (len(f) - 1)), "non-integer"),
    ],
)
def test_invalid_corrections_are_refused_before_writing(engine: Engine, mutate: Any, match: str) -> None:
    _seed(engine, [_instance("a"), _instance("b")])
    before = _dump(engine)
    corrections = mutate(_corrections([{"instance_id": "a"}, {"instance_id": "b"}]))
    with pytest.raises(AppDatabaseError, match=match):
        apply_corrections(engine, corrections, run_id="r", trigger="manual", now=NOW)
    assert _dump(engine) == before


def test_zero_corrections_do_not_touch_the_database() -> None:
    # An engine that cannot connect proves no round trip is made.
    dead = create_engine_from_url("postgresql+psycopg2://nobody:pw@127.0.0.1:1/none")
    try:
        result = apply_corrections(dead, _corrections([]), run_id="r", trigger="periodic", now=NOW)
    finally:
        dead.dispose()
    assert result.applied.empty and result.skipped.empty
    assert list(result.applied.columns) == list(appdb.CORRECTION_COLUMNS)


def test_zero_corrections_on_a_live_database(engine: Engine) -> None:
    _seed(engine, [_instance("a")])
    before = _dump(engine)
    result = apply_corrections(engine, _corrections([]), run_id="r", trigger="periodic", now=NOW)
    assert result.applied.empty and result.skipped.empty
    assert _dump(engine) == before


def test_bulk_apply_20000_rows(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 20_000
    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 7_000)  # several batches, one transaction
    upsert_plans(engine, PLANS)
    insert_instances(
        engine,
        (_instance(f"inst-{i:05d}", credits_used=i % 97,
                   updated_at=BASIS + timedelta(hours=1) if i % 1000 == 0 else T0)
         for i in range(n)),
    )
    current = read_instances(engine)
    assert len(current) == n
    corrections = pd.DataFrame({
        "instance_id": current["instance_id"],
        "old_plan_id": current["plan_id"],
        "new_plan_id": "pro",
        "old_credits_total": current["credits_total"],
        "new_credits_total": 5000,
        "reason": "wrong_plan",
        "basis_at": pd.Timestamp(BASIS),
    })
    # A few rows changed since the diff: their compare-and-set must fail.
    stale_cas = {f"inst-{i:05d}" for i in range(1, n, 2500)}
    corrections.loc[corrections["instance_id"].isin(stale_cas), "old_credits_total"] = 99
    newer = {f"inst-{i:05d}" for i in range(0, n, 1000)}

    result = apply_corrections(engine, corrections, run_id="bulk", trigger="periodic", now=NOW)

    skipped = stale_cas | newer
    assert set(result.skipped["instance_id"]) == skipped
    assert len(result.applied) == n - len(skipped)
    after = read_instances(engine).set_index("instance_id")
    changed = after.loc[list(result.applied["instance_id"])]
    assert (changed["plan_id"] == "pro").all() and (changed["credits_total"] == 5000).all()
    assert (after.loc[sorted(skipped), "plan_id"] == "free").all()
    expected_used = {f"inst-{i:05d}": i % 97 for i in range(n)}
    assert after["credits_used"].to_dict() == expected_used
    audit = read_audit(engine, "bulk")
    assert len(audit) == len(result.applied)
    assert set(audit["instance_id"]) == set(result.applied["instance_id"])
    assert (audit["applied_at"] == pd.Timestamp(NOW)).all()


# ----------------------------------------------------------------------- errors


def test_redact_url_hides_passwords() -> None:
    assert redact_url("postgresql://postgres:hunter2@127.0.0.1:5432/x") == (
        "postgresql://postgres:***@127.0.0.1:5432/x"
    )
    assert "hunter2" not in redact_url("postgresql://u@h/db?password=hunter2&sslmode=require")
    assert "hunter2" not in redact_url("not a url ://u:hunter2@host/db")
    assert redact_url("sqlite:////tmp/app.db") == "sqlite:////tmp/app.db"


def test_unreachable_postgres_error_hides_the_password() -> None:
    secret = "s3cr3t-Pa55w0rd"
    eng = create_engine_from_url(f"postgresql+psycopg2://alice:{secret}@127.0.0.1:1/appdb")
    try:
        for call in (
            lambda: appdb.check_connection(eng),
            lambda: read_instances(eng),
            lambda: count_instances(eng),
            lambda: init_db(eng),
            lambda: apply_corrections(eng, _corrections([{"instance_id": "a"}]),
                                      run_id="r", trigger="manual", now=NOW),
        ):
            with pytest.raises(AppDatabaseError) as caught:
                call()
            message = str(caught.value)
            assert secret not in message
            assert "\n" not in message
            assert message.startswith("app database unreachable (postgresql+psycopg2://alice:***@127.0.0.1:1/appdb)")
    finally:
        eng.dispose()


def test_invalid_url_is_an_app_database_error() -> None:
    with pytest.raises(AppDatabaseError) as caught:
        create_engine_from_url("nonsense://user:topsecret@host/db")
    assert "topsecret" not in str(caught.value)


def test_check_connection_on_a_live_database(engine: Engine) -> None:
    appdb.check_connection(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credit_sync_audit")).scalar() == 0


def test_land_webhook_event_is_idempotent_on_event_id(engine):
    from creditsync_pipeline.appdb import billing_webhook_events, land_webhook_event

    assert land_webhook_event(engine, event_id="evt_1", event_type="subscription.updated", instance_id="a/b", payload='{"x": 1}')
    assert not land_webhook_event(engine, event_id="evt_1", event_type="other", instance_id="zzz", payload=None)
    assert land_webhook_event(engine, event_id="evt_2", event_type="subscription.updated", instance_id=None, payload=None)
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(billing_webhook_events.c.event_id, billing_webhook_events.c.instance_id,
                      billing_webhook_events.c.event_type, billing_webhook_events.c.processed_at)
            .order_by(billing_webhook_events.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        ("evt_1", "a/b", "subscription.updated", None),
        ("evt_2", None, "subscription.updated", None),
    ]


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_bare_postgres_urls_use_the_shipped_driver(pg_url, scheme):
    bare = "postgresql://" + pg_url.split("://", 1)[1]
    bare = bare.replace("postgresql://", f"{scheme}://", 1)
    engine = create_engine_from_url(bare)
    try:
        assert engine.dialect.driver == "psycopg2"
        appdb.check_connection(engine)
    finally:
        engine.dispose()
