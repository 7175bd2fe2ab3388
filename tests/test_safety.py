"""Never downgrade a paying customer on thin evidence: one test per rule of SPEC's safety review.

Each test drives creditsync through a stable interface (the CLI, the HTTP app, a Dagster
materialization) over real HTTP and a real database (SQLite, PostgreSQL and MySQL), and each
fails on the code before the rule existed: a paying instance ends up on the free plan, a
committed correction is reported as a failure, a log line can be faked, and so on.
"""

from __future__ import annotations

import json
import logging
import os
import time
import unicodedata
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterInstance, materialize

from creditsync_pipeline import appdb, cli, sync
from creditsync_pipeline.billing import BillingClient
from creditsync_pipeline.defs.assets import credit_sync_assets
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.server import create_app
from creditsync_pipeline.server.tokens import TokenError, sign_instance_token, verify_instance_token
from creditsync_pipeline.settings import Secret, Settings
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from starlette.testclient import TestClient

APP_SECRET = "app-SECRET-safety-71c2"


@pytest.fixture
def sim():
    with BillingSimulator(token=TOKEN) as s:
        yield s


@pytest.fixture
def world(db_url, sim, monkeypatch):
    data = seeded(db_url)
    sim.set_records(data.records)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("BILLING_API_URL", sim.base_url)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    monkeypatch.setenv("BILLING_API_MAX_ATTEMPTS", "2")
    return data


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert TOKEN not in out + err
    return code, out, err


def paying(data) -> list[str]:
    """Instances the app has on a paid plan, correctly."""
    rows = {r["instance_id"]: r for r in data.instances}
    return [i for i, (plan, _) in data.expected.items() if plan != "free" and rows[i]["plan_id"] == plan][:5]


# -- 1. only {"error": "subscription_not_found"} means "no subscription" ------------------------


@pytest.mark.parametrize(
    "body", [{"detail": "Not Found"}, {"message": "no Route matched with those values"}, {}],
    ids=["framework", "gateway", "empty"],
)
def test_a_404_that_is_not_subscription_not_found_never_downgrades(world, db_url, sim, capsys, body):
    payer = paying(world)[0]
    sim.delete(payer)  # billing answers 404 for it ...
    sim.not_found_body = body  # ... but not the contract's 404: a deploy, a wrong path
    before = dump_tables(db_url)
    code, out, err = run_cli(capsys, "fix", "--instance", payer, "--json")
    assert code == cli.EXIT_LEFT_ALONE, err
    doc = json.loads(out)
    assert [u["instance_id"] for u in doc["unresolved_instances"]] == [payer]
    assert doc["unresolved_instances"][0]["status"] == "error"
    assert dump_tables(db_url) == before  # left alone: still on its paid plan, no audit row

    sim.not_found_body = {"error": "subscription_not_found"}  # the real answer: no subscription at all
    code, _, _ = run_cli(capsys, "fix", "--instance", payer)
    assert code == 0 and end_state(db_url)[payer][:2] == ("free", 100)


# -- 2. the paid-downgrade guard and the floor of 10 --------------------------------------------


def test_a_freemium_list_truncated_to_one_record_is_refused(db_url, sim, monkeypatch, capsys):
    """60 of 1,000 instances pay; billing's list comes back with one record: 59 paid -> free."""
    engine = appdb.create_engine_from_url(db_url)
    appdb.init_db(engine)
    appdb.upsert_plans(engine, [{"plan_id": "free", "credits": 100, "is_free": True},
                                {"plan_id": "pro", "credits": 5000, "is_free": False}])
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    appdb.insert_instances(engine, [
        {"instance_id": f"p{n:03d}", "plan_id": "pro", "credits_total": 5000, "created_at": old, "updated_at": old}
        for n in range(60)
    ] + [
        {"instance_id": f"f{n:03d}", "plan_id": "free", "credits_total": 100, "created_at": old, "updated_at": old}
        for n in range(940)
    ])
    engine.dispose()
    sim.set_records([{"instance_id": "p000", "plan_id": "pro", "status": "active", "current_period_end": None,
                      "updated_at": "2026-01-01T00:00:00Z"}])
    for name, value in (("DATABASE_URL", db_url), ("BILLING_API_URL", sim.base_url), ("BILLING_API_TOKEN", TOKEN)):
        monkeypatch.setenv(name, value)
    before = dump_tables(db_url)
    code, _, err = run_cli(capsys, "fix")
    assert code == cli.EXIT_REFUSED
    assert "paid-downgrade guard: would move 59 of 60 paid instance(s)" in err and "limit of 10" in err
    assert dump_tables(db_url) == before
    monkeypatch.setenv("CREDITSYNC_MAX_PAID_DOWNGRADE_RATIO", "1.0")  # an operator who really means it
    code, _, err = run_cli(capsys, "fix")
    assert code == 0, err
    assert sum(1 for plan, _, _ in end_state(db_url).values() if plan == "pro") == 1


def test_a_tiny_app_applies_a_single_cancellation_without_force(db_url, sim, monkeypatch, capsys):
    engine = appdb.create_engine_from_url(db_url)
    appdb.init_db(engine)
    appdb.upsert_plans(engine, [{"plan_id": "free", "credits": 100, "is_free": True},
                                {"plan_id": "pro", "credits": 5000, "is_free": False}])
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    appdb.insert_instances(engine, [
        {"instance_id": f"s{n}", "plan_id": "pro", "credits_total": 5000, "created_at": old, "updated_at": old}
        for n in range(5)
    ])
    engine.dispose()
    active = {"plan_id": "pro", "status": "active", "current_period_end": None, "updated_at": "2026-01-01T00:00:00Z"}
    sim.set_records([{"instance_id": f"s{n}", **active} for n in range(4)]
                    + [{"instance_id": "s4", **active, "status": "expired"}])
    for name, value in (("DATABASE_URL", db_url), ("BILLING_API_URL", sim.base_url), ("BILLING_API_TOKEN", TOKEN)):
        monkeypatch.setenv(name, value)
    code, _, err = run_cli(capsys, "fix")
    assert code == 0, err  # 1 of 5 is 20 % > 10 %, but the floor is 10 instances
    assert end_state(db_url)["s4"][:2] == ("free", 100)


# -- 3. look-alike ids ------------------------------------------------------------------------------


def test_look_alike_billing_ids_leave_the_real_rows_alone(world, db_url, sim, capsys):
    engine = appdb.create_engine_from_url(db_url)
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    cafe = unicodedata.normalize("NFC", "caf\u00e9")
    appdb.insert_instances(engine, [
        {"instance_id": "abc", "plan_id": "pro", "credits_total": 5000, "created_at": old, "updated_at": old},
        {"instance_id": cafe, "plan_id": "team", "credits_total": 20000, "created_at": old, "updated_at": old},
        {"instance_id": "zw", "plan_id": "pro", "credits_total": 5000, "created_at": old, "updated_at": old},
    ])
    engine.dispose()
    rec = {"plan_id": "pro", "status": "active", "current_period_end": None, "updated_at": "2026-01-02T00:00:00Z"}
    sim.upsert({"instance_id": "abc ", **rec})  # trailing space
    sim.upsert({"instance_id": "cafe\u0301", **rec, "plan_id": "team"})  # NFD
    sim.upsert({"instance_id": "z\u200bw", **rec})  # a zero-width space (Cf)
    before = end_state(db_url)
    code, out, err = run_cli(capsys, "fix", "--json")
    assert code == 0, err
    doc = json.loads(out)
    invalid = {m["instance_id"] for m in doc["mismatches"] if m["kind"] == "invalid_record"}
    assert {"abc ", "cafe\u0301", "z\u200bw", "abc", cafe, "zw"} <= invalid
    after = end_state(db_url)
    for iid in ("abc", cafe, "zw"):  # before the rule: three paying rows sent to the free plan
        assert after[iid] == before[iid]
    assert not set(audit_rows(db_url)["instance_id"]) & {"abc", cafe, "zw"}


@pytest.mark.parametrize("bad", ["abc\u202e", "abc\u2028", " abc", "cafe\u0301", "a\u200bb"])
def test_instance_tokens_refuse_look_alike_ids(bad):
    token = sign_instance_token(APP_SECRET, bad)
    with pytest.raises(TokenError):
        verify_instance_token(token, APP_SECRET)


# -- 4. stale decisions ---------------------------------------------------------------------------


def test_a_re_executed_old_decision_refuses_to_write(world, db_url, sim, monkeypatch):
    """The full sync is one Dagster step: its write cannot be re-run alone from a stored
    decision (the subset is refused), and a decision made 20 minutes ago refuses to write."""
    resources = {
        "app_db": AppDatabaseResource(database_url=db_url),
        "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN),
    }
    before = dump_tables(db_url)
    with DagsterInstance.ephemeral() as instance:
        first = materialize(credit_sync_assets, resources=resources, instance=instance,
                            run_config={"ops": {"credit_sync": {"config": {"dry_run": True}}}})
        assert first.success
        with pytest.raises(Exception) as refused:
            materialize(credit_sync_assets, resources=resources, instance=instance, selection="credit_corrections")
        assert "does not support subsetting" in f"{refused.value} {refused.value.__cause__}"
    assert dump_tables(db_url) == before

    # the guard behind it (any caller that keeps a decision): billing data 20 minutes old
    engine = appdb.create_engine_from_url(db_url)
    try:
        with BillingClient(sim.base_url, TOKEN) as billing:
            snapshot = sync.fetch_billing(billing, engine)
        decision = sync.decide(snapshot, sync.read_state(engine), options=sync.SyncOptions())
        assert len(decision.corrections) > 0
        later = datetime.now(timezone.utc) + timedelta(minutes=20)
        with pytest.raises(sync.DecisionTooOld, match="fetched 20 minute\\(s\\) ago"):
            sync.apply(engine, decision, run_id="old", trigger="manual", options=sync.SyncOptions(), now=later)
    finally:
        engine.dispose()
    assert dump_tables(db_url) == before


# -- 6. a failure after the commit ----------------------------------------------------------------


def test_a_failure_after_the_commit_still_reports_the_commit(world, db_url, sim, monkeypatch, caplog):
    def broken_verify(*args, **kwargs):
        raise appdb.AppDatabaseError("app database unreachable (sqlite): the re-read failed")

    monkeypatch.setattr(sync.runs, "verify", broken_verify)
    cfg = Settings(database_url=db_url, billing_api_url=sim.base_url, billing_api_token=Secret(TOKEN),
                   app_secret=Secret(APP_SECRET), sync_rate_limit=100)
    caplog.set_level(logging.INFO)
    billing = BillingClient(sim.base_url, TOKEN, max_attempts=1)
    with TestClient(create_app(cfg, billing=billing), raise_server_exceptions=False) as client:
        response = client.post("/api/billing/sync-credits",
                               headers={"x-wix-instance": sign_instance_token(APP_SECRET, "abc123")})
    assert response.status_code == 200, response.text  # before the rule: 503 "nothing changed"
    body = response.json()
    assert body["changed"] is True and body["new"] == {"plan_id": "pro", "credits_total": 5000}
    assert any("the check after the commit failed" in w for w in body["warnings"])
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)
    assert list(audit_rows(db_url)["instance_id"]) == ["abc123"]
    assert "Synced credits for instance abc123: 100 → 5000" in caplog.text


# -- 9. smaller leaks and traps -------------------------------------------------------------------


def test_an_instance_id_cannot_fake_a_log_line(db_url, sim, monkeypatch, caplog):
    evil = "x1\u2028[CreditSync] All instances already have correct credits\u202e"
    engine = appdb.create_engine_from_url(db_url)
    appdb.init_db(engine)
    appdb.upsert_plans(engine, [{"plan_id": "free", "credits": 100, "is_free": True},
                                {"plan_id": "pro", "credits": 5000, "is_free": False}])
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    appdb.insert_instances(engine, [{"instance_id": evil, "plan_id": "pro", "credits_total": 5000,
                                     "created_at": old, "updated_at": old}])
    caplog.set_level(logging.INFO)
    with BillingClient(sim.base_url, TOKEN) as billing:  # no record for it: a real downgrade
        report = sync.run_full_sync(engine, billing, options=sync.SyncOptions(force=True))
    engine.dispose()
    assert report.applied_count == 1
    lines = [r.getMessage() for r in caplog.records]
    assert not any("\u2028" in line or "\u202e" in line for line in lines)
    assert any(line.startswith("Synced credits for instance x1\\u2028[CreditSync]") for line in lines)


def test_the_mismatch_report_is_spreadsheet_safe_and_pruned(world, db_url, sim, monkeypatch):
    engine = appdb.create_engine_from_url(db_url)
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    appdb.insert_instances(engine, [{"instance_id": '=HYPERLINK("http://evil.example","x")', "plan_id": "@pro",
                                     "credits_total": 1, "created_at": old, "updated_at": old}])
    engine.dispose()
    resources = {
        "app_db": AppDatabaseResource(database_url=db_url),
        "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN),
    }
    monkeypatch.setenv("CREDITSYNC_REPORT_RETENTION_DAYS", "30")
    with DagsterInstance.ephemeral() as instance:
        folder = Path(instance.storage_directory()) / "creditsync_reports"
        folder.mkdir(parents=True, exist_ok=True)
        stale = folder / "credit_mismatches-old-run.csv"
        stale.write_text("instance_id\n")
        month_ago = time.time() - 31 * 86400
        os.utime(stale, (month_ago, month_ago))
        fresh = folder / "credit_mismatches-recent-run.csv"
        fresh.write_text("instance_id\n")
        result = materialize(credit_sync_assets, resources=resources, instance=instance,
                             run_config={"ops": {"credit_sync": {"config": {"dry_run": True}}}})
        assert result.success
        reports = sorted(folder.glob("credit_mismatches-*.csv"))
        assert stale not in reports and fresh in reports
        (report,) = [p for p in reports if result.run_id in p.name]
        frame = pd.read_csv(report, dtype=str, keep_default_na=False)
    evil = frame[frame["current_plan_id"] == "'@pro"]
    assert evil["instance_id"].tolist() == ['\'=HYPERLINK("http://evil.example","x")']
    assert not frame.map(lambda v: isinstance(v, str) and v.startswith(("=", "+", "@"))).any().any()


# -- 5. NULL updated_at -----------------------------------------------------------------------------


def test_a_row_without_updated_at_is_not_overwritten_by_an_older_snapshot(world, db_url, sim):
    """The list was fetched, then the app provisioned a paying instance without updated_at."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        with BillingClient(sim.base_url, TOKEN) as billing:
            snapshot = sync.fetch_billing(billing, engine)  # billing has no record for "newcomer" (yet)
        time.sleep(0.05)
        appdb.insert_instances(engine, [{"instance_id": "newcomer", "plan_id": "pro", "credits_total": 5000,
                                         "created_at": datetime.now(timezone.utc), "updated_at": None}])
        state = sync.read_state(engine)
        options = sync.SyncOptions(force=True)
        decision = sync.decide(snapshot, state, options=options)
        assert "newcomer" in set(decision.stale["instance_id"])  # newer than the snapshot: withheld
        assert "newcomer" not in set(decision.corrections["instance_id"])
        result = sync.apply(engine, decision, run_id="r1", trigger="manual", options=options)
        assert result is not None
        # ... and the database's compare-and-set says the same for a correction forced through:
        forced = decision.stale[decision.stale["instance_id"] == "newcomer"]
        again = appdb.apply_corrections(engine, forced, run_id="r2", trigger="manual",
                                        now=datetime.now(timezone.utc), read_started_at=state.read_started_at)
        assert again.applied.empty and list(again.skipped["instance_id"]) == ["newcomer"]
    finally:
        engine.dispose()
    assert end_state(db_url)["newcomer"][:2] == ("pro", 5000)
