"""``CREDITSYNC_LOG_FILE``: the CLI, ``creditsync serve`` and Dagster runs append their operator
lines to one rotating file (``tail -f logs/server.log | grep CreditSync``), with no secret in it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from dagster import DagsterInstance, materialize

from creditsync_pipeline import logs
from creditsync_pipeline.defs.assets import credit_sync_assets
from creditsync_pipeline.defs.checks import credit_sync_checks
from creditsync_pipeline.defs.jobs import revert_credit_sync_run
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.demo import write_dagster_home
from creditsync_pipeline.server.tokens import sign_instance_token
from creditsync_pipeline.server.webhooks import sign_webhook

from .helpers import TOKEN
from .test_cli_e2e import run_cli, sim, world  # noqa: F401 - fixtures

APP_SECRET = "app-SECRET-logfile-0e7d"
WEBHOOK_SECRET = "whsec-SECRET-logfile-4a2c"
SECRETS = (TOKEN, APP_SECRET, WEBHOOK_SECRET)


@pytest.fixture
def log_file(tmp_path, monkeypatch):
    path = tmp_path / "logs" / "server.log"  # the directory does not exist yet
    monkeypatch.setenv("CREDITSYNC_LOG_FILE", str(path))
    monkeypatch.setenv("CREDITSYNC_APP_SECRET", APP_SECRET)
    monkeypatch.setenv("CREDITSYNC_WEBHOOK_SECRET", WEBHOOK_SECRET)
    yield path
    logs.close_log_files()


def read(path: Path) -> str:
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    for secret in SECRETS:
        assert secret not in text, "a secret reached the log file"
    return text


def wait_for(path: Path, *needles: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = read(path)
        if all(n in text for n in needles) or time.monotonic() > deadline:
            return text
        time.sleep(0.2)


def test_cli_fix_lines_land_in_the_file(world, log_file, capsys):
    code, _, err = run_cli(capsys, "fix")
    assert code == 0, err
    text = read(log_file)
    assert "[CreditSync] Running credit sync task..." in text
    assert "Updating instance plan abc123: free → pro" in text
    assert "Synced credits for instance abc123: 100 → 5000" in text
    assert "[CreditSync] Successfully synced credits for 15 instance(s)" in text
    grepped = [line for line in text.splitlines() if "CreditSync" in line]
    assert len(grepped) >= 2


def test_an_error_line_reaches_the_file_but_the_terminal_once(world, log_file, monkeypatch, capsys):
    monkeypatch.setenv("BILLING_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("BILLING_API_MAX_ATTEMPTS", "1")
    code, _, err = run_cli(capsys, "check")
    assert code == 2 and len([line for line in err.splitlines() if "rror" in line]) == 1
    assert "[CreditSync] Error running credit sync task:" in read(log_file)


def test_an_unwritable_log_file_is_one_line(world, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("CREDITSYNC_LOG_FILE", str(blocker / "server.log"))
    code, out, err = run_cli(capsys, "check")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == [err.strip()] and "CREDITSYNC_LOG_FILE: cannot open" in err


def _serve(db_url: str, sim_url: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CREDITSYNC_", "BILLING_"))}
    env.update(DATABASE_URL=db_url, BILLING_API_URL=sim_url, BILLING_API_TOKEN=TOKEN,
               CREDITSYNC_APP_SECRET=APP_SECRET, CREDITSYNC_WEBHOOK_SECRET=WEBHOOK_SECRET,
               CREDITSYNC_LOG_FILE=str(log_path))
    proc = subprocess.Popen([sys.executable, "-m", "creditsync_pipeline.cli", "serve", "--port", "0"],
                            env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = proc.stderr.readline()
        found = re.search(r"listening on (http://[^ ]+)", line)
        if found:
            return proc, found.group(1)
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError("creditsync serve did not start")


def test_serve_and_a_cli_write_the_same_file(world, db_url, sim, log_file, capsys):
    proc, base = _serve(db_url, sim.base_url, log_file)
    try:
        body = json.dumps({"event_id": "evt-log-1", "type": "subscription.updated", "instance_id": "abc123"}).encode()
        hook = httpx.post(f"{base}/api/billing/webhook", content=body,
                          headers={"X-Creditsync-Signature": sign_webhook(WEBHOOK_SECRET, body),
                                   "Content-Type": "application/json"}, timeout=30)
        assert hook.status_code == 200, hook.text
        other = next(i for i in world.expected if i != "abc123" and world.expected[i] != ("free", 100))
        token = sign_instance_token(APP_SECRET, other)
        button = httpx.post(f"{base}/api/billing/sync-credits", headers={"Authorization": f"Bearer {token}"},
                            timeout=30)
        assert button.status_code == 200, button.text
        code, _, err = run_cli(capsys, "check")  # a second process on the same file meanwhile
        assert code in (0, 1), err
        text = wait_for(log_file, "[CreditSync] Billing webhook event subscription.updated for instance abc123",
                        "Synced credits for instance abc123: 100 → 5000", f"Synced credits for instance {other}:")
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    assert "[CreditSync] Billing webhook event subscription.updated for instance abc123" in text
    assert "Synced credits for instance abc123: 100 → 5000" in text
    assert f"Synced credits for instance {other}:" in text
    assert "[CreditSync] Dry run:" in text  # the CLI's check, in the same file
    assert token not in text
    pids = {line.split()[2] for line in text.splitlines() if "CreditSync" in line}
    assert len(pids) >= 2, "expected lines from two processes"


def test_dagster_runs_write_the_file_via_dagster_yaml(world, db_url, sim, log_file, tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    write_dagster_home(home)  # the project's dagster.yaml, as the demo and operators use it
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    resources = {
        "app_db": AppDatabaseResource(database_url=db_url),
        "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN),
    }
    with DagsterInstance.get() as instance:
        result = materialize([*credit_sync_assets, *credit_sync_checks], resources=resources, instance=instance,
                             tags={"creditsync/trigger": "periodic"})
        assert result.success
        text = read(log_file)
        assert "Synced credits for instance abc123: 100 → 5000" in text
        assert "Updating instance plan abc123: free → pro" in text
        assert "[CreditSync] Successfully synced credits for 15 instance(s)" in text
        assert result.run_id in text  # Dagster's prefix: job - run id - step - message

        reverted = revert_credit_sync_run.execute_in_process(
            run_config={"ops": {"revert_run": {"config": {"run_id": result.run_id}}}},
            resources={"app_db": resources["app_db"]}, instance=instance,
        )
        assert reverted.success
        text = read(log_file)
        assert f"[CreditSync] Reverted 15 instance(s) of run {result.run_id}" in text
        assert "Updating instance plan abc123: pro → free" in text


def test_without_the_variable_nothing_is_written(world, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CREDITSYNC_LOG_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    code, _, _ = run_cli(capsys, "check")
    assert code == 1
    assert not [h for h in logging.getLogger("creditsync").handlers if "Rotating" in type(h).__name__]
    assert list(tmp_path.glob("*.log")) == []


def test_a_secret_that_reaches_a_message_is_masked_in_the_file(log_file, monkeypatch):
    password = "pw-SECRET-logfile-8d1e"
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg2://app:{password}@db.example.com/app")
    monkeypatch.setenv("STRIPE_API_KEY", "sk_test_SECRET_logfile_77")
    logs.attach_log_file()
    log = logging.getLogger("creditsync.test")
    log.error("[CreditSync] a careless line: %s %s %s", password, APP_SECRET, "sk_test_SECRET_logfile_77")
    text = read(log_file)
    assert "[CreditSync] a careless line: *** *** ***" in text
    assert password not in text and "sk_test_SECRET_logfile_77" not in text
