"""The manual-sync and webhook HTTP app, end to end.

Real databases (``db_url``: SQLite, PostgreSQL and MySQL/MariaDB), the billing simulator over
real HTTP, the app through Starlette's TestClient for the many small cases and
served by uvicorn on a free port (in a thread, and as ``creditsync serve`` in a
subprocess) for the real-stack cases. Every rejection must leave every table
byte-for-byte unchanged and never call billing; no token or secret may appear
in a response or a log line.
"""

from __future__ import annotations

import json
import logging
import re
import signal
import socket
import subprocess
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import uvicorn
from hypothesis import HealthCheck, given, settings as hsettings, strategies as st

from creditsync_pipeline import appdb, cli
from creditsync_pipeline.billing import BillingClient
from creditsync_pipeline.server import create_app
from creditsync_pipeline.server.ratelimit import RateLimiter
from creditsync_pipeline.server.tokens import b64url_encode, sign_instance_token
from creditsync_pipeline.server.webhooks import SIGNATURE_HEADER, sign_webhook
from creditsync_pipeline.settings import Secret, Settings
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, creditsync_serve, dump_tables, end_state, seeded

with warnings.catch_warnings():
    # Starlette 1.x prefers httpx2 for its TestClient and warns on import when it
    # finds httpx; the client works the same (the dependency choice is the lead's).
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from starlette.testclient import TestClient

APP_SECRET = "app-SECRET-5e0c2b1d9a"
WEBHOOK_SECRET = "whsec-SECRET-8c4411f0"
SYNC = "/api/billing/sync-credits"
WEBHOOK = "/api/billing/webhook"
SECRETS = (APP_SECRET, WEBHOOK_SECRET, TOKEN)


def token_for(instance_id: str, sign_date: datetime | None = None, secret: str = APP_SECRET) -> str:
    return sign_instance_token(secret, instance_id, sign_date)


def auth(instance_id: str, **kw) -> dict[str, str]:
    return {"x-wix-instance": token_for(instance_id, **kw)}


def make_settings(db_url: str, billing_url: str, **overrides) -> Settings:
    values = dict(
        database_url=db_url,
        billing_api_url=billing_url,
        billing_api_token=Secret(TOKEN),
        app_secret=Secret(APP_SECRET),
        webhook_secret=Secret(WEBHOOK_SECRET),
        sync_rate_limit=100,
        receiver_workers=0,  # these tests look at what lands; tests/test_receivers.py at the syncs after it
    )
    values.update(overrides)
    return Settings(**values)


def fast_billing(url: str, token: str = TOKEN) -> BillingClient:
    """The billing client of the app, minus the waits between retries."""
    return BillingClient(url, token, max_attempts=2, backoff_initial=0, backoff_max=0, max_retry_after=0, concurrency=1)


def assert_clean(text: str, *tokens: str) -> None:
    for needle in (*SECRETS, *tokens):
        assert needle not in text, "a secret or token leaked"


@pytest.fixture
def world(db_url):
    data = seeded(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim:
        yield data, sim


@pytest.fixture
def client(world, db_url) -> Iterator[TestClient]:
    _, sim = world
    with TestClient(create_app(make_settings(db_url, sim.base_url)), raise_server_exceptions=False) as c:
        yield c


def stuck_instances(data) -> list[str]:
    """Instances on the free plan that billing says are paying (besides abc123)."""
    rows = {r["instance_id"]: r for r in data.instances}
    return [
        iid for iid, (plan, _) in data.expected.items()
        if iid != "abc123" and rows[iid]["plan_id"] == "free" and plan != "free"
    ]


# -- the button ----------------------------------------------------------------------------------


def test_sync_corrects_the_callers_instance_audits_manual_and_converges(client, world, db_url):
    data, sim = world
    before = end_state(db_url)
    response = client.post(SYNC, headers=auth("abc123"))
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["instance_id"] == "abc123"
    assert body["changed"] is True
    assert body["old"] == {"plan_id": "free", "credits_total": 100}
    assert body["new"] == {"plan_id": "pro", "credits_total": 5000}
    after = end_state(db_url)
    assert after["abc123"] == ("pro", 5000, before["abc123"][2])  # credits_used untouched
    assert {k: v for k, v in after.items() if k != "abc123"} == {k: v for k, v in before.items() if k != "abc123"}
    audit = audit_rows(db_url)
    assert len(audit) == 1
    row = audit.iloc[0]
    assert (row.trigger, row.instance_id, row.old_plan_id, row.new_plan_id, row.old_credits_total, row.new_credits_total) == (
        "manual", "abc123", "free", "pro", 100, 5000)
    assert row.run_id == body["run_id"]
    assert sim.request_count("one") == 1 and sim.request_count("list") == 0

    again = client.post(SYNC, headers=auth("abc123"))
    assert again.status_code == 200
    assert again.json() | {"run_id": None} == {
        "instance_id": "abc123", "run_id": None, "changed": False, "outcome": "already_correct",
        "old": {"plan_id": "pro", "credits_total": 5000}, "new": {"plan_id": "pro", "credits_total": 5000},
    }
    assert len(audit_rows(db_url)) == 1


def test_bearer_token_works_too(client, db_url):
    response = client.post(SYNC, headers={"Authorization": f"Bearer {token_for('abc123')}"})
    assert response.status_code == 200, response.text
    assert response.json()["changed"] is True
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)


def test_only_the_callers_own_instance_is_synced(client, world, db_url):
    data, sim = world
    victim = stuck_instances(data)[0]
    before = end_state(db_url)
    response = client.post(
        SYNC,
        params={"instance_id": victim, "instanceId": victim, "instance": token_for(victim)},
        json={"instance_id": victim, "instanceId": victim, "instance_ids": [victim]},
        headers=auth("abc123"),
    )
    assert response.status_code == 200, response.text
    assert response.json()["instance_id"] == "abc123"
    after = end_state(db_url)
    assert after[victim] == before[victim], "another instance was synced"
    assert after["abc123"][:2] == ("pro", 5000)
    assert list(audit_rows(db_url)["instance_id"]) == ["abc123"]
    assert sim.request_count() == 1  # billing was asked about abc123 only


def rejection_cases():
    good = token_for("abc123")
    sig, data = good.split(".")
    forged = b64url_encode(json.dumps({"instanceId": "abc123", "signDate": "2099-01-01T00:00:00Z"}).encode())
    stale = datetime.now(timezone.utc) - timedelta(hours=24, minutes=5)
    return [
        pytest.param({}, "missing_token", id="no-header"),
        pytest.param({"x-wix-instance": ""}, "missing_token", id="empty"),
        pytest.param({"Authorization": "Bearer "}, "missing_token", id="empty-bearer"),
        pytest.param({"x-wix-instance": "garbage"}, "invalid_token", id="garbage"),
        pytest.param({"x-wix-instance": token_for("abc123", secret="wrong-secret")}, "invalid_token", id="wrong-secret"),
        pytest.param({"x-wix-instance": f"{sig}.{forged}"}, "invalid_token", id="tampered-data"),
        pytest.param({"x-wix-instance": f"{sig}=.{data}"}, "invalid_token", id="padded"),
        pytest.param({"x-wix-instance": f"{data}.{sig}"}, "invalid_token", id="swapped"),
        pytest.param({"x-wix-instance": token_for("abc123", sign_date=stale)}, "expired_token", id="stale"),
        pytest.param({"x-wix-instance": token_for("abc123", sign_date=datetime.now(timezone.utc) + timedelta(hours=1))},
                     "invalid_token", id="future"),
        pytest.param({"Authorization": f"Basic {good}"}, "invalid_token", id="basic-scheme"),
        pytest.param({"Authorization": good}, "invalid_token", id="no-scheme"),
    ]


@pytest.mark.parametrize("headers, code", rejection_cases())
def test_every_bad_token_is_401_json_and_changes_nothing(client, world, db_url, headers, code, caplog):
    _, sim = world
    caplog.set_level(logging.DEBUG)
    before = dump_tables(db_url)
    response = client.post(SYNC, headers=headers, json={"instance_id": "abc123"})
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("application/json")
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert body["error"] == code and body["message"]
    assert dump_tables(db_url) == before
    assert sim.request_count() == 0
    sent = [v for v in headers.values() if len(v.strip()) >= 10]
    parts = [p for v in sent for p in re.split(r"[ .=]", v) if len(p) >= 8]
    assert_clean(response.text, *sent, *parts)
    assert_clean(caplog.text, *sent, *parts)


def test_unknown_instance_is_404_and_costs_no_billing_call(client, world, db_url):
    _, sim = world
    before = dump_tables(db_url)
    response = client.post(SYNC, headers=auth("never-provisioned"))
    assert response.status_code == 404
    assert response.json()["error"] == "unknown_instance"
    assert dump_tables(db_url) == before
    assert sim.request_count() == 0


def test_instance_entitled_to_an_unknown_plan_is_reported_not_written(client, world, db_url):
    data, _ = world
    iid = next(r["instance_id"] for r in data.records if r["plan_id"] == "enterprise")
    before = dump_tables(db_url)
    response = client.post(SYNC, headers=auth(iid))
    assert response.status_code == 200
    body = response.json()
    assert (body["changed"], body["outcome"], body["kind"]) == (False, "needs_attention", "unknown_plan")
    assert body["old"] == body["new"] == {"plan_id": "free", "credits_total": 100}
    assert dump_tables(db_url) == before


def test_canceled_subscription_downgrade_is_applied_too(client, world, db_url):
    """The button runs the whole targeted sync: it also takes away what billing no longer has."""
    data, sim = world
    rows = {r["instance_id"]: r for r in data.instances}
    paying = next(iid for iid, (plan, _) in data.expected.items() if plan == "team" and rows[iid]["plan_id"] == "team")
    sim.delete(paying)
    response = client.post(SYNC, headers=auth(paying))
    assert response.status_code == 200
    assert response.json()["new"] == {"plan_id": "free", "credits_total": 100}
    assert end_state(db_url)[paying][:2] == ("free", 100)


def test_rate_limit_per_instance_with_retry_after(world, db_url):
    data, sim = world
    other = stuck_instances(data)[0]
    app = create_app(make_settings(db_url, sim.base_url, sync_rate_limit=2))
    with TestClient(app) as client:
        assert client.post(SYNC, headers=auth("abc123")).status_code == 200
        assert client.post(SYNC, headers=auth("abc123")).status_code == 200
        calls = sim.request_count()
        limited = client.post(SYNC, headers=auth("abc123"))
        assert limited.status_code == 429
        assert 1 <= int(limited.headers["retry-after"]) <= 60
        assert limited.json()["error"] == "rate_limited"
        assert limited.json()["retry_after"] == int(limited.headers["retry-after"])
        assert sim.request_count() == calls, "a rate-limited request reached billing"
        # bad tokens do not spend the instance's budget, other instances have their own
        assert client.post(SYNC, headers={"x-wix-instance": "junk"}).status_code == 401
        assert client.post(SYNC, headers=auth(other)).status_code == 200
    assert len(audit_rows(db_url)) == 2


def test_rate_limit_window_slides(world, db_url):
    data, sim = world

    class Clock:
        now = 0.0

        def __call__(self):
            return self.now

    clock = Clock()
    app = create_app(make_settings(db_url, sim.base_url), rate_limiter=RateLimiter(1, 60, clock=clock))
    with TestClient(app) as client:
        assert client.post(SYNC, headers=auth("abc123")).status_code == 200
        assert client.post(SYNC, headers=auth("abc123")).status_code == 429
        clock.now = 60.0
        assert client.post(SYNC, headers=auth("abc123")).status_code == 200


def test_billing_outage_is_503_and_changes_nothing(world, db_url, caplog):
    _, sim = world
    caplog.set_level(logging.INFO)
    sim.add_fault("error", endpoint="one", count=None)
    app = create_app(make_settings(db_url, sim.base_url), billing=fast_billing(sim.base_url))
    before = dump_tables(db_url)
    with TestClient(app) as client:
        response = client.post(SYNC, headers=auth("abc123"))
    assert response.status_code == 503
    assert response.json()["error"] == "billing_unavailable"
    assert int(response.headers["retry-after"]) > 0
    assert dump_tables(db_url) == before
    assert "[CreditSync] Error running credit sync task:" in caplog.text
    assert_clean(response.text)
    assert_clean(caplog.text)


def test_billing_rejecting_our_token_is_502(world, db_url):
    _, sim = world
    app = create_app(make_settings(db_url, sim.base_url), billing=fast_billing(sim.base_url, "not-the-token"))
    before = dump_tables(db_url)
    with TestClient(app) as client:
        response = client.post(SYNC, headers=auth("abc123"))
    assert response.status_code == 502
    assert response.json()["error"] == "billing_error"
    assert "not-the-token" not in response.text
    assert dump_tables(db_url) == before


def test_database_down_is_503_for_sync_webhook_and_health(tmp_path):
    dead = f"sqlite:///{tmp_path / 'no-such-dir' / 'app.db'}"
    with BillingSimulator([], token=TOKEN) as sim:
        with TestClient(create_app(make_settings(dead, sim.base_url))) as client:
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["error"] == "database_unreachable"
            sync_ = client.post(SYNC, headers=auth("abc123"))
            assert sync_.status_code == 503 and sync_.json()["error"] == "database_unavailable"
            body = b'{"event_id": "evt_dead", "type": "subscription.updated", "instance_id": "abc123"}'
            hook = client.post(WEBHOOK, content=body, headers={SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body)})
            assert hook.status_code == 503, "a webhook must not be acknowledged before it is stored"


def test_healthz(client):
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok"}


def test_unknown_routes_and_methods_answer_json(client):
    assert client.get(SYNC).status_code == 405
    assert client.get(SYNC).json()["error"] == "method_not_allowed"
    assert client.get("/nope").json()["error"] == "not_found"


def test_missing_secret_is_a_start_up_error(db_url):
    from creditsync_pipeline.settings import SettingsError

    with pytest.raises(SettingsError, match="CREDITSYNC_APP_SECRET is not set"):
        create_app(make_settings(db_url, "http://127.0.0.1:1", app_secret=Secret("")))


# -- the webhook receiver --------------------------------------------------------------------------


def webhook_rows(db_url):
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            return [dict(r._mapping) for r in conn.execute(appdb.billing_webhook_events.select())]
    finally:
        engine.dispose()


def signed(body: bytes, **kw) -> dict[str, str]:
    return {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body, **kw), "content-type": "application/json"}


def test_webhook_lands_the_event_idempotently_after_commit(client, db_url):
    body = b'{"event_id": "evt_100", "type": "subscription.updated", "instance_id": "abc123", "extra": {"a": 1}}'
    first = client.post(WEBHOOK, content=body, headers=signed(body))
    assert first.status_code == 200, first.text
    assert first.json() == {"received": True, "event_id": "evt_100", "duplicate": False}
    rows = webhook_rows(db_url)  # a separate connection: the row is committed
    assert len(rows) == 1
    row = rows[0]
    assert (row["event_id"], row["event_type"], row["instance_id"], row["payload"], row["processed_at"]) == (
        "evt_100", "subscription.updated", "abc123", body.decode(), None)
    again = client.post(WEBHOOK, content=body, headers=signed(body))
    assert again.status_code == 200
    assert again.json()["duplicate"] is True
    assert webhook_rows(db_url) == rows
    # the receiver only lands rows: the instance itself is the sensor's job
    assert end_state(db_url)["abc123"][:2] == ("free", 100)


def test_webhook_without_instance_is_landed(client, db_url):
    body = b'{"event_id": "evt_ping", "type": "ping"}'
    assert client.post(WEBHOOK, content=body, headers=signed(body)).status_code == 200
    assert webhook_rows(db_url)[0]["instance_id"] is None


def webhook_rejections():
    """(body, headers factory, status, code): signatures are made when the test runs, so a
    long suite never turns a 'wrong secret' case into a stale one."""
    body = b'{"event_id": "evt_bad", "type": "subscription.updated", "instance_id": "abc123"}'
    return [
        pytest.param(body, lambda: {}, 401, "invalid_signature", id="no-signature"),
        pytest.param(body, lambda: {SIGNATURE_HEADER: "t=1,v1=abc"}, 401, "invalid_signature", id="garbled"),
        pytest.param(body, lambda: {SIGNATURE_HEADER: sign_webhook("other", body)}, 401, "invalid_signature",
                     id="wrong-secret"),
        pytest.param(body + b" ", lambda: {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body)}, 401,
                     "invalid_signature", id="body-changed"),
        pytest.param(body, lambda: {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body, int(time.time()) - 3600)},
                     401, "stale_signature", id="stale"),
        pytest.param(b'{"type": "x"}', lambda: {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, b'{"type": "x"}')}, 400,
                     "invalid_event", id="no-event-id"),
        pytest.param(b"x" * 300_000, lambda: {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, b"x" * 300_000)}, 413,
                     "payload_too_large", id="too-large"),
    ]


@pytest.mark.parametrize("body, headers, status, code", webhook_rejections())
def test_webhook_rejections_land_nothing(client, db_url, body, headers, status, code, caplog):
    caplog.set_level(logging.DEBUG)
    before = dump_tables(db_url)
    response = client.post(WEBHOOK, content=body, headers=headers())
    assert response.status_code == status
    assert response.json()["error"] == code
    assert dump_tables(db_url) == before
    assert_clean(response.text)
    assert_clean(caplog.text)


def test_webhook_disabled_without_its_secret(world, db_url):
    _, sim = world
    app = create_app(make_settings(db_url, sim.base_url, webhook_secret=Secret("")))
    body = b'{"event_id": "evt_1", "type": "x"}'
    with TestClient(app) as client:
        response = client.post(WEBHOOK, content=body, headers={SIGNATURE_HEADER: sign_webhook("anything", body)})
    assert response.status_code == 503
    assert response.json()["error"] == "webhook_not_configured"
    assert webhook_rows(db_url) == []


# -- real HTTP: uvicorn ---------------------------------------------------------------------------


@contextmanager
def served(app) -> Iterator[str]:
    """Serve ``app`` with uvicorn on a free port in a thread; yield its base URL."""
    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:  # readiness wait, not a timing assertion
        assert thread.is_alive(), "uvicorn exited during start-up"
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def test_over_real_http_with_uvicorn(world, db_url, caplog):
    data, sim = world
    caplog.set_level(logging.DEBUG)
    app = create_app(make_settings(db_url, sim.base_url, sync_rate_limit=1))
    token = token_for("abc123")
    with served(app) as base, httpx.Client(base_url=base, timeout=30) as http:
        app_base = base
        assert http.get("/healthz").json() == {"status": "ok"}
        assert http.post(SYNC, headers={"x-wix-instance": "bogus." + token}).status_code == 401
        response = http.post(SYNC, headers={"x-wix-instance": token}, params={"instance": token})
        assert response.status_code == 200, response.text
        assert response.json()["new"] == {"plan_id": "pro", "credits_total": 5000}
        limited = http.post(SYNC, headers={"Authorization": f"Bearer {token}"})
        assert limited.status_code == 429 and int(limited.headers["retry-after"]) >= 1
        body = json.dumps({"event_id": "evt_http", "type": "subscription.updated", "instance_id": "abc123"}).encode()
        hook = http.post(WEBHOOK, content=body, headers=signed(body))
        assert hook.status_code == 200
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)
    assert [r["event_id"] for r in webhook_rows(db_url)] == ["evt_http"]
    assert "Synced credits for instance abc123: 100 → 5000" in caplog.text
    assert f"{SYNC} 200" in caplog.text  # our access log: path and status, no query string
    # everything logged in this process except this test's own HTTP client (which logs the URL it calls)
    server_side = "\n".join(
        r.getMessage() for r in caplog.records
        if not (r.name.startswith(("httpx", "httpcore")) and app_base in r.getMessage())
    )
    assert_clean(server_side, token, *token.split("."))


class GatedBilling(BillingClient):
    """A billing client whose per-instance fetch waits until the test opens the gate."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.entered = threading.Event()
        self.gate = threading.Event()

    def fetch_instances(self, instance_ids, **kwargs):
        self.entered.set()
        assert self.gate.wait(timeout=60), "test never opened the gate"
        return super().fetch_instances(instance_ids, **kwargs)


def test_a_second_press_while_a_sync_runs_is_429_not_a_second_sync(world, db_url):
    _, sim = world
    billing = GatedBilling(sim.base_url, TOKEN, max_attempts=1, concurrency=1)
    app = create_app(make_settings(db_url, sim.base_url), billing=billing)
    results: list[httpx.Response] = []
    with served(app) as base, httpx.Client(base_url=base, timeout=60) as http:
        first = threading.Thread(target=lambda: results.append(http.post(SYNC, headers=auth("abc123"))))
        first.start()
        try:
            assert billing.entered.wait(timeout=60), "the first sync never reached billing"
            second = http.post(SYNC, headers=auth("abc123"))
        finally:
            billing.gate.set()
            first.join(timeout=60)
            billing.close()
    assert second.status_code == 429
    assert second.json()["error"] == "sync_in_progress" and second.headers["retry-after"] == "1"
    assert [r.status_code for r in results] == [200]
    assert sim.request_count() == 1
    assert len(audit_rows(db_url)) == 1


def test_creditsync_serve_subprocess_end_to_end(world, db_url, tmp_path):
    """``creditsync serve`` as an operator runs it: real process, real port, logs on stderr."""
    data, sim = world
    env = {
        "DATABASE_URL": db_url,
        "BILLING_API_URL": sim.base_url,
        "BILLING_API_TOKEN": TOKEN,
        "CREDITSYNC_APP_SECRET": APP_SECRET,
        "CREDITSYNC_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    token = token_for("abc123")
    with creditsync_serve(env, stdout=subprocess.PIPE) as serve:
        with httpx.Client(base_url=serve.base_url, timeout=30) as http:
            assert http.get("/healthz").status_code == 200
            assert http.post(SYNC, headers={"x-wix-instance": token[:-2]}).status_code == 401
            response = http.post(SYNC, headers={"x-wix-instance": token}, params={"instance": token})
            assert response.status_code == 200, response.text
            assert response.json()["changed"] is True
    proc, captured = serve.proc, serve.captured
    log = "".join(captured) + (proc.stdout.read() if proc.stdout else "")
    # uvicorn shuts down gracefully, then re-raises SIGTERM so the exit status says why it stopped
    assert proc.returncode in (0, -signal.SIGTERM), log
    assert "Application shutdown complete" in log
    assert "[CreditSync] Running credit sync task..." in log
    assert "Synced credits for instance abc123: 100 → 5000" in log
    assert "[CreditSync] Successfully synced credits for 1 instance(s)" in log
    assert_clean(log, token, *token.split("."), token[:-2])
    audit = audit_rows(db_url)
    assert list(zip(audit["instance_id"], audit["trigger"])) == [("abc123", "manual")]


def test_serve_without_secret_exits_2_before_binding(monkeypatch, capsys, tmp_path):
    monkeypatch.delenv("CREDITSYNC_APP_SECRET", raising=False)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    bound = []
    monkeypatch.setattr("creditsync_pipeline.server.app._bind", lambda *a: bound.append(a))
    assert cli.main(["serve", "--port", "0"]) == 2
    out, err = capsys.readouterr()
    assert err.strip() == "creditsync: error: CREDITSYNC_APP_SECRET is not set"
    assert out == "" and bound == []


def test_serve_on_a_busy_port_is_a_one_line_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("CREDITSYNC_APP_SECRET", APP_SECRET)
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'app.db'}")
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert cli.main(["serve", "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"creditsync: error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1
    assert APP_SECRET not in err


# -- fuzz: random and mutated tokens never authenticate and never crash ----------------------------


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('fuzz') / 'app.db'}"
    data = seeded(url)
    with BillingSimulator(data.records, token=TOKEN) as sim:
        with TestClient(create_app(make_settings(url, sim.base_url)), raise_server_exceptions=False) as client:
            yield client, url


GOOD = sign_instance_token(APP_SECRET, "abc123", datetime.now(timezone.utc))
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


@st.composite
def mutated_tokens(draw) -> str:
    token = GOOD
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(token)))
        op = draw(st.sampled_from(["replace", "insert", "delete", "truncate", "swap", "dup"]))
        ch = draw(st.one_of(st.sampled_from(B64 + ".=+/ "), st.characters(max_codepoint=0xFF)))
        if op == "replace" and i < len(token):
            token = token[:i] + ch + token[i + 1:]
        elif op == "insert":
            token = token[:i] + ch + token[i:]
        elif op == "delete" and i < len(token):
            token = token[:i] + token[i + 1:]
        elif op == "truncate":
            token = token[:i]
        elif op == "swap":
            sig, _, data = token.partition(".")
            token = f"{data}.{sig}"
        elif op == "dup":
            token = token + "." + token[:i]
    return token


header_values = st.one_of(
    mutated_tokens(),
    st.text(max_size=300).map(lambda s: s.encode("utf-8")),
    st.binary(max_size=300),
    st.builds(lambda a, b: f"{a}.{b}", st.text(B64, max_size=60), st.text(B64, max_size=200)),
)


@hsettings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=header_values, header=st.sampled_from(["x-wix-instance", "authorization-bearer", "authorization-raw"]))
def test_fuzzed_tokens_never_authenticate_or_crash(fuzz_client, value, header):
    client, _ = fuzz_client
    raw = value if isinstance(value, bytes) else value.encode("latin-1", "replace")
    if raw.strip(b" \t") == GOOD.encode():
        return  # an unchanged token is legitimately valid
    if header == "x-wix-instance":
        headers = [(b"x-wix-instance", raw)]
    elif header == "authorization-bearer":
        headers = [(b"authorization", b"Bearer " + raw)]
    else:
        headers = [(b"authorization", raw)]
    response = client.post(SYNC, headers=headers)
    assert response.status_code == 401, (response.status_code, response.text)
    assert response.json()["error"] in {"missing_token", "invalid_token", "expired_token"}
    assert APP_SECRET not in response.text


@hsettings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=500), signature=st.one_of(st.none(), st.binary(max_size=200),
       st.builds(lambda t, h: f"t={t},v1={h}".encode(), st.integers(-10, 2**40), st.text("0123456789abcdef", max_size=70))))
def test_fuzzed_webhooks_never_land_or_crash(fuzz_client, body, signature):
    client, url = fuzz_client
    headers = [] if signature is None else [(SIGNATURE_HEADER.lower().encode(), signature)]
    response = client.post(WEBHOOK, content=body, headers=headers)
    assert response.status_code == 401, (response.status_code, response.text)
    assert WEBHOOK_SECRET not in response.text
