"""End to end: ``creditsync check`` / ``fix`` with ``BILLING_PROVIDER=wix``, a real subprocess each,
against the Wix simulator over real HTTP, on SQLite and PostgreSQL.

The end state of every instance and its audit rows are asserted exactly through 429s,
500s, drops, token failures and tokens that expire mid-run; failed runs must leave the
database byte-for-byte unchanged; the app secret and the access tokens never appear in
any output.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from creditsync_pipeline.simulators.wix import WixSimulator, demo_instances

from .helpers import audit_rows, dump_tables, end_state, seeded

APP_ID = "wix-app-e2e-31f9"
SECRET = "wix-SECRET-e2e-6b7a9c01d4"
REPO = Path(__file__).resolve().parents[1]
#: the demo's drift as Wix sees it: deleted-site-9 has no app row, and Wix is only asked about app rows
EXPECTED_COUNTS = {"wrong_plan": 12, "wrong_credits": 3, "unknown_plan": 1, "missing_instance": 0, "invalid_record": 0}

pytestmark = pytest.mark.slow


@pytest.fixture
def world(db_url):
    """A seeded app DB and the Wix simulator serving the same data set."""
    data = seeded(db_url)
    with WixSimulator(demo_instances(data), app_id=APP_ID, app_secret=SECRET) as sim:
        env = {
            **os.environ,
            "DATABASE_URL": db_url,
            "BILLING_PROVIDER": "wix",
            "WIX_APP_ID": APP_ID,
            "WIX_APP_SECRET": SECRET,
            "WIX_API_BASE": sim.base_url,
            "WIX_CONCURRENCY": "8",
            "BILLING_API_MAX_ATTEMPTS": "3",
            "BILLING_API_TIMEOUT": "2",
        }
        env.pop("BILLING_API_TOKEN", None)
        yield data, sim, env


def run_cli(env, *args, secret=SECRET):
    proc = subprocess.run(
        [sys.executable, "-m", "creditsync_pipeline.cli", *args],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert secret not in output, "the app secret leaked into CLI output"
    assert "OauthNG" not in output, "an access token leaked into CLI output"
    assert "Traceback" not in output
    return proc.returncode, proc.stdout, proc.stderr



def assert_fixed(db_url, data, before, *, except_ids=()):
    """Every instance is where a correct fix puts it (``except_ids`` untouched), credits_used kept."""
    after = end_state(db_url)
    for iid, (plan, credits) in data.expected.items():
        if iid in except_ids:
            assert after[iid] == before[iid], iid
        else:
            assert after[iid][:2] == (plan, credits), iid
        assert after[iid][2] == before[iid][2], "credits_used must never change"
    unknown_plan = [i["instance_id"] for i in data.instances if i["instance_id"] not in data.expected]
    assert [after[i] for i in unknown_plan] == [before[i] for i in unknown_plan]
    changed = {i for i in before if before[i][:2] != after[i][:2]}
    audit = audit_rows(db_url)
    assert set(audit["instance_id"]) == changed and len(audit) == len(changed)
    assert set(audit["trigger"]) == {"manual"} and audit["run_id"].nunique() == 1
    for row in audit.itertuples(index=False):
        assert (row.old_plan_id, int(row.old_credits_total)) == before[row.instance_id][:2]
        assert (row.new_plan_id, int(row.new_credits_total)) == after[row.instance_id][:2]
    return changed


def test_check_reports_and_writes_nothing(world, db_url):
    data, sim, env = world
    before = dump_tables(db_url)
    code, out, err = run_cli(env, "check", "--json")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["counts"] == EXPECTED_COUNTS and doc["provider"] == "wix"
    assert doc["lookups"] == len(data.instances) == 200 and doc["unresolved"] == {}
    abc = next(m for m in doc["mismatches"] if m["instance_id"] == "abc123")
    assert (abc["kind"], abc["current_plan_id"], abc["expected_plan_id"], abc["expected_credits_total"]) == (
        "wrong_plan", "free", "pro", 5000)
    assert dump_tables(db_url) == before
    assert sim.tokens_granted == 200


def test_fix_reaches_the_exact_end_state_and_converges(world, db_url):
    data, sim, env = world
    before = end_state(db_url)
    code, out, err = run_cli(env, "-v", "fix")  # debug logging leaks nothing either
    assert code == 0, err
    assert len(assert_fixed(db_url, data, before)) == 15
    assert "Synced credits for instance abc123: 100 → 5000" in err
    assert "[CreditSync] Successfully synced credits for 15 instance(s)" in err
    assert "Wix: looked up 200 instance(s)" in err
    code, out, err = run_cli(env, "fix", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["planned"] == 0 and doc["applied"] == 0 and len(audit_rows(db_url)) == 15


@pytest.mark.parametrize(
    "fault",
    [
        dict(kind="rate_limit", endpoint="instance", after=20, count=3, retry_after=1),
        dict(kind="error", endpoint="instance", after=10, count=2),
        dict(kind="drop", endpoint="instance", after=30, count=2),
        dict(kind="error", endpoint="token", after=5, count=2),
        dict(kind="drop", endpoint="token", after=40, count=1),
        dict(kind="rate_limit", endpoint="token", after=60, count=2, retry_after=1),
        "tokens-expire-mid-run",
    ],
    ids=["instance-429", "instance-500", "instance-drop", "token-500", "token-drop", "token-429", "token-expiry"],
)
def test_transient_faults_end_in_the_exact_state(world, db_url, fault):
    data, sim, env = world
    if fault == "tokens-expire-mid-run":
        sim.expire_next_tokens(12)
    else:
        sim.add_fault(**fault)
    before = end_state(db_url)
    code, out, err = run_cli(env, "fix", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["applied"] == 15 and doc["unresolved"] == {} and doc["remaining"] == 0
    assert len(assert_fixed(db_url, data, before)) == 15
    if fault == "tokens-expire-mid-run":
        assert sim.tokens_granted == 212  # each of the 12 instances: a dead token and a live one


def test_a_few_failed_look_ups_are_left_alone_and_reported(world, db_url):
    data, sim, env = world
    failing = ["abc123", "site-0002", "site-0150"]  # abc123 pays for pro but is stuck on free
    for iid in failing:
        sim.set_failure(iid, 500, endpoint="token" if iid == "abc123" else "instance")
    before = end_state(db_url)
    code, out, err = run_cli(env, "fix", "--json")
    assert code == 4, err  # done, but billing could not answer for some instances
    doc = json.loads(out)
    assert doc["unresolved"] == {"unavailable": 3}
    assert {u["instance_id"] for u in doc["unresolved_instances"]} == set(failing)
    assert all("HTTP 500" in u["reason"] for u in doc["unresolved_instances"])
    changed = assert_fixed(db_url, data, before, except_ids=failing)
    assert end_state(db_url)["abc123"][:2] == ("free", 100) and "abc123" not in changed
    assert "Left 3 instance(s) alone" in err and "abc123" in err
    # the plain output lists them too, with the reason
    code, out, err = run_cli(env, "check")
    assert code == 1
    listed = [line.split() for line in out.splitlines() if line.startswith("  ") and "unavailable" in line]
    assert {parts[0] for parts in listed} == set(failing)


def test_more_than_ten_percent_failed_writes_nothing(world, db_url):
    data, sim, env = world
    for inst in data.instances[::8]:  # 25 of 200 = 12.5 %, spread out (8 in a row would trip the breaker)
        sim.set_failure(inst["instance_id"], 503)
    before = dump_tables(db_url)
    for command in (["fix"], ["fix", "--json"], ["check"]):
        code, out, err = run_cli(env, *command)
        assert code == 2, err
        lines = [line for line in err.splitlines() if line.startswith("creditsync:")]
        assert len(lines) == 1 and "more than 10% of 200 look-ups failed" in lines[0], err
        assert dump_tables(db_url) == before


def test_removed_instances_are_counted_listed_and_left_alone(world, db_url):
    data, sim, env = world
    removed = ["abc123", "site-0003", "site-0199"]
    for iid in removed:
        sim.remove_instance(iid)
    before = end_state(db_url)
    code, out, err = run_cli(env, "fix", "--json")
    assert code == 0, err
    doc = json.loads(out)
    due = {i for i, v in data.expected.items() if before[i][:2] != v}
    assert {"abc123", "site-0003"} <= due and "site-0199" not in due  # two of them needed a correction
    assert doc["unresolved"] == {"removed": 3} and doc["applied"] == len(due) - 2 == 13
    assert {u["instance_id"] for u in doc["unresolved_instances"]} == set(removed)
    assert all("no longer installed" in u["reason"] for u in doc["unresolved_instances"])
    assert_fixed(db_url, data, before, except_ids=removed)


def test_wrong_secret_is_one_line_and_writes_nothing(world, db_url):
    data, sim, env = world
    wrong = "wrong-" + SECRET
    before = dump_tables(db_url)
    code, out, err = run_cli({**env, "WIX_APP_SECRET": wrong}, "fix", secret=wrong)
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("creditsync:")]
    assert len(lines) == 1 and "refused the app credentials" in lines[0] and "WIX_APP_SECRET" in lines[0]
    assert SECRET not in out + err
    assert dump_tables(db_url) == before
    code, _, err = run_cli({**env, "WIX_APP_SECRET": ""}, "check")
    assert code == 2 and "WIX_APP_SECRET is not set" in err


def test_targeted_fix_and_a_removed_target(world, db_url):
    data, sim, env = world
    before = end_state(db_url)
    code, out, err = run_cli(env, "fix", "--instance", "abc123", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["applied"] == 1 and doc["lookups"] == 1
    after = end_state(db_url)
    assert after["abc123"][:2] == ("pro", 5000)
    assert [i for i in after if after[i] != before[i]] == ["abc123"]
    stuck = next(i for i, (p, _) in data.expected.items() if p != "free" and before[i][0] == "free" and i != "abc123")
    sim.remove_instance(stuck)
    code, out, err = run_cli(env, "fix", "--instance", stuck, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unresolved"] == {"removed": 1} and doc["applied"] == 0
    assert end_state(db_url)[stuck] == before[stuck]
