"""The scale paths (issue 6) on SQLite and PostgreSQL, at a size that runs in seconds.

The full sync at 20,000 instances goes through exactly the code a 1,000,000-instance
run uses: the columnar read (COPY on PostgreSQL), the vectorised rules, the bulk
compare-and-set write (a scratch table, one UPDATE ... FROM per batch, audit rows in
the same transaction; COPY-loaded on PostgreSQL). The mass-change guard, CAS and
audit are checked there, not on a toy table. No test here measures time.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb, sync
from creditsync_pipeline.billing import BillingClient
from creditsync_pipeline.simulators.generic import SYNTHETIC_PLANS, BillingSimulator, generate_records

TOKEN = "tok-scale-7b1d"
N = 20_000
ANCHOR = date(2026, 3, 2)
CREDITS = {plan: credits for plan, credits, _ in SYNTHETIC_PLANS}
REPO = Path(__file__).resolve().parents[1]


@dataclass
class World:
    engine: Engine
    sim: BillingSimulator
    billing: BillingClient
    expected: dict[str, str]  # instance_id -> plan after a correct fix
    drifted: list[str]
    used: dict[str, int]  # credits_used as seeded


def _expected_plan(record: dict[str, Any], now_iso: str) -> str:
    status, end = record["status"], record["current_period_end"]
    if status in ("active", "trialing", "past_due") or (status == "canceled" and end is not None and end > now_iso):
        return record["plan_id"]
    return "free"


def _world(engine: Engine, drift: float, seed: int = 11) -> World:
    records = generate_records(N, seed=seed, anchor=ANCHOR)
    now_iso = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    expected = {r["instance_id"]: _expected_plan(r, now_iso) for r in records}
    rng = random.Random(seed)
    drifted = rng.sample(sorted(expected), round(N * drift))
    rows = {i: {"instance_id": i, "plan_id": p, "credits_total": CREDITS[p]} for i, p in expected.items()}
    for k, iid in enumerate(drifted):
        if k % 2:  # right plan, wrong allowance
            rows[iid]["credits_total"] = CREDITS[expected[iid]] // 2
        else:  # paid but stuck on free, or free but on a paid plan
            rows[iid]["plan_id"] = "free" if expected[iid] != "free" else "pro"
            rows[iid]["credits_total"] = CREDITS[rows[iid]["plan_id"]]
    long_ago = datetime.now(timezone.utc) - timedelta(days=3)
    used = {iid: n % 97 for n, iid in enumerate(rows)}
    for iid, row in rows.items():
        row.update(credits_used=used[iid], updated_at=long_ago)
    appdb.upsert_plans(engine, [{"plan_id": p, "credits": c, "is_free": f} for p, c, f in SYNTHETIC_PLANS])
    appdb.insert_instances(engine, rows.values())
    sim = BillingSimulator(records, token=TOKEN).start()
    return World(engine, sim, BillingClient(sim.base_url, TOKEN), expected, drifted, used)


@pytest.fixture
def world(engine: Engine):
    w = _world(engine, drift=0.05)
    yield w
    w.billing.close()
    w.sim.stop()


def _state(engine: Engine) -> dict[str, tuple[str, int, int]]:
    frame = appdb.read_instances(engine, ordered=False)
    return {
        r.instance_id: (r.plan_id, int(r.credits_total), int(r.credits_used)) for r in frame.itertuples(index=False)
    }


def test_full_sync_at_scale_fixes_exactly_the_drift_with_cas_and_audit(world: World, monkeypatch) -> None:
    engine = world.engine
    # Rows a concurrent writer changes between this run's read and its write (CAS must skip
    # them), and rows changed after billing was observed (never overwritten by older data).
    raced = world.drifted[:40]
    newer = world.drifted[40:70]
    with engine.begin() as conn:
        conn.execute(
            appdb.instances.update()
            .where(appdb.instances.c.instance_id.in_(newer))
            .values(updated_at=datetime.now(timezone.utc) + timedelta(hours=1))
        )
    real_apply = appdb.apply_corrections

    def apply_after_a_concurrent_writer(*args: Any, **kwargs: Any) -> appdb.ApplyResult:
        with engine.begin() as conn:
            conn.execute(
                appdb.instances.update()
                .where(appdb.instances.c.instance_id.in_(raced))
                .values(plan_id="team", credits_total=20000)
            )
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(appdb, "apply_corrections", apply_after_a_concurrent_writer)
    report = sync.run_full_sync(engine, world.billing, trigger="periodic", run_id="scale-1")
    monkeypatch.setattr(appdb, "apply_corrections", real_apply)

    assert report.refused is None
    assert report.total_instances == N and report.billing_records == N
    assert report.mismatch_count == len(world.drifted)
    assert report.counts["wrong_plan"] + report.counts["wrong_credits"] == len(world.drifted)
    assert report.skipped_conflict == len(raced)
    assert report.skipped_stale == len(newer)
    applied = set(report.applied["instance_id"])
    assert applied == set(world.drifted) - set(raced) - set(newer)
    # The verify stage re-read the rows: all written ones are right; what is still due is
    # exactly the raced rows the concurrent writer did not happen to set right.
    assert set(report.remaining["instance_id"]) == {i for i in raced if world.expected[i] != "team"}

    state = _state(engine)
    for iid, plan in world.expected.items():
        if iid in raced:
            assert state[iid][:2] == ("team", 20000)  # the concurrent writer's values stand
        elif iid in newer:
            assert state[iid][:2] != (plan, CREDITS[plan])  # newer than billing: left alone
        else:
            assert state[iid][:2] == (plan, CREDITS[plan]), iid
        assert state[iid][2] == world.used[iid]  # credits_used is never touched

    audit = appdb.read_audit(engine, "scale-1")
    assert len(audit) == len(applied) and set(audit["instance_id"]) == applied
    assert (audit["trigger"] == "periodic").all()
    by_id = report.applied.set_index("instance_id")
    sample = audit.set_index("instance_id").loc[sorted(applied)[:500]]
    assert (sample["old_plan_id"] == by_id.loc[sample.index, "old_plan_id"]).all()
    assert (sample["new_credits_total"] == by_id.loc[sample.index, "new_credits_total"]).all()
    assert (sample["new_plan_id"].map(CREDITS) == sample["new_credits_total"]).all()

    # The next run fixes the raced rows; only the rows newer than billing stay withheld.
    again = sync.run_full_sync(engine, world.billing, trigger="periodic", run_id="scale-2")
    assert set(again.applied["instance_id"]) == {i for i in raced if world.expected[i] != "team"}
    third = sync.run_full_sync(engine, world.billing, trigger="periodic", run_id="scale-3")
    assert third.applied.empty and set(third.mismatches["instance_id"]) == set(newer)


@pytest.fixture
def drifted_world(engine: Engine):
    w = _world(engine, drift=0.15)
    yield w
    w.billing.close()
    w.sim.stop()


def test_mass_change_guard_at_scale(drifted_world: World) -> None:
    w = drifted_world
    before = _state(w.engine)
    refused = sync.run_full_sync(w.engine, w.billing, run_id="guarded")
    assert refused.refused is not None and "max_change_ratio" in refused.refused
    assert refused.planned == len(w.drifted) and refused.applied.empty
    assert _state(w.engine) == before
    assert appdb.read_audit(w.engine).empty

    dry = sync.run_full_sync(w.engine, w.billing, options=sync.SyncOptions(dry_run=True, force=True))
    assert dry.planned == len(w.drifted) and dry.applied.empty and _state(w.engine) == before

    forced = sync.run_full_sync(w.engine, w.billing, run_id="forced", options=sync.SyncOptions(force=True))
    assert forced.applied_count == len(w.drifted)
    assert len(appdb.read_audit(w.engine, "forced")) == len(w.drifted)
    assert sync.run_full_sync(w.engine, w.billing).mismatch_count == 0  # converged


# -- the columnar read and the bulk load, with every awkward value ---------------------------------

AWKWARD_IDS = [
    "plain",
    "",
    " leading and trailing ",
    "comma,inside",
    'quote"inside',
    "o'brien",
    "tab\tinside",
    "new\nline",
    "carriage\rreturn",
    "back\\slash",
    "\\N",
    "\\.",
    "NULL",
    "null",
    "NaN",
    "nan",
    "None",
    "1e5",
    "007",
    "%s %(x)s :p ?",
    "ünïcødé-日本語-🚀",
]


def test_read_instances_keeps_every_id_and_null_verbatim(engine: Engine, monkeypatch) -> None:
    stamp = datetime(2025, 7, 1, 12, 30, 15, 123456, tzinfo=timezone.utc)
    rows = [
        {"instance_id": iid, "plan_id": "pro" if n % 2 else "fr,ee\"", "credits_total": n, "credits_used": 2 * n,
         "updated_at": None if n % 5 == 0 else stamp + timedelta(seconds=n)}
        for n, iid in enumerate(AWKWARD_IDS)
    ]
    appdb.insert_instances(engine, rows)
    want = {r["instance_id"]: r for r in rows}
    for frame in (appdb.read_instances(engine), appdb.read_instances(engine, ordered=False)):
        assert sorted(frame["instance_id"]) == sorted(AWKWARD_IDS)
        assert str(frame["updated_at"].dtype) == "datetime64[ns, UTC]"
        assert frame["credits_total"].dtype == "int64" and frame["credits_used"].dtype == "int64"
        for r in frame.itertuples(index=False):
            w = want[r.instance_id]
            assert (r.plan_id, r.credits_total, r.credits_used) == (w["plan_id"], w["credits_total"], w["credits_used"])
            if w["updated_at"] is None:
                assert pd.isna(r.updated_at)
            else:
                assert r.updated_at == pd.Timestamp(w["updated_at"])
    # Named ids, in many small chunks (both the COPY and the bound-parameter paths).
    monkeypatch.setattr(appdb.limits, "COPY_READ_CHUNK_SIZE", 4)
    monkeypatch.setattr(appdb.limits, "READ_CHUNK_SIZE", 4)
    named = appdb.read_instances(engine, AWKWARD_IDS[::2] + ["missing", "\\N "], ordered=False)
    assert sorted(named["instance_id"]) == sorted(AWKWARD_IDS[::2])
    assert appdb.read_instances(engine, []).empty
    plain = appdb.read_instances(engine, ["plain", "007", "1e5"])
    assert list(plain["instance_id"]) == ["007", "1e5", "plain"]  # ordered by id


def test_bulk_load_carries_awkward_text_and_nulls_into_the_audit(engine: Engine, monkeypatch) -> None:
    appdb.upsert_plans(engine, [{"plan_id": p, "credits": c, "is_free": f} for p, c, f in SYNTHETIC_PLANS])
    long_ago = datetime(2025, 1, 1, tzinfo=timezone.utc)
    appdb.insert_instances(
        engine, [{"instance_id": iid, "plan_id": "free", "credits_total": 100, "updated_at": long_ago} for iid in AWKWARD_IDS]
    )
    reasons = [None if n % 4 == 0 else f"why {n}: {iid}\t|\\N|\r\n" for n, iid in enumerate(AWKWARD_IDS)]
    corrections = pd.DataFrame(
        {
            "instance_id": AWKWARD_IDS,
            "old_plan_id": "free",
            "new_plan_id": "team",
            "old_credits_total": 100,
            "new_credits_total": 20000,
            "reason": reasons,
            # several distinct instants, some in another zone: each is stored as the same UTC instant
            "basis_at": [pd.Timestamp("2026-01-01T00:00:00Z") + pd.Timedelta(minutes=n % 3) for n in range(len(AWKWARD_IDS))],
        }
    )
    corrections["basis_at"] = corrections["basis_at"].dt.tz_convert("Asia/Kolkata")
    monkeypatch.setattr(appdb.limits, "APPLY_BATCH_SIZE", 5)  # several batches, one transaction
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone.utc)
    result = appdb.apply_corrections(engine, corrections, run_id="awkward", trigger="manual", now=now)
    assert list(result.applied["instance_id"]) == AWKWARD_IDS and result.skipped.empty
    audit = appdb.read_audit(engine, "awkward")
    assert list(audit["instance_id"]) == AWKWARD_IDS  # in correction order
    for got, want in zip(audit["reason"], reasons):
        assert (pd.isna(got) if want is None else got == want)
    assert (audit["applied_at"] == pd.Timestamp(now)).all()
    state = appdb.read_instances(engine).set_index("instance_id")
    assert (state.loc[AWKWARD_IDS, "plan_id"] == "team").all()
    assert (state["updated_at"] == pd.Timestamp(now)).all()


# -- the synthetic data set and the simulator's generator ------------------------------------------


def test_generate_records_is_deterministic_and_well_formed() -> None:
    a = generate_records(3000, seed=5, anchor=ANCHOR)
    assert a == generate_records(3000, seed=5, anchor=ANCHOR)
    assert a != generate_records(3000, seed=6, anchor=ANCHOR)
    assert len({r["instance_id"] for r in a}) == 3000
    assert {r["status"] for r in a} == {"active", "trialing", "past_due", "canceled", "expired"}
    assert {r["plan_id"] for r in a} <= set(CREDITS) - {"free"}
    for r in a[:200]:
        assert r["updated_at"] < f"{ANCHOR.isoformat()}T" and r["updated_at"].endswith("Z")
    with pytest.raises(ValueError):
        generate_records(-1)


def test_simulator_cli_serves_generated_records() -> None:
    env = {**os.environ, "BILLING_API_TOKEN": TOKEN}
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.simulators.generic", "--port", "0", "--generate", "2500",
         "--seed", "3", "--anchor", ANCHOR.isoformat()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("billing simulator listening on http://127.0.0.1:"), line
        with BillingClient(line.split()[-1], TOKEN) as client:
            snapshot = client.fetch_all()
        want = generate_records(2500, seed=3, anchor=ANCHOR)
        assert snapshot.pages == 3 and snapshot.invalid.empty
        got = snapshot.records.sort_values("instance_id")
        assert list(got["instance_id"]) == sorted(r["instance_id"] for r in want)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_simulator_cli_refuses_records_and_generate_together(tmp_path: Path) -> None:
    records = tmp_path / "r.json"
    records.write_text("[]")
    result = subprocess.run(
        [sys.executable, "-m", "creditsync_pipeline.simulators.generic", "--records", str(records), "--generate", "3"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )
    assert result.returncode == 2 and "mutually exclusive" in result.stderr


# -- the benchmark itself keeps working (its numbers are not checked) --------------------------------


@pytest.mark.slow
@pytest.mark.postgres
def test_benchmark_runs_end_to_end(pg_admin_engine: Engine) -> None:
    admin_url = pg_admin_engine.url.render_as_string(hide_password=False)
    result = subprocess.run(
        [sys.executable, "benchmarks/bench_full_sync.py", "--n", "3000", "--drift", "0.05", "--naive-rows", "100",
         "--json", "--pg-admin-url", admin_url],
        capture_output=True, text=True, cwd=REPO, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout)
    assert out["n"] == 3000 and out["corrections"] == 150
    assert out["fix"]["applied"] == 150 and out["fix"]["remaining"] == 0
    assert set(out["fix"]["stages_s"]) == {"fetch", "read", "diff", "write", "verify"}
    assert out["io_floor"]["pages"] == 3 and out["writes"]["naive_rows"] == 100
    assert out["peak_rss_mb"] > 0
    with pg_admin_engine.connect() as conn:  # the throw-away database is gone
        left = conn.execute(sa.text("SELECT count(*) FROM pg_database WHERE datname LIKE 'creditsync_bench_%'"))
        assert left.scalar() == 0
