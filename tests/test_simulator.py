"""The billing API simulator speaks the SPEC contract over real HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from creditsync_pipeline.simulators.generic import BillingSimulator, decode_cursor, encode_cursor

TOKEN = "sim-test-token-7f3a"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
ODD_IDS = [
    "a/b",
    "100%",
    "%2F",
    "what?x=1",
    "frag#ment",
    "quote'\"s",
    "with space",
    "plus+sign",
    "ünïcødé-✓",
    "日本語",
    "..",
    ".",
    "a\\b",
    "semi;colon",
]


def record(instance_id: str, plan_id: str = "pro", **extra: object) -> dict:
    return {
        "instance_id": instance_id,
        "plan_id": plan_id,
        "status": "active",
        "current_period_end": None,
        "updated_at": "2024-05-01T00:00:00Z",
        **extra,
    }


@pytest.fixture
def sim() -> Iterator[BillingSimulator]:
    with BillingSimulator([record(f"inst-{n:03d}") for n in range(25)], token=TOKEN) as s:
        yield s


@pytest.fixture
def http(sim: BillingSimulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=5) as client:
        yield client


def one_url(instance_id: str) -> str:
    segment = quote(instance_id, safe="")
    return "/v1/subscriptions/" + (segment.replace(".", "%2E") if segment in (".", "..") else segment)


def walk(http: httpx.Client, limit: int) -> list[str]:
    ids: list[str] = []
    params: dict[str, object] = {"limit": limit}
    while True:
        body = http.get("/v1/subscriptions", params=params).json()
        ids += [r["instance_id"] for r in body["data"]]
        if body["next_cursor"] is None:
            return ids
        params["cursor"] = body["next_cursor"]


# -- list endpoint ---------------------------------------------------------------------------


def test_list_default_limit_and_shape(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.set_records([record(f"r{n:04d}") for n in range(150)])
    response = http.get("/v1/subscriptions")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"data", "next_cursor"}
    assert len(body["data"]) == 100
    assert body["data"][0] == record("r0000")
    assert isinstance(body["next_cursor"], str)


def test_pagination_is_sorted_and_complete(http: httpx.Client, sim: BillingSimulator) -> None:
    ids = walk(http, limit=7)
    assert ids == [f"inst-{n:03d}" for n in range(25)]
    # An exact multiple of the page size ends with next_cursor null, not an empty page.
    sim.set_records([record(f"x{n}") for n in range(6)])
    body = http.get("/v1/subscriptions", params={"limit": 3}).json()
    second = http.get("/v1/subscriptions", params={"limit": 3, "cursor": body["next_cursor"]}).json()
    assert [r["instance_id"] for r in second["data"]] == ["x3", "x4", "x5"]
    assert second["next_cursor"] is None


def test_keyset_cursor_survives_upserts_between_pages(http: httpx.Client, sim: BillingSimulator) -> None:
    first = http.get("/v1/subscriptions", params={"limit": 10}).json()
    assert [r["instance_id"] for r in first["data"]][-1] == "inst-009"
    sim.upsert(record("inst-000a"))  # sorts before the cursor: not served, nothing shifts
    sim.upsert(record("inst-015", plan_id="enterprise"))  # replaced in place
    sim.upsert(record("inst-0105"))  # sorts after the cursor: served once
    sim.delete("inst-020")
    rest: list[dict] = []
    params = {"limit": 10, "cursor": first["next_cursor"]}
    while True:
        body = http.get("/v1/subscriptions", params=params).json()
        rest += body["data"]
        if body["next_cursor"] is None:
            break
        params["cursor"] = body["next_cursor"]
    rest_ids = [r["instance_id"] for r in rest]
    expected = [f"inst-{n:03d}" for n in range(10, 25) if n != 20]
    expected.insert(1, "inst-0105")
    assert rest_ids == expected
    assert len(set(rest_ids)) == len(rest_ids)
    assert next(r for r in rest if r["instance_id"] == "inst-015")["plan_id"] == "enterprise"


@pytest.mark.parametrize("limit", ["0", "1001", "-1", "ten", ""])
def test_limit_out_of_range_is_400_json(http: httpx.Client, limit: str) -> None:
    response = http.get("/v1/subscriptions", params={"limit": limit})
    assert response.status_code == 400
    assert response.json()["error"] == "invalid_limit"


def test_limit_bounds_accepted(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.set_records([record(f"r{n:04d}") for n in range(1200)])
    assert len(http.get("/v1/subscriptions", params={"limit": 1}).json()["data"]) == 1
    assert len(http.get("/v1/subscriptions", params={"limit": 1000}).json()["data"]) == 1000


def test_invalid_cursor_is_400(http: httpx.Client) -> None:
    response = http.get("/v1/subscriptions", params={"cursor": "not-a-cursor!"})
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_cursor"}


@pytest.mark.parametrize("instance_id", ["", "inst-001", "a/b", "ü", "\ud800", "x" * 300])
def test_cursor_round_trip(instance_id: str) -> None:
    cursor = encode_cursor(instance_id)
    assert cursor and cursor.isascii()
    assert decode_cursor(cursor) == instance_id


def test_large_dataset_pages_deep_in_the_list(sim: BillingSimulator) -> None:
    sim.set_records(record(f"id-{n:07d}") for n in range(200_000))
    with httpx.Client(base_url=sim.base_url, headers=AUTH) as http:
        cursor = encode_cursor("id-0150000")
        started = time.perf_counter()
        body = http.get("/v1/subscriptions", params={"limit": 1000, "cursor": cursor}).json()
        elapsed = time.perf_counter() - started
    assert body["data"][0]["instance_id"] == "id-0150001"
    assert body["data"][-1]["instance_id"] == "id-0151000"
    assert elapsed < 2.0  # O(log N + limit), not O(N); generous bound for slow CI
    sim.upsert(record("id-0150000a"))
    assert len(sim) == 200_001


# -- single-record endpoint ------------------------------------------------------------------


def test_get_one_and_404(http: httpx.Client) -> None:
    response = http.get("/v1/subscriptions/inst-004")
    assert response.status_code == 200
    assert response.json() == record("inst-004")
    missing = http.get("/v1/subscriptions/nope")
    assert missing.status_code == 404
    assert missing.headers["content-type"] == "application/json"
    assert missing.json() == {"error": "subscription_not_found"}


@pytest.mark.parametrize("instance_id", ODD_IDS)
def test_odd_ids_are_percent_decoded(http: httpx.Client, sim: BillingSimulator, instance_id: str) -> None:
    sim.upsert(record(instance_id, plan_id="odd"))
    response = http.get(one_url(instance_id))
    assert response.status_code == 200, response.text
    assert response.json()["instance_id"] == instance_id
    sim.delete(instance_id)
    assert http.get(one_url(instance_id)).status_code == 404


def test_unencoded_slash_is_not_an_id(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.upsert(record("a/b"))
    assert http.get("/v1/subscriptions/a/b").status_code == 404
    assert http.get("/v1/subscriptions/a%2Fb").status_code == 200


def test_paths_outside_the_api_get_an_html_404(http: httpx.Client) -> None:
    response = http.get("/v2/whatever")
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("text/html")


def test_stores_and_serves_invalid_records_verbatim(http: httpx.Client, sim: BillingSimulator) -> None:
    weird = [{"plan_id": "no-id"}, ["not", "an", "object"], {"instance_id": 42}, record("ok", status="paused")]
    sim.set_records(weird)
    served = http.get("/v1/subscriptions").json()["data"]
    assert len(served) == 4
    for item in weird:
        assert item in served
    assert http.get("/v1/subscriptions/ok").json()["status"] == "paused"


def test_extra_fields_pass_through_and_records_are_copies(http: httpx.Client, sim: BillingSimulator) -> None:
    original = record("x", customer={"email": "a@b.c"}, tags=[1, 2])
    sim.upsert(original)
    original["plan_id"] = "mutated"
    served = http.get("/v1/subscriptions/x").json()
    assert served["customer"] == {"email": "a@b.c"} and served["tags"] == [1, 2]
    assert served["plan_id"] == "pro"
    snapshot = sim.records()
    assert [r["instance_id"] for r in snapshot][-1] == "x"
    snapshot[-1]["plan_id"] = "changed"
    assert sim.records()[-1]["plan_id"] == "pro"


# -- auth ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"},
     {"Authorization": "Bearer"}],
)
def test_auth_required(sim: BillingSimulator, headers: dict[str, str]) -> None:
    with httpx.Client(base_url=sim.base_url, headers=headers) as client:
        for path in ("/v1/subscriptions", "/v1/subscriptions/inst-001"):
            response = client.get(path)
            assert response.status_code == 401
            assert response.headers["content-type"] == "application/json"
            assert response.json()["error"] == "unauthorized"
            assert TOKEN not in response.text


def test_bearer_scheme_is_case_insensitive(sim: BillingSimulator) -> None:
    with httpx.Client(base_url=sim.base_url, headers={"Authorization": f"bearer {TOKEN}"}) as client:
        assert client.get("/v1/subscriptions").status_code == 200


def test_keep_alive_http_1_1(sim: BillingSimulator, http: httpx.Client) -> None:
    first = http.get("/v1/subscriptions/inst-001")
    second = http.get("/v1/subscriptions/inst-002")
    assert first.http_version == second.http_version == "HTTP/1.1"
    assert "close" not in first.headers.get("connection", "").lower()
    assert int(first.headers["content-length"]) == len(first.content)


def test_stop_cuts_keep_alive_connections(sim: BillingSimulator) -> None:
    with httpx.Client(base_url=sim.base_url, headers=AUTH, timeout=2) as client:
        assert client.get("/v1/subscriptions/inst-001").status_code == 200
        sim.stop()
        with pytest.raises(httpx.TransportError):
            client.get("/v1/subscriptions/inst-001")


# -- faults ----------------------------------------------------------------------------------


def test_rate_limit_fault(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("rate_limit", retry_after=7)
    limited = http.get("/v1/subscriptions")
    assert limited.status_code == 429
    assert limited.headers["retry-after"] == "7"
    assert limited.json()["error"] == "rate_limited"
    assert http.get("/v1/subscriptions").status_code == 200  # count=1 by default


def test_rate_limit_header_variants(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("rate_limit", retry_after=None)
    sim.add_fault("rate_limit", retry_after="soon")
    sim.add_fault("rate_limit", retry_after=0.5)
    assert "retry-after" not in http.get("/v1/subscriptions").headers
    assert http.get("/v1/subscriptions").headers["retry-after"] == "soon"
    assert http.get("/v1/subscriptions").headers["retry-after"] == "0.5"


def test_error_fault_is_500_json(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("error", endpoint="one")
    assert http.get("/v1/subscriptions").status_code == 200  # endpoint filter
    response = http.get("/v1/subscriptions/inst-001")
    assert response.status_code == 500
    assert response.json()["error"] == "internal_error"
    assert http.get("/v1/subscriptions/inst-001").status_code == 200


def test_drop_fault_closes_without_response(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("drop")
    with pytest.raises(httpx.RemoteProtocolError):
        http.get("/v1/subscriptions")
    assert http.get("/v1/subscriptions").status_code == 200


def test_slow_fault_delays_then_serves(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("slow", delay=0.3)
    started = time.perf_counter()
    response = http.get("/v1/subscriptions/inst-003")
    assert time.perf_counter() - started >= 0.3
    assert response.status_code == 200
    assert response.json()["instance_id"] == "inst-003"


def test_malformed_fault_is_html(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("malformed")
    response = http.get("/v1/subscriptions")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    with pytest.raises(json.JSONDecodeError):
        response.json()


def test_bad_shape_fault(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("bad_shape", count=2)
    assert http.get("/v1/subscriptions").json() == {"items": []}
    assert http.get("/v1/subscriptions/inst-001").json() == []
    assert "data" in http.get("/v1/subscriptions").json()


def test_after_count_and_fifo(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("error", endpoint="list", after=2, count=2)
    sim.add_fault("rate_limit", endpoint="list")
    statuses = [http.get("/v1/subscriptions").status_code for _ in range(6)]
    # request 1: rule 1 waits (after=2), rule 2 fires; 2: passes; 3, 4: rule 1; then clean.
    assert statuses == [429, 200, 500, 500, 200, 200]


def test_persistent_fault_and_clear(http: httpx.Client, sim: BillingSimulator) -> None:
    sim.add_fault("error", count=None)
    assert [http.get("/v1/subscriptions").status_code for _ in range(4)] == [500] * 4
    sim.clear_faults()
    assert http.get("/v1/subscriptions").status_code == 200


def test_faults_fire_before_auth(sim: BillingSimulator) -> None:
    sim.add_fault("error")
    with httpx.Client(base_url=sim.base_url) as client:
        assert client.get("/v1/subscriptions").status_code == 500
        assert client.get("/v1/subscriptions").status_code == 401


@pytest.mark.parametrize(
    "kwargs",
    [{"kind": "explode"}, {"kind": "error", "endpoint": "admin"}, {"kind": "error", "after": -1},
     {"kind": "error", "count": 0}, {"kind": "slow", "delay": -1}],
)
def test_add_fault_validates(sim: BillingSimulator, kwargs: dict) -> None:
    kind = kwargs.pop("kind")
    with pytest.raises(ValueError):
        sim.add_fault(kind, **kwargs)


def test_request_counts(http: httpx.Client, sim: BillingSimulator) -> None:
    http.get("/v1/subscriptions")
    http.get("/v1/subscriptions/inst-001")
    http.get("/v1/subscriptions/missing")
    http.get("/_sim/health")
    assert sim.request_count("list") == 1
    assert sim.request_count("one") == 2
    assert sim.request_count() == 3
    with pytest.raises(ValueError):
        sim.request_count("admin")


# -- admin endpoints -------------------------------------------------------------------------


def test_admin_endpoints_over_http(sim: BillingSimulator) -> None:
    with httpx.Client(base_url=sim.base_url) as admin, httpx.Client(base_url=sim.base_url, headers=AUTH) as api:
        health = admin.get("/_sim/health")
        assert health.status_code == 200
        assert health.json()["status"] == "ok" and health.json()["records"] == 25

        odd = "team/ü 100%"
        put = admin.put(one_url(odd).replace("/v1/", "/_sim/"), json=record(odd, plan_id="enterprise"))
        assert put.status_code == 200
        assert api.get(one_url(odd)).json()["plan_id"] == "enterprise"
        # The path id is the storage key, so even id-less records can be placed.
        assert admin.put("/_sim/subscriptions/broken", json={"plan_id": "x"}).status_code == 200
        assert api.get("/v1/subscriptions/broken").json() == {"plan_id": "x"}

        assert admin.delete(one_url(odd).replace("/v1/", "/_sim/")).json() == {"deleted": True}
        assert admin.delete("/_sim/subscriptions/never-there").json() == {"deleted": False}
        assert api.get(one_url(odd)).status_code == 404

        fault = admin.post("/_sim/faults", json={"kind": "error", "endpoint": "list", "count": None})
        assert fault.status_code == 201
        assert api.get("/v1/subscriptions").status_code == 500
        # Admin endpoints are never subject to faults.
        assert admin.get("/_sim/health").status_code == 200
        assert admin.delete("/_sim/faults").status_code == 200
        assert api.get("/v1/subscriptions").status_code == 200

        bad = admin.post("/_sim/faults", json={"kind": "explode"})
        assert bad.status_code == 400 and "explode" in bad.json()["message"]
        assert admin.post("/_sim/faults", json={"kind": "error", "bogus": 1}).status_code == 400
        assert admin.post("/_sim/faults", content=b"{not json").status_code == 400
        assert admin.put("/_sim/subscriptions/x", content=b"<html>").status_code == 400


def test_admin_rate_limit_fault_via_http(sim: BillingSimulator) -> None:
    with httpx.Client(base_url=sim.base_url, headers=AUTH) as client:
        client.post("/_sim/faults", json={"kind": "rate_limit", "retry_after": 3, "endpoint": "one", "after": 1})
        assert client.get("/v1/subscriptions/inst-001").status_code == 200
        limited = client.get("/v1/subscriptions/inst-001")
        assert limited.status_code == 429 and limited.headers["retry-after"] == "3"


def test_api_rejects_other_methods(http: httpx.Client) -> None:
    assert http.post("/v1/subscriptions", json={}).status_code == 405
    assert http.delete("/v1/subscriptions/inst-001").status_code == 405


def test_base_url_and_lifecycle() -> None:
    sim = BillingSimulator()
    with pytest.raises(RuntimeError):
        _ = sim.base_url
    sim.start()
    try:
        assert sim.base_url.startswith("http://127.0.0.1:")
        assert sim.port > 0
        assert "sim-token" not in repr(sim)
    finally:
        sim.stop()
        sim.stop()  # idempotent


# -- CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_serves_records_until_sigterm(tmp_path: Path) -> None:
    records_file = tmp_path / "records.json"
    records_file.write_text(json.dumps([record("cli-1"), record("cli-2", plan_id="team")]))
    env = {**os.environ, "BILLING_API_TOKEN": "cli-secret-token"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.simulators.generic", "--port", "0", "--records", str(records_file)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line.startswith("billing simulator listening on http://127.0.0.1:")
        base_url = line.rsplit(" ", 1)[-1]
        with httpx.Client(base_url=base_url, timeout=5) as client:
            assert client.get("/v1/subscriptions").status_code == 401
            body = client.get("/v1/subscriptions", headers={"Authorization": "Bearer cli-secret-token"}).json()
            assert [r["instance_id"] for r in body["data"]] == ["cli-1", "cli-2"]
            assert client.get("/_sim/health").json()["records"] == 2
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0
    assert "cli-secret-token" not in line + out + err
    assert "GET /v1" not in err  # no access-log spam
