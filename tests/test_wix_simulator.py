"""The Wix simulator as its own process, driven through its admin endpoints (as the demo and the
benchmark drive it), and the Wix API answers it gives."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from creditsync_pipeline.billing.wix import TokenCache, WixProvider
from creditsync_pipeline.demo import demo_dataset
from creditsync_pipeline.simulators.generic import generate_records
from creditsync_pipeline.simulators.wix import DEFAULT_APP_ID, DEFAULT_APP_SECRET, WixSimulator

from .helpers import NOW

REPO = Path(__file__).resolve().parents[1]
APP_ID, SECRET = "proc-app", "proc-SECRET-0d9e"


def start(*args: str, env_extra: dict[str, str] | None = None):
    env = {"PATH": "/usr/bin:/bin", "WIX_APP_ID": APP_ID, "WIX_APP_SECRET": SECRET, **(env_extra or {})}
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.simulators.wix", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+) \((\d+) instances\)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"simulator did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(1), int(match.group(2))


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=20) == 0


@pytest.fixture
def demo_files(tmp_path):
    data = demo_dataset(NOW)
    records, installed = tmp_path / "records.json", tmp_path / "installed.json"
    records.write_text(json.dumps(data.records))
    installed.write_text(json.dumps([i["instance_id"] for i in data.instances]))
    return data, records, installed


def token(client, instance_id, secret=SECRET):
    return client.post("/oauth2/token", json={"grant_type": "client_credentials", "client_id": APP_ID,
                                               "client_secret": secret, "instance_id": instance_id})


def test_demo_data_in_another_process_and_its_admin_endpoints(demo_files):
    data, records, installed = demo_files
    proc, url, count = start("--records", str(records), "--installed", str(installed))
    try:
        assert count == len({*data.expected, *(i["instance_id"] for i in data.instances), "deleted-site-9"})
        with httpx.Client(base_url=url) as c:
            granted = token(c, "abc123").json()
            assert granted["token_type"] == "Bearer" and granted["expires_in"] == 14400
            assert granted["access_token"].startswith("OauthNG.JWS.")
            inst = c.get("/apps/v1/instance", headers={"Authorization": granted["access_token"]}).json()["instance"]
            assert inst["isFree"] is False and inst["billing"]["packageName"] == "pro"
            # the app's wrong secret and unknown instances, Wix-style (OAuth 2.0 error bodies)
            assert token(c, "abc123", secret="nope").json() == {
                "error": "invalid_client", "error_description": "client authentication failed"}
            refused = token(c, "never-installed")
            assert refused.status_code == 400 and refused.json()["error"] == "invalid_grant"
            assert c.get("/apps/v1/instance", headers={"Authorization": "OauthNG.JWS.forged"}).status_code == 401
            assert c.get("/apps/v1/instance").json()["details"]["applicationError"]["code"] == "UNAUTHENTICATED"
            # uninstall: the live token is revoked and no new one is granted
            assert c.post("/_sim/instances/abc123/remove").json() == {"removed": True}
            assert c.get("/apps/v1/instance", headers={"Authorization": granted["access_token"]}).status_code == 401
            assert token(c, "abc123").status_code == 400
            # reinstall with another plan
            assert c.put("/_sim/instances/abc123", json={"instanceId": "abc123", "isFree": True}).status_code == 200
            assert c.get("/_sim/instances/abc123").json() == {
                "instance": {"instanceId": "abc123", "isFree": True}, "removed": False}
            live = token(c, "abc123").json()["access_token"]
            assert c.post("/_sim/tokens/expire").json()["expired"] >= 1
            assert c.get("/apps/v1/instance", headers={"Authorization": live}).status_code == 401
            # dead-on-arrival tokens, persistent failures, rate limits, faults
            assert c.post("/_sim/tokens/dead_on_arrival", json={"count": 1}).status_code == 200
            dead = token(c, "site-0001").json()["access_token"]
            assert c.get("/apps/v1/instance", headers={"Authorization": dead}).status_code == 401
            assert c.put("/_sim/instances/site-0001/failure", json={"status": 502, "endpoint": "token"}).status_code == 200
            assert token(c, "site-0001").status_code == 502
            assert c.delete("/_sim/instances/site-0001/failure").status_code == 200
            assert token(c, "site-0001").status_code == 200
            assert c.put("/_sim/instances/site-0001/failure", json={"status": 200}).status_code == 400
            assert c.put("/_sim/rate_limit", json={"per_minute": 1}).status_code == 200
            assert token(c, "site-0002").status_code == 200
            limited = token(c, "site-0002")
            assert limited.status_code == 429 and 1 <= int(limited.headers["Retry-After"]) <= 60
            assert c.put("/_sim/rate_limit", json={"per_minute": None}).status_code == 200
            assert c.post("/_sim/faults", json={"kind": "error", "endpoint": "instance", "count": 1}).status_code == 201
            ok = token(c, "site-0002").json()["access_token"]
            assert c.get("/apps/v1/instance", headers={"Authorization": ok}).status_code == 500
            assert c.post("/_sim/faults", json={"kind": "error", "endpoint": "list"}).status_code == 400
            assert c.delete("/_sim/instances/site-0002").json() == {"deleted": True}
            assert token(c, "site-0002").status_code == 400
            assert c.get("/nope").status_code == 404 and c.get("/oauth2/token").status_code == 405
            health = c.get("/_sim/health").json()
            assert health["tokens_granted"] >= 5 and health["requests"]["token"] >= 10
    finally:
        stop(proc)


def test_generated_instances_serve_a_full_run():
    proc, url, count = start("--generate", "300", "--seed", "3", "--token-ttl", "600")
    try:
        ids = [r["instance_id"] for r in generate_records(300, seed=3)]
        assert count == 300
        with WixProvider(APP_ID, SECRET, api_base=url, tokens=TokenCache()) as wix:
            snap = wix.fetch_all(ids)
        assert snap.unresolved.empty and 0 < len(snap.records) < 300
        with httpx.Client(base_url=url) as c:
            assert token(c, ids[0]).json()["expires_in"] == 600
    finally:
        stop(proc)


def test_defaults_and_bad_arguments(tmp_path):
    proc, url, _ = start("--generate", "1", env_extra={"WIX_APP_ID": "", "WIX_APP_SECRET": ""})
    try:
        with httpx.Client(base_url=url) as c:
            granted = c.post("/oauth2/token", json={"grant_type": "client_credentials", "client_id": DEFAULT_APP_ID,
                                                     "client_secret": DEFAULT_APP_SECRET,
                                                     "instance_id": generate_records(1)[0]["instance_id"]})
            assert granted.status_code == 200
            assert c.post("/oauth2/token", json={"grant_type": "password"}).json()["error"] == "unsupported_grant_type"
            assert c.post("/oauth2/token", content=b"{").status_code == 400
    finally:
        stop(proc)
    bad = tmp_path / "bad.json"
    bad.write_text("42")
    result = subprocess.run([sys.executable, "-m", "creditsync_pipeline.simulators.wix", "--instances", str(bad)],
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert result.returncode == 2 and "expected a JSON list or object" in result.stderr


def test_constructor_checks():
    with pytest.raises(ValueError, match="removed_status"):
        WixSimulator(removed_status=429)
    sim = WixSimulator([{"instanceId": "a", "isFree": True}])
    assert len(sim) == 1 and sim.instance("a") == {"instanceId": "a", "isFree": True}
    with pytest.raises(ValueError, match="endpoint"):
        sim.set_failure("a", 500, endpoint="list")


def test_demo_instances_file_as_the_demo_would_start_it(tmp_path):
    from creditsync_pipeline.simulators.wix import demo_instances

    data = demo_dataset(NOW)
    path = tmp_path / "wix_instances.json"
    path.write_text(json.dumps(demo_instances(data)))
    proc, url, count = start("--instances", str(path))
    try:
        assert count == 201  # every app row, plus the demo's purchase for a site the app never provisioned
        with WixProvider(APP_ID, SECRET, api_base=url, tokens=TokenCache()) as wix:
            snap = wix.fetch_all([i["instance_id"] for i in data.instances])
        assert snap.unresolved.empty
        assert dict(zip(snap.records["instance_id"], snap.records["plan_id"]))["abc123"] == "pro"
    finally:
        stop(proc)
