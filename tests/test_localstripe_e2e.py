"""End to end against localstripe: a stateful Stripe test server nobody here wrote.

localstripe (a test-only dependency) speaks Stripe's older shape: items carry a ``plan`` (no
prices), periods sit on the subscription, and it has no search. It is started as a
subprocess on a free port (``--from-scratch``); every test builds its products, plans,
customers and subscriptions through localstripe's own API, then runs ``creditsync check`` and
``fix`` with ``BILLING_PROVIDER=stripe`` in a subprocess, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from creditsync_pipeline.billing import BillingMalformedError
from creditsync_pipeline.billing.stripe import StripeProvider
from creditsync_pipeline.demo import PLANS, DemoData, seed_database

from .helpers import audit_rows, dump_tables, end_state

pytestmark = pytest.mark.slow

KEY = "sk_test_LOCALSTRIPE_5e6f7a8b9c"
PLAN_MAP = {"plan_starter": "starter", "plan_pro": "pro", "plan_team": "team"}
GOOD_CARD, FAILING_CARD = "4242424242424242", "4000000000000341"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _localstripe_command() -> list[str]:
    script = Path(sys.executable).with_name("localstripe")
    if script.exists():
        return [str(script)]
    found = shutil.which("localstripe")
    if found is None:
        pytest.skip("localstripe is not installed (pip install -e '.[dev]')")
    return [found]


@pytest.fixture(scope="module")
def localstripe_url() -> Iterator[str]:
    port = _free_port()
    proc = subprocess.Popen([*_localstripe_command(), "--port", str(port), "--from-scratch"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/v1/customers", auth=(KEY, ""), timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail("localstripe did not start", pytrace=False)
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class LocalStripe:
    """Objects made through localstripe's API, the way an app's checkout would make them."""

    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, auth=(KEY, ""), timeout=10)
        assert self.client.delete("/_config/data").status_code == 200
        product = self.post("/v1/products", name="creditsync credits", type="service")
        for plan, amount in (("plan_starter", 900), ("plan_pro", 2900), ("plan_team", 9900)):
            self.post("/v1/plans", id=plan, product=product["id"], amount=amount, currency="usd", interval="month")

    def post(self, path: str, **data: Any) -> dict[str, Any]:
        response = self.client.post(path, data=data)
        assert response.status_code == 200, response.text
        return response.json()

    def customer(self, instance: str | None = None, *, card: str = GOOD_CARD) -> str:
        customer = self.post("/v1/customers", **({"metadata[instance_id]": instance} if instance else {}))
        token = self.post("/v1/tokens", **{"card[number]": card, "card[exp_month]": "12", "card[exp_year]": "2031",
                                           "card[cvc]": "123"})
        self.post(f"/v1/customers/{customer['id']}/sources", source=token["id"])
        return customer["id"]

    def subscribe(self, customer: str, plan: str, *, instance: str | None = None) -> dict[str, Any]:
        data = {"customer": customer, "items[0][plan]": plan}
        if instance:
            data["metadata[instance_id]"] = instance
        return self.post("/v1/subscriptions", **data)

    def cancel_at_period_end(self, subscription: dict[str, Any]) -> None:
        assert self.post(f"/v1/subscriptions/{subscription['id']}", cancel_at_period_end="true")["cancel_at_period_end"]

    def cancel(self, subscription: dict[str, Any]) -> None:
        response = self.client.delete(f"/v1/subscriptions/{subscription['id']}")
        assert response.status_code == 200 and response.json()["status"] == "canceled"


#: instance -> (the app's row: plan, credits_total) and the end state a correct fix reaches
SCENARIO = {
    "ls-stuck": (("free", 100), ("pro", 5000)),  # bought pro, stuck on free
    "ls-upgraded": (("pro", 5000), ("team", 20000)),  # instance id on the subscription
    "ls-cancel-later": (("starter", 1000), ("starter", 1000)),  # canceled at period end: paid through it
    "ls-canceled": (("pro", 5000), ("free", 100)),
    "ls-incomplete": (("starter", 1000), ("free", 100)),  # the first payment failed
    "ls-credits": (("pro", 100), ("pro", 5000)),
    "ls-second": (("free", 100), ("team", 20000)),  # a canceled subscription and a live one
    "ls-free": (("free", 100), ("free", 100)),
    # free instances without a Stripe customer, so that 6 changes stay under the 10 % guard
    **{f"ls-filler-{n:03d}": (("free", 100), ("free", 100)) for n in range(100)},
}


def build(ls: LocalStripe) -> None:
    ls.subscribe(ls.customer("ls-stuck"), "plan_pro")
    ls.subscribe(ls.customer(), "plan_team", instance="ls-upgraded")
    ls.cancel_at_period_end(ls.subscribe(ls.customer("ls-cancel-later"), "plan_starter"))
    ls.cancel(ls.subscribe(ls.customer("ls-canceled"), "plan_pro"))
    assert ls.subscribe(ls.customer("ls-incomplete", card=FAILING_CARD), "plan_starter")["status"] == "incomplete"
    ls.subscribe(ls.customer("ls-credits"), "plan_pro")
    second = ls.customer("ls-second")
    ls.cancel(ls.subscribe(second, "plan_starter"))
    ls.subscribe(second, "plan_team")
    ls.subscribe(ls.customer("ls-ghost"), "plan_pro")  # an instance the app never provisioned
    ls.subscribe(ls.customer(), "plan_pro")  # something the account sells to no instance


@pytest.fixture
def world(db_url: str, localstripe_url: str) -> LocalStripe:
    seed_database(db_url, DemoData(
        plans=PLANS,
        instances=[{"instance_id": i, "plan_id": row[0], "credits_total": row[1], "credits_used": 7}
                   for i, (row, _) in SCENARIO.items()],
        records=[], expected={i: end for i, (_, end) in SCENARIO.items()},
    ))
    ls = LocalStripe(localstripe_url)
    build(ls)
    return ls


def app_tables(db_url: str) -> dict[str, list[tuple]]:
    """Every table but the remembered customer links (a cache, refreshed by every complete list)."""
    return {name: rows for name, rows in dump_tables(db_url).items() if name != "billing_customer_links"}


def cli(db_url: str, url: str, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "DATABASE_URL": db_url, "BILLING_PROVIDER": "stripe", "STRIPE_API_KEY": KEY,
           "STRIPE_API_BASE": url, "CREDITSYNC_PLAN_MAP": json.dumps(PLAN_MAP)}
    env.pop("CREDITSYNC_LOG_FILE", None)
    proc = subprocess.run([sys.executable, "-m", "creditsync_pipeline.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)
    assert KEY not in proc.stdout + proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stdout, proc.stderr


def test_check_and_fix_end_to_end(world, db_url, localstripe_url) -> None:
    before_tables = app_tables(db_url)
    code, out, err = cli(db_url, localstripe_url, "check", "--json")
    assert code == 1, err
    doc = json.loads(out)
    assert doc["counts"] == {"wrong_plan": 5, "wrong_credits": 1, "unknown_plan": 0, "missing_instance": 1,
                             "invalid_record": 0}
    assert (doc["unassigned_records"], doc["billing_records"]) == (1, 9)  # 10 subscriptions, 1 of no instance
    kinds = {m["instance_id"]: m["kind"] for m in doc["mismatches"]}
    assert kinds == {"ls-stuck": "wrong_plan", "ls-upgraded": "wrong_plan", "ls-canceled": "wrong_plan",
                     "ls-incomplete": "wrong_plan", "ls-second": "wrong_plan", "ls-credits": "wrong_credits",
                     "ls-ghost": "missing_instance"}
    assert app_tables(db_url) == before_tables  # the remembered customer links aside

    code, out, err = cli(db_url, localstripe_url, "fix", "--json")
    assert code == 0, err
    after = end_state(db_url)
    assert after == {i: (*end, 7) for i, (_, end) in SCENARIO.items()}
    audit = audit_rows(db_url)
    assert sorted(
        (r.instance_id, r.old_plan_id, r.new_plan_id, r.old_credits_total, r.new_credits_total)
        for r in audit.itertuples(index=False)
    ) == sorted(
        (i, row[0], end[0], row[1], end[1]) for i, (row, end) in SCENARIO.items() if row != end
    )
    assert set(audit["trigger"]) == {"manual"}

    code, out, _ = cli(db_url, localstripe_url, "fix", "--json")
    assert code == 0 and json.loads(out)["planned"] == 0
    assert len(audit_rows(db_url)) == len(audit)


def test_a_targeted_run_without_search_leaves_an_unknown_instance_alone(world, db_url, localstripe_url) -> None:
    """localstripe has no search: with no remembered customer, the instance is left alone."""
    before = dump_tables(db_url)
    code, out, err = cli(db_url, localstripe_url, "fix", "--instance", "ls-canceled", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unresolved"] == {"unlinked": 1} and doc["applied"] == 0
    assert dump_tables(db_url) == before
    # A check writes nothing, not even the links: the instance is still unknown ...
    assert cli(db_url, localstripe_url, "check")[0] == 1
    code, out, err = cli(db_url, localstripe_url, "fix", "--instance", "ls-canceled", "--dry-run", "--json")
    assert json.loads(out)["unresolved"] == {"unlinked": 1}
    # ... a real full run remembers every instance's customer; then a targeted run finds it by customer.
    assert cli(db_url, localstripe_url, "fix")[0] == 0
    assert end_state(db_url)["ls-canceled"][:2] == ("free", 100)
    code, out, err = cli(db_url, localstripe_url, "fix", "--instance", "ls-canceled", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["unresolved"] == {} and doc["mismatch_count"] == 0


class RewriteCursor(httpx.HTTPTransport):
    """Sends an unknown ``starting_after`` on the second page."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if "starting_after" in request.url.params:
            request.url = request.url.copy_set_param("starting_after", "sub_unknown")
        return super().handle_request(request)


def test_the_cursor_trap_of_localstripe_fails_the_run(localstripe_url) -> None:
    ls = LocalStripe(localstripe_url)
    for n in range(5):
        ls.subscribe(ls.customer(f"trap-{n}"), "plan_pro")
    with StripeProvider(KEY, base_url=localstripe_url, page_size=2, plan_map=PLAN_MAP) as provider:
        assert len(provider.fetch_all(plan_ids=("free", "pro")).records) == 5
    with StripeProvider(KEY, base_url=localstripe_url, page_size=2, transport=RewriteCursor()) as provider:
        with pytest.raises(BillingMalformedError, match="was listed before: the list restarted"):
            provider.fetch_all(plan_ids=("free", "pro"))
