"""``revert_run``: undo one run's corrections from its audit rows (SQLite and PostgreSQL)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pandas as pd
import pytest
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    REVERT_COLUMNS,
    AppDatabaseError,
    UnknownRunError,
    apply_corrections,
    insert_instances,
    read_audit,
    read_instances,
    revert_run,
    upsert_plans,
)

from .appdb_support import NOW, PLANS, T0, by_id, corrections_frame, dump_db, instance_row, seed

LATER = NOW + timedelta(hours=2)


def _state(engine: Engine) -> dict[str, tuple[str, int, int]]:
    return {i: (r["plan_id"], r["credits_total"], r["credits_used"]) for i, r in by_id(read_instances(engine)).items()}


def _records(frame: pd.DataFrame) -> list[tuple[Any, ...]]:
    """Frame rows as plain tuples, NA as None."""
    return [tuple(None if pd.isna(v) else v for v in row) for row in frame.itertuples(index=False)]


def _run_one(engine: Engine) -> None:
    """run-1 fixes three instances; one is left alone."""
    seed(engine, [
        instance_row("paid-stuck", credits_used=42),
        instance_row("downgrade", plan_id="team", credits_total=20000, credits_used=7),
        instance_row("credits", plan_id="pro", credits_total=100, credits_used=1),
        instance_row("untouched", credits_used=5),
    ])
    result = apply_corrections(engine, corrections_frame([
        {"instance_id": "paid-stuck"},
        {"instance_id": "downgrade", "old_plan_id": "team", "old_credits_total": 20000,
         "new_plan_id": "free", "new_credits_total": 100},
        {"instance_id": "credits", "old_plan_id": "pro", "old_credits_total": 100,
         "new_plan_id": "pro", "new_credits_total": 5000, "reason": "wrong_credits"},
    ]), run_id="run-1", trigger="periodic", now=NOW)
    assert len(result.applied) == 3


def test_revert_puts_every_instance_back_and_audits_it(engine: Engine) -> None:
    _run_one(engine)
    result = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)

    assert not result.already_reverted and not result.dry_run
    assert (result.run_id, result.revert_run_id) == ("run-1", "rev-1")
    assert list(result.reverted.columns) == list(REVERT_COLUMNS) == list(result.skipped.columns)
    assert _records(result.reverted) == [
        ("paid-stuck", "pro", 5000, "free", 100),
        ("downgrade", "free", 100, "team", 20000),
        ("credits", "pro", 5000, "pro", 100),
    ]
    assert result.skipped.empty
    assert _state(engine) == {  # credits_used untouched
        "paid-stuck": ("free", 100, 42), "downgrade": ("team", 20000, 7),
        "credits": ("pro", 100, 1), "untouched": ("free", 100, 5),
    }
    rows = by_id(read_instances(engine))
    assert {i: rows[i]["updated_at"] for i in ("paid-stuck", "downgrade", "credits")} == dict.fromkeys(
        ("paid-stuck", "downgrade", "credits"), pd.Timestamp(LATER))
    assert rows["untouched"]["updated_at"] == pd.Timestamp(T0)

    audit = read_audit(engine, "rev-1")
    assert [
        (r.trigger, r.instance_id, r.old_plan_id, r.new_plan_id, r.old_credits_total, r.new_credits_total, r.reason)
        for r in audit.itertuples()
    ] == [
        ("revert", "paid-stuck", "pro", "free", 5000, 100, "revert of run run-1"),
        ("revert", "downgrade", "free", "team", 100, 20000, "revert of run run-1"),
        ("revert", "credits", "pro", "pro", 5000, 100, "revert of run run-1"),
    ]
    assert (audit["applied_at"] == pd.Timestamp(LATER)).all()
    assert len(read_audit(engine, "run-1")) == 3  # the run's own audit stays


def test_a_row_changed_since_the_run_is_skipped_never_overwritten(engine: Engine) -> None:
    _run_one(engine)
    with engine.begin() as conn:
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id == "paid-stuck")
                     .values(plan_id="team", credits_total=20000))
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id == "credits")
                     .values(credits_total=4999))
        conn.execute(appdb.instances.delete().where(appdb.instances.c.instance_id == "downgrade"))

    result = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)

    assert result.reverted.empty
    assert _records(result.skipped) == [
        ("paid-stuck", "team", 20000, "free", 100),
        ("downgrade", None, None, "team", 20000),  # the row is gone
        ("credits", "pro", 4999, "pro", 100),
    ]
    assert _state(engine) == {"paid-stuck": ("team", 20000, 42), "credits": ("pro", 4999, 1),
                              "untouched": ("free", 100, 5)}
    assert read_audit(engine, "rev-1").empty


def test_several_rounds_go_back_to_the_earliest_old_values(engine: Engine) -> None:
    seed(engine, [instance_row("twice"), instance_row("stuck-between")])
    first = corrections_frame([{"instance_id": "twice"}, {"instance_id": "stuck-between"}])
    apply_corrections(engine, first, run_id="run-1", trigger="webhook", now=NOW)
    second = corrections_frame([{"instance_id": "twice", "old_plan_id": "pro", "old_credits_total": 5000,
                                 "new_plan_id": "team", "new_credits_total": 20000, "basis_at": NOW}])
    apply_corrections(engine, second, run_id="run-1", trigger="webhook", now=NOW + timedelta(seconds=1))
    assert len(read_audit(engine, "run-1")) == 3
    # The app changed stuck-between since: it no longer holds the run's latest new value.
    with engine.begin() as conn:
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id == "stuck-between")
                     .values(plan_id="free", credits_total=100))

    result = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)

    assert _records(result.reverted) == [("twice", "team", 20000, "free", 100)]
    assert _records(result.skipped) == [("stuck-between", "free", 100, "free", 100)]
    assert _state(engine)["twice"] == ("free", 100, 0)
    assert read_audit(engine, "rev-1")["instance_id"].tolist() == ["twice"]


def test_an_intermediate_value_of_the_run_is_not_its_latest(engine: Engine) -> None:
    seed(engine, [instance_row("twice")])
    apply_corrections(engine, corrections_frame([{"instance_id": "twice"}]), run_id="run-1", trigger="manual", now=NOW)
    apply_corrections(engine, corrections_frame([{"instance_id": "twice", "old_plan_id": "pro", "old_credits_total": 5000,
                                                  "new_plan_id": "team", "new_credits_total": 20000, "basis_at": NOW}]),
                      run_id="run-1", trigger="manual", now=NOW)
    with engine.begin() as conn:  # back to round 1's value: not what the run left
        conn.execute(appdb.instances.update().values(plan_id="pro", credits_total=5000))
    result = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)
    assert result.reverted.empty and _records(result.skipped) == [("twice", "pro", 5000, "free", 100)]
    assert _state(engine)["twice"] == ("pro", 5000, 0)


def test_unknown_run_is_an_error_naming_it(engine: Engine) -> None:
    _run_one(engine)
    before = dump_db(engine)
    for dry_run in (False, True):
        with pytest.raises(UnknownRunError) as caught:
            revert_run(engine, "no-such\nrun", revert_run_id="rev-x", now=LATER, dry_run=dry_run)
        message = str(caught.value)
        assert isinstance(caught.value, AppDatabaseError)
        assert "\n" not in message and "no-such" in message and "no audit rows" in message
    assert dump_db(engine) == before


def test_a_run_already_reverted_reverts_nothing(engine: Engine) -> None:
    _run_one(engine)
    revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)
    # The app moves an instance back to the run's value: a second revert must still not touch it.
    with engine.begin() as conn:
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id == "paid-stuck")
                     .values(plan_id="pro", credits_total=5000))
    before = dump_db(engine)
    for dry_run in (True, False):
        again = revert_run(engine, "run-1", revert_run_id="rev-2", now=LATER + timedelta(hours=1), dry_run=dry_run)
        assert again.already_reverted and again.reverted.empty and again.skipped.empty
    assert dump_db(engine) == before


def test_reverting_a_revert_run_finds_nothing_to_undo(engine: Engine) -> None:
    _run_one(engine)
    revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)
    before = dump_db(engine)
    result = revert_run(engine, "rev-1", revert_run_id="rev-2", now=LATER)
    assert not result.already_reverted and result.reverted.empty and result.skipped.empty
    assert dump_db(engine) == before


def test_dry_run_reports_what_a_revert_would_do_and_writes_nothing(engine: Engine) -> None:
    _run_one(engine)
    with engine.begin() as conn:
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id == "credits")
                     .values(credits_total=4999))
    before = dump_db(engine)
    dry = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER, dry_run=True)
    assert dry.dry_run and not dry.already_reverted
    assert dump_db(engine) == before
    real = revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)
    pd.testing.assert_frame_equal(dry.reverted, real.reverted)
    pd.testing.assert_frame_equal(dry.skipped, real.skipped)
    assert dry.reverted["instance_id"].tolist() == ["paid-stuck", "downgrade"]
    assert dry.skipped["instance_id"].tolist() == ["credits"]


def test_an_audit_row_without_old_values_cannot_be_restored(engine: Engine) -> None:
    seed(engine, [instance_row("a", plan_id="pro", credits_total=5000)])
    with engine.begin() as conn:  # not something creditsync writes; the schema allows it
        conn.execute(appdb.credit_sync_audit.insert().values(
            run_id="hand", trigger="manual", instance_id="a", old_plan_id=None, new_plan_id="pro",
            old_credits_total=None, new_credits_total=5000, reason=None, applied_at=NOW))
    result = revert_run(engine, "hand", revert_run_id="rev", now=LATER)
    assert result.reverted.empty
    assert _records(result.skipped) == [("a", "pro", 5000, None, None)]
    assert _state(engine) == {"a": ("pro", 5000, 0)}


def test_a_fault_mid_revert_writes_nothing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    _run_one(engine)
    before = dump_db(engine)

    def failing_insert_audit(*args: Any, **kwargs: Any) -> None:  # after the CAS UPDATE ran
        raise RuntimeError("disk on fire\nsecond line")

    monkeypatch.setattr(appdb.corrections, "_insert_audit", failing_insert_audit)
    with pytest.raises(AppDatabaseError) as caught:
        revert_run(engine, "run-1", revert_run_id="rev-1", now=LATER)
    message = str(caught.value)
    assert "\n" not in message and "disk on fire" in message and "nothing written" in message
    assert dump_db(engine) == before


def test_bulk_revert_of_20000_corrections(engine: Engine) -> None:
    n = 20_000
    upsert_plans(engine, PLANS)
    insert_instances(engine, (instance_row(f"inst-{i:05d}", credits_used=i % 97) for i in range(n)))
    corrections = corrections_frame([{"instance_id": f"inst-{i:05d}"} for i in range(n)])
    assert len(apply_corrections(engine, corrections, run_id="bulk", trigger="periodic", now=NOW).applied) == n
    changed = [f"inst-{i:05d}" for i in range(0, n, 1000)]
    with engine.begin() as conn:
        conn.execute(appdb.instances.update().where(appdb.instances.c.instance_id.in_(changed))
                     .values(plan_id="team", credits_total=20000))

    result = revert_run(engine, "bulk", revert_run_id="rev-bulk", now=LATER)

    assert sorted(result.skipped["instance_id"]) == changed
    assert len(result.reverted) == n - len(changed)
    state = read_instances(engine).set_index("instance_id")
    assert (state.loc[result.reverted["instance_id"], "plan_id"] == "free").all()
    assert (state.loc[changed, "plan_id"] == "team").all()
    assert state["credits_used"].to_dict() == {f"inst-{i:05d}": i % 97 for i in range(n)}
    audit = read_audit(engine, "rev-bulk")
    assert len(audit) == len(result.reverted) and set(audit["trigger"]) == {"revert"}


@pytest.mark.parametrize("bad", [{"now": None}, {"now": "2024-01-01"}, {"revert_run_id": ""}])
def test_revert_needs_a_clock_and_a_run_id(engine: Engine, bad: dict) -> None:
    _run_one(engine)
    args: dict[str, Any] = {"revert_run_id": "rev", "now": LATER, **bad}
    with pytest.raises(AppDatabaseError):
        revert_run(engine, "run-1", **args)
    assert read_audit(engine, "rev").empty
