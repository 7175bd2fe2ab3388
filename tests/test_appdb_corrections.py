"""Bulk compare-and-set corrections and their audit on SQLite and PostgreSQL."""

from __future__ import annotations

import threading
import time
from datetime import timedelta, timezone
from typing import Any

import pandas as pd
import pytest
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    AppDatabaseError,
    apply_corrections,
    create_engine_from_url,
    insert_instances,
    read_audit,
    read_instances,
    upsert_plans,
)

from .appdb_support import (
    BASIS,
    NOW,
    PLANS,
    T0,
    allow_null_created_at,
    by_id,
    corrections_frame,
    dump_db,
    instance_row,
    seed,
)


# ------------------------------------------------------------- apply_corrections


def test_apply_corrections_applies_and_audits(engine: Engine) -> None:
    seed(engine, [
        instance_row("paid-stuck", credits_used=42),
        instance_row("o'brien 🚀", credits_used=99),
        instance_row("downgrade", plan_id="team", credits_total=20000, credits_used=1234),
        instance_row("untouched", credits_used=5),
    ])
    corrections = corrections_frame([
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

    rows = by_id(read_instances(engine))
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
    seed(engine, [
        instance_row("ok"),
        instance_row("plan-changed", plan_id="team", credits_total=100),
        instance_row("credits-changed", credits_total=150),
        instance_row("both-changed", plan_id="pro", credits_total=5000, credits_used=3),
    ])
    corrections = corrections_frame([
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
    rows = by_id(read_instances(engine))
    assert (rows["plan-changed"]["plan_id"], rows["plan-changed"]["credits_total"]) == ("team", 100)
    assert (rows["credits-changed"]["plan_id"], rows["credits-changed"]["credits_total"]) == ("free", 150)
    assert rows["both-changed"]["credits_used"] == 3
    assert rows["plan-changed"]["updated_at"] == pd.Timestamp(T0)
    assert "deleted-meanwhile" not in rows
    assert read_audit(engine)["instance_id"].tolist() == ["ok"]


def test_concurrent_writer_wins_over_compare_and_set(engine: Engine) -> None:
    """A row changed by a transaction that commits while the apply waits is skipped."""
    seed(engine, [instance_row("raced"), instance_row("calm")])
    corrections = corrections_frame([{"instance_id": "raced"}, {"instance_id": "calm"}])
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
    rows = by_id(read_instances(engine))
    assert (rows["raced"]["plan_id"], rows["raced"]["credits_total"]) == ("team", 20000)
    assert read_audit(engine)["instance_id"].tolist() == ["calm"]


def test_never_overwrites_state_newer_than_the_basis(engine: Engine) -> None:
    seed(engine, [
        instance_row("older", updated_at=BASIS - timedelta(microseconds=1)),
        instance_row("same-instant", updated_at=BASIS),
        instance_row("newer", updated_at=BASIS + timedelta(microseconds=1)),
        instance_row("much-newer", updated_at=BASIS + timedelta(days=1)),
        # Same instant as the basis, written with another offset.
        instance_row("other-tz", updated_at=BASIS.astimezone(timezone(timedelta(hours=-7)))),
        # No updated_at: the row's created_at is the state's age.
        instance_row("null-ts-created-before", updated_at=None, created_at=BASIS - timedelta(hours=1)),
        instance_row("null-ts-created-after", updated_at=None, created_at=BASIS + timedelta(microseconds=1)),
        # updated_at, when present, wins over created_at.
        instance_row("updated-wins", updated_at=BASIS - timedelta(seconds=1), created_at=BASIS + timedelta(days=1)),
    ])
    ids = ("older", "same-instant", "newer", "much-newer", "other-tz",
           "null-ts-created-before", "null-ts-created-after", "updated-wins")
    corrections = corrections_frame([{"instance_id": i} for i in ids])
    # The basis may arrive in any timezone; it means the same instant.
    corrections["basis_at"] = corrections["basis_at"].dt.tz_convert("Asia/Tokyo")

    result = apply_corrections(engine, corrections, run_id="stale", trigger="periodic", now=NOW)

    applied = ["null-ts-created-before", "older", "other-tz", "same-instant", "updated-wins"]
    assert sorted(result.applied["instance_id"]) == applied
    assert sorted(result.skipped["instance_id"]) == ["much-newer", "newer", "null-ts-created-after"]
    rows = by_id(read_instances(engine))
    assert rows["newer"]["plan_id"] == "free"
    assert rows["newer"]["updated_at"] == pd.Timestamp(BASIS + timedelta(microseconds=1))
    assert rows["null-ts-created-after"]["plan_id"] == "free"
    assert pd.isna(rows["null-ts-created-after"]["updated_at"])
    assert sorted(read_audit(engine)["instance_id"]) == applied


def test_a_row_without_timestamps_takes_only_data_seen_after_the_read_started(engine: Engine) -> None:
    """Neither updated_at nor created_at: the fallback is read_started_at, else now."""
    allow_null_created_at(engine)
    read_started = BASIS - timedelta(seconds=1)
    seed(engine, [
        instance_row(f"neither-{n}", updated_at=None, created_at=None) for n in range(6)
    ] + [instance_row("dated", updated_at=T0)])
    corrections = corrections_frame([
        {"instance_id": "neither-0", "basis_at": BASIS},                            # after the read: applies
        {"instance_id": "neither-1", "basis_at": read_started},                     # at the read's start: applies
        {"instance_id": "neither-2", "basis_at": read_started - timedelta(microseconds=1)},  # before: skipped
        {"instance_id": "neither-3", "basis_at": None},                             # no basis: never
        {"instance_id": "dated", "basis_at": None},                                 # no basis: never
    ])
    result = apply_corrections(engine, corrections, run_id="fallback", trigger="periodic", now=NOW,
                               read_started_at=read_started)
    assert sorted(result.applied["instance_id"]) == ["neither-0", "neither-1"]
    assert sorted(result.skipped["instance_id"]) == ["dated", "neither-2", "neither-3"]

    # Without read_started_at the fallback is `now`: only data seen at or after `now` applies.
    result = apply_corrections(
        engine,
        corrections_frame([{"instance_id": "neither-4", "basis_at": NOW - timedelta(microseconds=1)},
                           {"instance_id": "neither-5", "basis_at": NOW}]),
        run_id="fallback-now", trigger="periodic", now=NOW,
    )
    assert result.applied["instance_id"].tolist() == ["neither-5"]
    assert result.skipped["instance_id"].tolist() == ["neither-4"]
    rows = by_id(read_instances(engine))
    assert {i for i, r in rows.items() if r["plan_id"] == "pro"} == {"neither-0", "neither-1", "neither-5"}
    assert sorted(read_audit(engine)["instance_id"]) == ["neither-0", "neither-1", "neither-5"]


def test_a_null_basis_never_applies(engine: Engine) -> None:
    seed(engine, [instance_row("null-updated", updated_at=None), instance_row("dated", updated_at=T0)])
    corrections = corrections_frame([{"instance_id": "null-updated", "basis_at": None},
                                     {"instance_id": "dated", "basis_at": None}])
    result = apply_corrections(engine, corrections, run_id="nobasis", trigger="periodic", now=NOW,
                               read_started_at=T0 - timedelta(days=365))
    assert result.applied.empty and len(result.skipped) == 2
    assert read_audit(engine).empty


def test_fault_mid_apply_leaves_every_table_unchanged(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(engine, [instance_row(f"i{n}", credits_used=n) for n in range(7)])
    apply_corrections(engine, corrections_frame([{"instance_id": "i6"}]), run_id="earlier", trigger="manual", now=T0 + timedelta(days=30))
    before = dump_db(engine)

    real_insert_audit = appdb.corrections._insert_audit
    calls = {"n": 0}

    def failing_insert_audit(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # batches 1 and 2 are already updated and audited
            raise RuntimeError("disk on fire\nsecond line")
        real_insert_audit(*args, **kwargs)

    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 2)
    monkeypatch.setattr(appdb.corrections, "_insert_audit", failing_insert_audit)
    corrections = corrections_frame([{"instance_id": f"i{n}"} for n in range(6)])
    with pytest.raises(AppDatabaseError) as caught:
        apply_corrections(engine, corrections, run_id="doomed", trigger="periodic", now=NOW)

    assert calls["n"] == 3
    message = str(caught.value)
    assert "\n" not in message and "disk on fire" in message and "nothing written" in message
    assert dump_db(engine) == before

    # The connection and its scratch tables are clean: the next run works.
    monkeypatch.setattr(appdb.corrections, "_insert_audit", real_insert_audit)
    result = apply_corrections(engine, corrections, run_id="retry", trigger="periodic", now=NOW)
    assert len(result.applied) == 6
    assert len(read_audit(engine, "retry")) == 6


def test_bad_row_in_a_later_batch_rolls_back_everything(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    seed(engine, [instance_row(f"i{n}") for n in range(5)])
    before = dump_db(engine)
    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 2)
    corrections = corrections_frame(
        [{"instance_id": f"i{n}"} for n in range(4)]
        + [{"instance_id": "i4", "new_credits_total": 2**70}]  # does not fit an INTEGER
    )
    with pytest.raises(AppDatabaseError) as caught:
        apply_corrections(engine, corrections, run_id="bad", trigger="periodic", now=NOW)
    assert "\n" not in str(caught.value)
    assert dump_db(engine) == before


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
    seed(engine, [instance_row("a"), instance_row("b")])
    before = dump_db(engine)
    corrections = mutate(corrections_frame([{"instance_id": "a"}, {"instance_id": "b"}]))
    with pytest.raises(AppDatabaseError, match=match):
        apply_corrections(engine, corrections, run_id="r", trigger="manual", now=NOW)
    assert dump_db(engine) == before


def test_zero_corrections_do_not_touch_the_database() -> None:
    # An engine that cannot connect proves no round trip is made.
    dead = create_engine_from_url("postgresql+psycopg2://nobody:pw@127.0.0.1:1/none")
    try:
        result = apply_corrections(dead, corrections_frame([]), run_id="r", trigger="periodic", now=NOW)
    finally:
        dead.dispose()
    assert result.applied.empty and result.skipped.empty
    assert list(result.applied.columns) == list(appdb.CORRECTION_COLUMNS)


def test_zero_corrections_on_a_live_database(engine: Engine) -> None:
    seed(engine, [instance_row("a")])
    before = dump_db(engine)
    result = apply_corrections(engine, corrections_frame([]), run_id="r", trigger="periodic", now=NOW)
    assert result.applied.empty and result.skipped.empty
    assert dump_db(engine) == before


def test_bulk_apply_20000_rows(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    n = 20_000
    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 7_000)  # several batches, one transaction
    upsert_plans(engine, PLANS)
    insert_instances(
        engine,
        (instance_row(f"inst-{i:05d}", credits_used=i % 97,
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
