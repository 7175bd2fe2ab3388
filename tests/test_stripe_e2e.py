"""End to end with ``BILLING_PROVIDER=stripe``: the ``creditsync`` CLI in a subprocess against the
Stripe simulator, on SQLite and PostgreSQL (``db_url``): exact end state, audit rows, faults,
secrets, and "an instance whose customer cannot be found is never downgraded"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
import pytest
import sqlalchemy as sa

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import CREDITS
from creditsync_pipeline.simulators.stripe import StripeSimulator

from .helpers import audit_rows, dump_tables, end_state, seeded

pytestmark = pytest.mark.slow

KEY = "sk_test_E2E_SECRET_93ab41c0d7e2f6"
EXPECTED_COUNTS = {"wrong_plan": 12, "wrong_credits": 3, "unknown_plan": 1, "missing_instance": 1, "invalid_record": 0}
OTHER_PRODUCTS = 150  # subscriptions of the account's other products: no instance, 3 pages in all


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    with StripeSimulator(api_key=KEY) as s:
        yield s


@pytest.fixture
def world(db_url: str, sim: StripeSimulator):
    data = seeded(db_url)
    sim.load_records(data.records)  # the instance id alternately on the customer and the subscription
    now = int(time.time())
    for n in range(OTHER_PRODUCTS):
        sim.put_customer(f"cus_shop{n:03d}", email=f"fan{n}@example.com")
        sim.put_subscription(f"sub_shop{n:03d}", customer=f"cus_shop{n:03d}", created=now - n * 60,
                             items=[{"price": "price_mug", "lookup_key": "mug_of_the_month"}])
    return data


def cli(db_url: str, sim: StripeSimulator, *args: str, **env: str) -> tuple[int, str, str]:
    environ = {
        **os.environ, "DATABASE_URL": db_url, "BILLING_PROVIDER": "stripe", "STRIPE_API_KEY": KEY,
        "STRIPE_API_BASE": sim.base_url, "BILLING_API_MAX_ATTEMPTS": "3", **env,
    }
    environ.pop("CREDITSYNC_LOG_FILE", None)
    proc = subprocess.run([sys.executable, "-m", "creditsync_pipeline.cli", *args], env=environ,
                          capture_output=True, text=True, timeout=120)
    secret = environ["STRIPE_API_KEY"]
    assert secret not in proc.stdout and secret not in proc.stderr, "the Stripe API key leaked"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def app_tables(db_url: str) -> dict[str, list[tuple]]:
    """Every table but the remembered customer links (a cache of what Stripe says, refreshed
    by every complete list of a real run)."""
    return {name: rows for name, rows in dump_tables(db_url).items() if name != "billing_customer_links"}


def remembered(db_url: str) -> dict[str, str]:
    """The instance -> customer links the app database remembers for Stripe."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        table = appdb.metadata.tables["billing_customer_links"]
        with engine.connect() as conn:
            rows = conn.execute(sa.select(table.c.instance_id, table.c.customer_id).where(table.c.provider == "stripe"))
            return {r.instance_id: r.customer_id for r in rows}
    finally:
        engine.dispose()


def error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("creditsync:")]
    assert len(lines) == 1, err
    return lines[0]


def test_check_then_fix_reaches_the_exact_end_state_and_converges(world, db_url, sim) -> None:
    before_tables = app_tables(db_url)
    code, out, err = cli(db_url, sim, "check", "--json")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["counts"] == EXPECTED_COUNTS
    assert (doc["provider"], doc["unassigned_records"], doc["unresolved"]) == ("stripe", OTHER_PRODUCTS, {})
    assert app_tables(db_url) == before_tables
    assert remembered(db_url) == {}  # a check writes nothing, not even creditsync's link cache

    before = end_state(db_url)
    code, out, err = cli(db_url, sim, "fix", "--json")
    assert code == 0, err
    customers = sim.customers()  # every instance's customer is remembered by a real run, for targeted runs
    expected_links = {
        sub.metadata.get("instance_id") or customers[sub.customer].metadata["instance_id"]: sub.customer
        for sub in sim.subscriptions().values() if not sub.id.startswith("sub_shop")
    }
    assert remembered(db_url) == expected_links and len(expected_links) == 76
    after = end_state(db_url)
    for instance_id, (plan, credits) in world.expected.items():
        assert after[instance_id][:2] == (plan, credits), instance_id
        assert after[instance_id][2] == before[instance_id][2], "credits_used must never change"
    unknown = next(i["instance_id"] for i in world.instances if i["instance_id"] not in world.expected)
    assert after[unknown] == before[unknown]  # entitled to a plan the app does not sell: left alone

    audit = audit_rows(db_url)
    assert len(audit) == 15 and set(audit["trigger"]) == {"manual"} and audit["run_id"].nunique() == 1
    changed = {i for i in before if before[i][:2] != after[i][:2]}
    assert changed == set(audit["instance_id"])
    for row in audit.itertuples(index=False):
        assert (row.old_plan_id, row.old_credits_total) == before[row.instance_id][:2]
        assert (row.new_plan_id, row.new_credits_total) == after[row.instance_id][:2]
    row = audit.set_index("instance_id").loc["abc123"]
    assert (row["old_plan_id"], row["new_plan_id"], row["old_credits_total"], row["new_credits_total"]) == ("free", "pro", 100, 5000)
    assert "Synced credits for instance abc123: 100 → 5000" in err

    code, out, _ = cli(db_url, sim, "fix", "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["planned"] == 0 and doc["applied"] == 0
    assert len(audit_rows(db_url)) == 15


@pytest.mark.parametrize(
    "fault",
    [dict(kind="rate_limit", endpoint="list", after=1, count=2, retry_after=1),
     dict(kind="error", endpoint="list", after=2, count=2)],
    ids=["429-twice-mid-list", "500-twice-mid-list"],
)
def test_transient_faults_are_retried_and_the_fix_completes(world, db_url, sim, fault) -> None:
    fault = dict(fault)
    sim.add_fault(fault.pop("kind"), **fault)
    code, _, err = cli(db_url, sim, "fix")
    assert code == 0, err
    assert {i: v[:2] for i, v in end_state(db_url).items() if i in world.expected} == world.expected
    assert len(audit_rows(db_url)) == 15


@pytest.mark.parametrize(
    "fault,message",
    [(dict(kind="error", endpoint="list", after=1, count=None), "stripe api unavailable"),
     (dict(kind="malformed", endpoint="list", after=2, count=1), "malformed"),
     (dict(kind="drop", endpoint="list", after=1, count=None), "unavailable")],
    ids=["persistent-500-mid-list", "html-page", "always-dropped"],
)
def test_a_list_that_does_not_complete_changes_nothing(world, db_url, sim, fault, message) -> None:
    before = dump_tables(db_url)
    fault = dict(fault)
    sim.add_fault(fault.pop("kind"), **fault)
    code, _, err = cli(db_url, sim, "fix")
    assert code == 2
    assert message in error_line(err).lower()
    assert dump_tables(db_url) == before


def test_a_refused_key_is_one_line_and_leaks_nothing(world, db_url, sim) -> None:
    before = dump_tables(db_url)
    wrong = "sk_test_WRONG_77f0e1d2c3b4a5"
    code, out, err = cli(db_url, sim, "fix", STRIPE_API_KEY=wrong)
    assert code == 2
    assert "Stripe API rejected the API key (HTTP 401" in error_line(err)
    assert wrong not in out + err and "sk_test_" not in out + err
    assert dump_tables(db_url) == before


def paid_instance(world) -> str:
    """A paying instance the app has right (pro), whose Stripe customer carries the id."""
    return next(
        row["instance_id"] for row in world.instances
        if (row["plan_id"], row["credits_total"]) == ("pro", CREDITS["pro"]) == world.expected.get(row["instance_id"])
    )


def test_an_instance_whose_customer_cannot_be_found_is_never_downgraded(world, db_url, sim) -> None:
    """Targeted: no remembered link and search that has not indexed it yet (or a server without
    search) -> left alone and reported. Only the full list decides."""
    target = paid_instance(world)
    sim.search_enabled = False
    before = dump_tables(db_url)
    code, out, err = cli(db_url, sim, "fix", "--instance", target, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unresolved"] == {"unlinked": 1}
    assert [u["instance_id"] for u in doc["unresolved_instances"]] == [target]
    assert doc["applied"] == 0 and dump_tables(db_url) == before

    # Its subscriptions vanish from Stripe altogether: a targeted run still leaves it alone...
    for sub_id, sub in sim.subscriptions().items():
        customer = sim.customers()[sub.customer]
        if target in (sub.metadata.get("instance_id"), customer.metadata.get("instance_id")):
            sim.delete_subscription(sub_id)
    code, out, _ = cli(db_url, sim, "fix", "--instance", target, "--json")
    assert code == 0 and json.loads(out)["applied"] == 0
    assert end_state(db_url)[target][:2] == ("pro", CREDITS["pro"])
    # ... and only the complete list sends it to free.
    code, out, err = cli(db_url, sim, "fix", "--json")
    assert code == 0, err
    assert end_state(db_url)[target][:2] == ("free", CREDITS["free"])


def test_a_targeted_run_finds_an_unknown_customer_with_search(world, db_url, sim) -> None:
    target = "abc123"  # bought pro, stuck on free
    code, out, err = cli(db_url, sim, "fix", "--instance", target, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["applied"] == 1 and doc["unresolved"] == {}
    assert end_state(db_url)[target][:2] == ("pro", 5000)
    assert sim.request_count("search") >= 1


def test_a_targeted_run_after_a_full_one_uses_the_remembered_link(world, db_url, sim) -> None:
    code, _, err = cli(db_url, sim, "fix")  # a real full run remembers every instance's customer
    assert code == 0, err
    sim.search_enabled = False
    target = paid_instance(world)
    for sub in sim.subscriptions().values():
        customer = sim.customers()[sub.customer]
        if target in (sub.metadata.get("instance_id"), customer.metadata.get("instance_id")):
            sim.put_subscription(sub.id, customer=sub.customer, status="canceled", created=sub.created,
                                 metadata=sub.metadata, ended_at=int(time.time()) - 60)
    code, out, err = cli(db_url, sim, "fix", "--instance", target, "--json")
    assert code == 0, err
    assert json.loads(out)["unresolved"] == {}
    assert end_state(db_url)[target][:2] == ("free", CREDITS["free"])

