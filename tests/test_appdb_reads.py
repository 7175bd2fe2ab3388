"""Reads of plans and instances on SQLite and PostgreSQL."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest
from sqlalchemy.engine import Engine

from creditsync_pipeline.appdb import count_instances, read_instances

from .appdb_support import ODD_IDS, by_id, instance_row, seed


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
    assert list(frame.columns) == ["instance_id", "plan_id", "credits_total", "credits_used", "updated_at"]
    assert pd.api.types.is_string_dtype(frame["instance_id"])
    assert pd.api.types.is_string_dtype(frame["plan_id"])
    assert frame["credits_total"].dtype == "int64"
    assert frame["credits_used"].dtype == "int64"
    assert str(frame["updated_at"].dtype) == "datetime64[ns, UTC]"
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
