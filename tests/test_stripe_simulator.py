"""The Stripe simulator itself: what it serves, how it refuses, its admin endpoints and command line."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import httpx
import pytest

from creditsync_pipeline.simulators.stripe import StripeSimulator, stripe_objects_from_records

KEY = "sk_test_sim_0a1b2c3d4e5f"
NOW = int(time.time())


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    with StripeSimulator(api_key=KEY) as s:
        for n in range(5):
            s.put_customer(f"cus_{n}", metadata={"instance_id": f"inst-{n}"})
            s.put_subscription(f"sub_{n}", customer=f"cus_{n}", created=NOW - n * 60,
                               status="canceled" if n == 4 else "active")
        yield s


@pytest.fixture
def client(sim: StripeSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers={"Authorization": f"Bearer {KEY}"}) as c:
        yield c


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [o["id"] for o in response.json()["data"]]


def test_list_newest_first_with_stripes_default_status_filter(client) -> None:
    assert ids(client.get("/v1/subscriptions")) == ["sub_0", "sub_1", "sub_2", "sub_3"]  # canceled hidden
    assert ids(client.get("/v1/subscriptions", params={"status": "all"})) == [f"sub_{n}" for n in range(5)]
    assert ids(client.get("/v1/subscriptions", params={"status": "ended"})) == ["sub_4"]
    page = client.get("/v1/subscriptions", params={"status": "all", "limit": 2, "starting_after": "sub_1"}).json()
    assert [o["id"] for o in page["data"]] == ["sub_2", "sub_3"] and page["has_more"] is True
    assert ids(client.get("/v1/subscriptions", params={"customer": "cus_3", "status": "all"})) == ["sub_3"]


def test_current_shape_and_expand(client) -> None:
    sub = client.get("/v1/subscriptions", params={"limit": 1, "expand[]": "data.customer"}).json()["data"][0]
    assert sub["customer"]["metadata"] == {"instance_id": "inst-0"}
    item = sub["items"]["data"][0]
    assert item["price"]["lookup_key"] == "pro" and "current_period_end" in item and "current_period_end" not in sub
    old = client.get("/v1/subscriptions", params={"limit": 1}, headers={"Stripe-Version": "2024-06-20"}).json()["data"][0]
    assert old["customer"] == "cus_0" and "current_period_end" in old and "current_period_end" not in old["items"]["data"][0]


@pytest.mark.parametrize(
    "params,status,code",
    [
        ({"limit": 101}, 400, "parameter_invalid_integer"),
        ({"starting_after": "sub_nope"}, 400, "resource_missing"),
        ({"customer": "cus_nope"}, 404, "resource_missing"),
        ({"status": "gone"}, 400, "parameter_invalid_string"),
        ({"colour": "red"}, 400, "parameter_unknown"),
    ],
)
def test_stripes_error_shape(client, params, status, code) -> None:
    response = client.get("/v1/subscriptions", params=params)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["message"]


def test_auth_bearer_or_basic_and_the_key_is_never_echoed_whole(sim) -> None:
    assert httpx.get(f"{sim.base_url}/v1/subscriptions", auth=(KEY, "")).status_code == 200
    missing = httpx.get(f"{sim.base_url}/v1/subscriptions")
    assert missing.status_code == 401 and missing.json()["error"]["message"] == "You did not provide an API key."
    wrong = httpx.get(f"{sim.base_url}/v1/subscriptions", headers={"Authorization": "Bearer sk_test_wrong_key_123456"})
    assert wrong.status_code == 401 and "sk_test_wrong_key_123456" not in wrong.text


def test_faults_answer_in_stripes_shape(sim, client) -> None:
    sim.add_fault("rate_limit", endpoint="list", retry_after=None)
    sim.add_fault("error", endpoint="list")
    limited = client.get("/v1/subscriptions")
    assert limited.status_code == 429 and limited.headers["Stripe-Should-Retry"] == "true"
    assert limited.json()["error"]["code"] == "rate_limit"
    failed = client.get("/v1/subscriptions")
    assert failed.status_code == 500 and failed.json()["error"]["type"] == "api_error"
    assert sim.request_count("list") == 2


def test_search_with_lag_escapes_and_switch(sim, client) -> None:
    query = "metadata['instance_id']:'inst-2'"
    assert ids(client.get("/v1/customers/search", params={"query": query})) == ["cus_2"]
    sim.search_lag = 3600
    sim.put_customer("cus_late", metadata={"instance_id": "it's"})
    sim.put_subscription("sub_late", customer="cus_late", metadata={"instance_id": "it's"})
    escaped = "metadata['instance_id']:'it\\'s'"
    assert ids(client.get("/v1/customers/search", params={"query": escaped})) == []
    sim.search_lag = 0
    sim.put_customer("cus_late", metadata={"instance_id": "it's"})
    assert ids(client.get("/v1/customers/search", params={"query": escaped})) == ["cus_late"]
    assert ids(client.get("/v1/subscriptions/search", params={"query": 'metadata["instance_id"]:"INST-1"'})) == []
    bad = client.get("/v1/customers/search", params={"query": "email:'a@b'"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "query"
    sim.search_enabled = False
    assert client.get("/v1/customers/search", params={"query": query}).status_code == 404


def test_admin_endpoints_drive_it_from_another_process(sim) -> None:
    base = sim.base_url
    assert httpx.put(f"{base}/_sim/customers/cus_x", json={"metadata": {"instance_id": "inst-x"}}).status_code == 200
    assert httpx.put(f"{base}/_sim/subscriptions/sub_x", json={
        "customer": "cus_x", "status": "past_due", "items": [{"price": "price_t", "lookup_key": "team"}]}).status_code == 200
    assert httpx.put(f"{base}/_sim/subscriptions/sub_y", json={"status": "active"}).status_code == 400
    assert sim.subscriptions()["sub_x"].status == "past_due"
    assert httpx.delete(f"{base}/_sim/subscriptions/sub_x").json() == {"deleted": True}
    assert httpx.post(f"{base}/_sim/config", json={"search_enabled": False}).status_code == 200 and not sim.search_enabled
    assert httpx.post(f"{base}/_sim/config", json={"colour": 1}).status_code == 400
    records = [{"instance_id": "a", "plan_id": "pro", "status": "active", "current_period_end": None,
                "updated_at": "2026-01-01T00:00:00Z"}]
    assert httpx.post(f"{base}/_sim/records", json={"records": records}).json() == {"ok": True, "subscriptions": 1}
    assert httpx.get(f"{base}/_sim/health").json()["subscriptions"] == 1
    assert httpx.delete(f"{base}/_sim/data").status_code == 200 and not sim.subscriptions()


def test_the_converter_keeps_what_each_record_entitles_to() -> None:
    now = datetime.now(timezone.utc)
    iso = lambda d: (now + timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    records = [
        {"instance_id": "a", "plan_id": "pro", "status": "canceled", "current_period_end": iso(5), "updated_at": iso(-9)},
        {"instance_id": "b", "plan_id": "pro", "status": "canceled", "current_period_end": iso(-5), "updated_at": iso(-9)},
        {"instance_id": "c", "plan_id": "team", "status": "expired", "current_period_end": iso(3), "updated_at": iso(-9)},
        {"instance_id": "d", "plan_id": "starter", "status": "trialing", "current_period_end": iso(7), "updated_at": iso(-1)},
        {"instance_id": None, "plan_id": "pro", "status": "active", "current_period_end": None, "updated_at": iso(-1)},
    ]
    customers, subs = stripe_objects_from_records(records, metadata_on="customer", now=now)
    got = {(s.status, s.cancel_at_period_end, s.ended_at is not None) for s in subs}
    assert got == {("active", True, False), ("canceled", False, True), ("trialing", False, False), ("active", False, False)}
    c = subs[2]
    assert c.status == "canceled" and c.ended_at <= int(now.timestamp())
    assert sum(1 for cu in customers if not cu.metadata) == 1  # the record without an instance


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_the_command_line_serves_generated_subscriptions() -> None:
    port = free_port()
    env = {**os.environ, "STRIPE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.simulators.stripe", "--port", str(port), "--generate", "250"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert "stripe simulator listening on" in proc.stdout.readline()
        page = httpx.get(f"http://127.0.0.1:{port}/v1/subscriptions", params={"status": "all", "limit": 100},
                         headers={"Authorization": f"Bearer {KEY}"}).json()
        assert len(page["data"]) == 100 and page["has_more"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
