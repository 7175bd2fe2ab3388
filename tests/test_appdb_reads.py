"""Reads of plans and instances on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from sqlalchemy.engine import Engine

from creditsync_pipeline.appdb import count_instances, create_engine_from_url, init_db, read_instances

from .appdb_support import ODD_IDS, T0, allow_null_created_at, by_id, instance_row, seed


# --------------------------------------------------------------------- instances


def test_read_instances_with_odd_ids(engine: Engine) -> None:
    many = [f"bulk-{i:05d}" for i in range(1_203)]  # forces several IN chunks
    seed(engine, [instance_row(i, credits_total=n) for n, i in enumerate(ODD_IDS + many)])
    assert count_instances(engine) == len(ODD_IDS) + len(many)

    frame = read_instances(engine, ODD_IDS + ["missing", "o'brien"])
    assert sorted(frame["instance_id"].tolist()) == sorted(ODD_IDS)
    got = frame.set_index("instance_id")["credits_total"].to_dict()
    assert got == {i: n for n, i in enumerate(ODD_IDS)}

    chunked = read_instances(engine, iter(many + ["%", "_"]))
    assert sorted(chunked["instance_id"].tolist()) == many
    assert len(read_instances(engine)) == len(ODD_IDS) + len(many)


def test_read_instances_dtypes_nulls_and_empty(engine: Engine) -> None:
    seed(engine, [
        instance_row("with-ts", credits_used=7, updated_at=datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))),
        instance_row("null-ts", updated_at=None),
    ])
    frame = read_instances(engine)
    assert list(frame.columns) == [
        "instance_id", "plan_id", "credits_total", "credits_used", "created_at", "updated_at",
    ]
    assert pd.api.types.is_string_dtype(frame["instance_id"])
    assert pd.api.types.is_string_dtype(frame["plan_id"])
    assert frame["credits_total"].dtype == "int64"
    assert frame["credits_used"].dtype == "int64"
    assert str(frame["updated_at"].dtype) == "datetime64[ns, UTC]"
    assert str(frame["created_at"].dtype) == "datetime64[ns, UTC]"
    rows = by_id(frame)
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


@pytest.mark.parametrize("ids", [None, ["given", "null-created", "defaulted", "absent"]], ids=["all", "named"])
def test_read_instances_returns_created_at(engine: Engine, ids: list[str] | None) -> None:
    """created_at on every path (COPY on PostgreSQL, bound SELECTs elsewhere); NaT for NULL."""
    allow_null_created_at(engine)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    given = datetime(2023, 7, 9, 23, 59, 58, 654321, tzinfo=timezone(timedelta(hours=-5)))
    seed(engine, [
        instance_row("given", created_at=given, updated_at=None),
        instance_row("null-created", created_at=None, updated_at=T0),
        instance_row("defaulted"),  # the database's own DEFAULT CURRENT_TIMESTAMP
    ])
    for ordered in (True, False):
        frame = read_instances(engine, ids, ordered=ordered)
        assert str(frame["created_at"].dtype) == "datetime64[ns, UTC]"
        rows = by_id(frame)
        assert sorted(rows) == ["defaulted", "given", "null-created"]
        assert rows["given"]["created_at"] == pd.Timestamp("2023-07-10 04:59:58.654321", tz="UTC")
        assert pd.isna(rows["given"]["updated_at"])
        assert pd.isna(rows["null-created"]["created_at"])
        assert rows["null-created"]["updated_at"] == pd.Timestamp(T0)
        defaulted = rows["defaulted"]["created_at"]
        assert before - timedelta(minutes=5) <= defaulted.to_pydatetime() <= datetime.now(timezone.utc) + timedelta(minutes=5)


@pytest.mark.postgres
def test_copy_read_equals_the_portable_read_on_postgresql(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """COPY's epoch-microsecond timestamps = SQLAlchemy's, whatever the session's time zone."""
    from creditsync_pipeline.appdb.dialects.postgresql import PostgreSQL

    odd_zone = pg_url + ("&" if "?" in pg_url else "?") + "options=-c%20TimeZone%3DAsia/Kathmandu"
    engine = create_engine_from_url(odd_zone)
    try:
        init_db(engine)
        allow_null_created_at(engine)
        stamps = [
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            datetime(2024, 2, 29, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=5, minutes=45))),
            datetime(2038, 1, 19, 3, 14, 8, 500000, tzinfo=timezone.utc),
            None,
        ]
        seed(engine, [
            instance_row(f"i{n}", created_at=stamps[n % 4], updated_at=stamps[(n + 1) % 4])
            for n in range(12)
        ])
        fast = read_instances(engine)
        monkeypatch.setattr(PostgreSQL, "read_instances", lambda self, conn, wanted, *, ordered: None)
        portable = read_instances(engine)
    finally:
        engine.dispose()
    pd.testing.assert_frame_equal(fast, portable)
    assert fast["created_at"].isna().sum() == 3
