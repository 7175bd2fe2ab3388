"""End to end: the ``creditsync`` CLI over real HTTP against the simulator.

Runs on SQLite, PostgreSQL and MySQL (``db_url`` fixture). Every fault the billing
API can throw is injected; the end state of every instance and the audit
rows are asserted exactly, and a failed run must leave the database
byte-for-byte unchanged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from creditsync_pipeline import cli
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded


@pytest.fixture
def sim():
    with BillingSimulator(token=TOKEN) as s:
        yield s


@pytest.fixture
def world(db_url, sim, monkeypatch):
    """A seeded app DB, the simulator serving its billing data, env pointing at both."""
    data = seeded(db_url)
    sim.set_records(data.records)
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("BILLING_API_URL", sim.base_url)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    monkeypatch.setenv("BILLING_API_PAGE_SIZE", "25")  # 77 records -> 4 pages
    monkeypatch.setenv("BILLING_API_MAX_ATTEMPTS", "4")
    return data


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(list(args))
    out, err = capsys.readouterr()
    assert TOKEN not in out and TOKEN not in err, "the billing token leaked into CLI output"
    return code, out, err


EXPECTED_COUNTS = {"wrong_plan": 12, "wrong_credits": 3, "unknown_plan": 1, "missing_instance": 1, "invalid_record": 0}


def test_check_reports_every_kind_and_writes_nothing(world, db_url, capsys):
    before = dump_tables(db_url)
    code, out, _ = run_cli(capsys, "check", "--json")
    assert code == 1
    doc = json.loads(out)
    assert doc["counts"] == EXPECTED_COUNTS
    by_id = {m["instance_id"]: m for m in doc["mismatches"]}
    assert by_id["abc123"] == {
        "instance_id": "abc123",
        "kind": "wrong_plan",
        "current_plan_id": "free",
        "expected_plan_id": "pro",
        "current_credits_total": 100,
        "expected_credits_total": 5000,
    } | {k: by_id["abc123"][k] for k in by_id["abc123"] if k not in {
        "instance_id", "kind", "current_plan_id", "expected_plan_id", "current_credits_total", "expected_credits_total"}}
    assert by_id["deleted-site-9"]["kind"] == "missing_instance"
    assert by_id["deleted-site-9"]["current_plan_id"] is None
    assert dump_tables(db_url) == before


def test_fix_reaches_the_exact_end_state_and_converges(world, db_url, capsys, caplog):
    before = end_state(db_url)
    code, out, err = run_cli(capsys, "fix")
    assert code == 0, err
    after = end_state(db_url)
    for iid, (plan, credits) in world.expected.items():
        assert after[iid][:2] == (plan, credits), iid
        assert after[iid][2] == before[iid][2], "credits_used must never change"
    # the unknown-plan instance is left exactly as it was
    unknown = next(i["instance_id"] for i in world.instances if i["instance_id"] not in world.expected)
    assert after[unknown] == before[unknown]

    audit = audit_rows(db_url)
    assert len(audit) == 15
    assert set(audit["trigger"]) == {"manual"} and audit["run_id"].nunique() == 1
    row = audit.set_index("instance_id").loc["abc123"]
    assert (row["old_plan_id"], row["new_plan_id"], row["old_credits_total"], row["new_credits_total"]) == ("free", "pro", 100, 5000)
    changed = {i for i in before if before[i][:2] != after[i][:2]}
    assert changed == set(audit["instance_id"])

    logs = caplog.text
    assert "[CreditSync] Running credit sync task..." in logs
    assert "Synced credits for instance abc123: 100 → 5000" in logs
    assert "[CreditSync] Successfully synced credits for 15 instance(s)" in logs
    assert TOKEN not in logs

    # a second run right after converges: nothing left to correct
    caplog.clear()
    code, out, _ = run_cli(capsys, "fix", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["planned"] == 0 and doc["applied"] == 0
    assert {m["kind"] for m in doc["mismatches"]} == {"unknown_plan", "missing_instance"}
    assert len(audit_rows(db_url)) == 15


@pytest.mark.parametrize(
    "fault",
    [
        dict(kind="rate_limit", endpoint="list", after=1, count=2, retry_after=1),
        dict(kind="error", endpoint="list", after=2, count=2),
        dict(kind="drop", endpoint="list", after=1, count=1),
        dict(kind="slow", endpoint="list", after=1, count=1, delay=2.0),
    ],
    ids=["429-retry-after", "500-twice", "dropped-connection", "slow-page"],
)
def test_transient_faults_are_retried_and_the_fix_completes(world, db_url, sim, fault, capsys, monkeypatch):
    monkeypatch.setenv("BILLING_API_TIMEOUT", "0.5")
    sim.add_fault(**fault)
    code, _, err = run_cli(capsys, "fix")
    assert code == 0, err
    after = end_state(db_url)
    assert {i: after[i][:2] for i in world.expected} == world.expected
    assert len(audit_rows(db_url)) == 15


@pytest.mark.parametrize(
    "fault, message",
    [
        (dict(kind="error", endpoint="list", after=2, count=None), "unavailable"),
        (dict(kind="malformed", endpoint="list", after=2, count=1), "malformed"),
        (dict(kind="bad_shape", endpoint="list", after=1, count=1), "malformed"),
        (dict(kind="drop", endpoint="list", after=1, count=None), "unavailable"),
    ],
    ids=["persistent-500-mid-list", "html-page", "wrong-shape", "always-dropped"],
)
def test_incomplete_or_malformed_list_changes_nothing(world, db_url, sim, fault, message, capsys):
    before = dump_tables(db_url)
    sim.add_fault(**fault)
    code, out, err = run_cli(capsys, "fix")
    assert code == 2
    lines = [l for l in err.splitlines() if l.startswith("creditsync:")]
    assert len(lines) == 1 and message in lines[0].lower(), err
    assert "Traceback" not in err
    assert dump_tables(db_url) == before


def test_bad_token_is_one_line_and_leaks_nothing(world, db_url, capsys, monkeypatch):
    before = dump_tables(db_url)
    monkeypatch.setenv("BILLING_API_TOKEN", "wrong-" + TOKEN)
    code = cli.main(["fix"])
    out, err = capsys.readouterr()
    assert code == 2
    assert "rejected the token" in err
    assert TOKEN not in out + err
    assert dump_tables(db_url) == before


def test_record_without_instance_id_fails_the_run(world, db_url, sim, capsys):
    before = dump_tables(db_url)
    sim.upsert({"instance_id": "", "plan_id": "pro", "status": "active", "current_period_end": None,
                "updated_at": "2026-11-01T00:00:00Z"})
    code, _, err = run_cli(capsys, "fix")
    assert code == 2 and "instance_id" in err
    assert dump_tables(db_url) == before


def test_invalid_record_is_reported_and_left_alone(world, db_url, sim, capsys):
    sim.upsert({"instance_id": "abc123", "plan_id": "pro", "status": "paused", "current_period_end": None,
                "updated_at": "2026-11-01T00:00:00Z"})
    code, out, _ = run_cli(capsys, "fix", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["counts"]["invalid_record"] == 1
    assert end_state(db_url)["abc123"][:2] == ("free", 100)


def test_empty_billing_list_refuses_unless_forced(world, db_url, sim, capsys):
    sim.set_records([])
    before = dump_tables(db_url)
    code, _, err = run_cli(capsys, "fix")
    assert code == 3 and "empty subscription list" in err
    assert dump_tables(db_url) == before
    code, _, _ = run_cli(capsys, "fix", "--force")
    assert code == 0
    assert {p for p, _, _ in end_state(db_url).values()} == {"free"}


def test_mass_change_guard(world, db_url, sim, capsys):
    # billing suddenly says 40 free instances bought a plan: 15 + 40 of 200 changes > max(10, 20)
    free = [i for i, (plan, _) in world.expected.items() if plan == "free" and not i.startswith("deleted")][:40]
    for iid in free:
        sim.upsert({"instance_id": iid, "plan_id": "pro", "status": "active", "current_period_end": None,
                    "updated_at": "2026-01-01T00:00:00Z"})
    before = dump_tables(db_url)
    code, _, err = run_cli(capsys, "fix")
    assert code == 3 and "mass-change guard" in err and "max_change_ratio" in err
    assert dump_tables(db_url) == before


def test_paid_downgrade_guard(world, db_url, sim, capsys):
    # billing suddenly says 40 paying instances expired: the paid-downgrade rule names it
    paying = [r for r in world.records if r["status"] == "active" and r["instance_id"] in world.expected][:40]
    for r in paying:
        sim.upsert({**r, "status": "expired", "current_period_end": None})
    before = dump_tables(db_url)
    code, out, err = run_cli(capsys, "fix", "--json")
    assert code == 3 and "paid-downgrade guard" in err
    guard = json.loads(out)["guard"]
    assert guard["rule"] == "paid_downgrade" and guard["paid_to_free"] >= 36 and guard["paid_limit"] == 10
    assert dump_tables(db_url) == before


def test_dry_run_and_targeted_fix(world, db_url, capsys):
    before = dump_tables(db_url)
    state_before = end_state(db_url)
    code, out, _ = run_cli(capsys, "fix", "--dry-run")
    assert code == 0 and "planned=15" in out and "applied=0" in out
    assert dump_tables(db_url) == before

    code, out, _ = run_cli(capsys, "fix", "--instance", "abc123", "--json")
    assert code == 0
    assert json.loads(out)["applied"] == 1
    after = end_state(db_url)
    assert after["abc123"][:2] == ("pro", 5000)
    assert [i for i in after if after[i] != state_before[i]] == ["abc123"]
    audit = audit_rows(db_url)
    assert list(audit["instance_id"]) == ["abc123"]
    code, out, _ = run_cli(capsys, "check", "--instance", "abc123")
    assert code == 0 and "No mismatches" in out


def test_console_script_end_to_end(world, db_url):
    """The installed entry point, as an operator runs it (a real subprocess)."""
    env = dict(os.environ)
    proc = subprocess.run(
        [sys.executable, "-m", "creditsync_pipeline.cli", "check", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["counts"]["wrong_plan"] == 12
    assert TOKEN not in proc.stdout + proc.stderr


def test_unreachable_database_is_one_line(monkeypatch, capsys, sim):
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://app:hunter2pass@127.0.0.1:1/app")
    monkeypatch.setenv("BILLING_API_URL", sim.base_url)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    code = cli.main(["check"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "hunter2pass" not in err and "Traceback" not in err
    # the progress line may precede it; the error itself is printed once, as the CLI's line
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("creditsync: error: app database unreachable")


# ------------------------------------------------------------- awkward ids, kill -9

AWKWARD_IDS = [
    "o'brien", 'double"quote', "100%", "%s", "%(name)s", ":param", "path/to/site", "a\\b",
    "semi;colon -- not a comment", "ünïcødé-日本語-🚀", "abc", "ABC", "abç",
    "lng-" + "x7/é%'" * 19 + "en",  # 120 characters
]


def test_awkward_ids_are_fixed_exactly_end_to_end(db_url, sim, monkeypatch, capsys):
    """Quotes, %, /, unicode, case twins, 120 characters: fixed, audited and targeted exactly."""
    from creditsync_pipeline import appdb
    from creditsync_pipeline.demo import PLANS

    assert len(AWKWARD_IDS[-1]) == 120
    engine = appdb.create_engine_from_url(db_url)
    try:
        appdb.init_db(engine)
        appdb.upsert_plans(engine, PLANS)
        appdb.insert_instances(engine, [
            {"instance_id": iid, "plan_id": "free", "credits_total": 100, "credits_used": n}
            for n, iid in enumerate(AWKWARD_IDS)
        ])
    finally:
        engine.dispose()
    entitled = [iid for iid in AWKWARD_IDS if iid != "ABC"]  # "abc" bought pro; "ABC" did not
    sim.set_records([{"instance_id": iid, "plan_id": "pro", "status": "active", "current_period_end": None,
                      "updated_at": "2026-01-01T00:00:00Z"} for iid in entitled])
    monkeypatch.setenv("DATABASE_URL", db_url)
    monkeypatch.setenv("BILLING_API_URL", sim.base_url)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    monkeypatch.setenv("BILLING_API_PAGE_SIZE", "5")

    code, _, err = run_cli(capsys, "fix", "--force")  # 13 of 14 change: past the small-app floor
    assert code == 0, err
    after = end_state(db_url)
    assert after == {iid: (("free", 100) if iid == "ABC" else ("pro", 5000)) + (n,)
                     for n, iid in enumerate(AWKWARD_IDS)}
    audit = audit_rows(db_url)
    assert sorted(audit["instance_id"]) == sorted(entitled)
    for iid in AWKWARD_IDS:  # a targeted check finds each id, exactly
        code, out, err = run_cli(capsys, "check", "--instance", iid, "--json")
        assert code == 0, (iid, err)
        assert json.loads(out)["mismatches"] == []


def _orphans(db_url: str) -> int:
    """Other sessions still open on the test database (a killed client's, say)."""
    import sqlalchemy as sa

    engine = sa.create_engine(db_url)
    try:
        with engine.connect() as conn:
            if engine.dialect.name == "postgresql":
                sql = "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            else:
                sql = "SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() AND ID <> CONNECTION_ID()"
            return int(conn.exec_driver_sql(sql).scalar())
    finally:
        engine.dispose()


class _ApplyBlocker:
    """Holds the fix inside its apply transaction from the outside.

    PostgreSQL and MySQL: a lock on ``credit_sync_audit`` that lets reads through but not
    the fix's audit ``INSERT``: the fix has loaded its scratch table and run its
    compare-and-set ``UPDATE`` (uncommitted), and waits -- provably, the server says so.
    SQLite has no table locks: the test holds the database's write lock, so the fix
    waits at the start of its write transaction (``BEGIN IMMEDIATE``, 30 s busy timeout)
    once the billing list is fetched.
    """

    def __init__(self, db_url: str, pages_served) -> None:
        import sqlalchemy as sa

        self.db_url, self.pages_served = db_url, pages_served
        self.engine = sa.create_engine(db_url)
        self.name = self.engine.dialect.name
        self.conn = None
        self.raw = None
        self.since: float | None = None

    def __enter__(self) -> "_ApplyBlocker":
        import sqlite3

        if self.name == "sqlite":
            self.raw = sqlite3.connect(self.engine.url.database, timeout=0, isolation_level=None)
            self.raw.execute("BEGIN IMMEDIATE")
        elif self.name == "postgresql":
            self.conn = self.engine.connect()
            self.conn.begin()
            self.conn.exec_driver_sql("LOCK TABLE credit_sync_audit IN EXCLUSIVE MODE")
        else:
            self.conn = self.engine.connect()
            self.conn.exec_driver_sql("LOCK TABLES credit_sync_audit READ")
        return self

    def waiting(self) -> bool:
        import time

        if self.name == "sqlite":
            if self.pages_served() < 4:
                return False
            self.since = self.since or time.monotonic()
            return time.monotonic() - self.since > 2.0  # fetched; diffing 200 rows takes milliseconds
        with self.engine.connect() as probe:
            if self.name == "postgresql":
                sql = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                       "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO credit_sync_audit%%'")
            else:
                sql = ("SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE DB = DATABASE() "
                       "AND INFO LIKE 'INSERT INTO credit_sync_audit%%'")
            return bool(probe.exec_driver_sql(sql).scalar())

    def row_is_locked(self, instance_id: str) -> bool:
        """The fix's uncommitted compare-and-set holds this row (PostgreSQL, MySQL)."""
        import sqlalchemy as sa

        with self.engine.connect() as probe:
            try:
                probe.execute(sa.text("SELECT instance_id FROM instances WHERE instance_id = :i FOR UPDATE NOWAIT"),
                              {"i": instance_id}).all()
            except sa.exc.OperationalError:
                return True
            finally:
                probe.rollback()
        return False

    def __exit__(self, *exc) -> None:
        if self.raw is not None:
            self.raw.rollback()
            self.raw.close()
        if self.conn is not None:
            if self.name != "postgresql":
                self.conn.exec_driver_sql("UNLOCK TABLES")
            self.conn.rollback()
            self.conn.close()
        self.engine.dispose()


@pytest.mark.slow
def test_a_fix_killed_mid_apply_leaves_nothing_and_a_rerun_converges(world, db_url, sim, tmp_path, capsys):
    import signal
    import time

    before = dump_tables(db_url)
    served = {"pages": 0}
    serve_list = sim._serve_list

    def counting(handler, query):
        serve_list(handler, query)
        served["pages"] += 1

    sim._serve_list = counting
    log = tmp_path / "fix.log"
    with _ApplyBlocker(db_url, lambda: served["pages"]) as blocker, log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "creditsync_pipeline.cli", "fix"],
                                env=dict(os.environ), stdout=sink, stderr=sink)
        try:
            deadline = time.monotonic() + 90
            while not blocker.waiting():
                assert proc.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "the fix never reached its apply"
                time.sleep(0.05)
            if not db_url.startswith("sqlite"):  # mid-apply: its UPDATE has run, its audit waits
                assert blocker.row_is_locked("abc123") and not blocker.row_is_locked("site-0199")
            os.kill(proc.pid, signal.SIGKILL)
            assert proc.wait(timeout=30) == -signal.SIGKILL
        finally:
            if proc.poll() is None:
                proc.kill()
    # The server finishes the orphan's statement, finds its client gone and rolls back.
    if not db_url.startswith("sqlite"):
        deadline = time.monotonic() + 60
        while _orphans(db_url):
            assert time.monotonic() < deadline, "the killed fix's session never ended"
            time.sleep(0.1)
    assert dump_tables(db_url) == before

    code, _, err = run_cli(capsys, "fix")
    assert code == 0, err
    after = end_state(db_url)
    assert {iid: after[iid][:2] for iid in world.expected} == world.expected
    assert len(audit_rows(db_url)) == 15
    code, out, _ = run_cli(capsys, "fix", "--json")
    assert code == 0 and json.loads(out)["applied"] == 0
