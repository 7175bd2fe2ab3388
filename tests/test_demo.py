"""The README's demo command: with ``--no-ui`` (seed, serve billing, run the job) and whole.

The whole demo is run as a person runs it: its terminal must show the banner and then only
operator lines (the sensors' INFO lines, DEBUG events and warnings go to ``<demo>/logs/``),
and the banner's Sync credits page link must work.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import httpx
import pytest

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import STALE_INSTANCE, demo_dataset

from .helpers import NOW, end_state

#: what the demo prints for an operator line: "HH:MM:SS <source>  <the line from its marker on>"
OPERATOR_RE = re.compile(r"^\d\d:\d\d:\d\d \S+  (\[CreditSync\] |Synced credits |Updating instance plan )")
BANNER_END = "[demo] operator lines follow"
NOISE = ("SensorDaemon", "Checking for new runs", " DEBUG ", "- DEBUG -", "Warning", "Traceback", "STEP_")


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["generic", "wix", "stripe"])
def test_demo_no_ui_runs_the_first_reconciliation(tmp_path, provider):
    env = dict(os.environ, CREDITSYNC_DEMO_DIR=str(tmp_path / "demo"))
    proc = subprocess.run(
        [sys.executable, "-m", "creditsync_pipeline.cli", "demo", "--no-ui", "--provider", provider],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    terminal = proc.stdout + proc.stderr
    assert "[demo] the first full reconciliation succeeded" in terminal
    assert "Synced credits for instance abc123: 100 → 5000" in terminal
    assert "[CreditSync] Successfully synced credits for 15 instance(s)" in terminal
    assert not [line for line in terminal.splitlines() if any(n in line for n in NOISE)]
    logs = tmp_path / "demo" / "logs"
    assert "RUN_SUCCESS" in (logs / "first-run.log").read_text()  # the run's whole output is in the file
    db_url = f"sqlite:///{tmp_path / 'demo' / 'app.db'}"
    state = end_state(db_url)
    expected = demo_dataset(NOW).expected
    assert {i: state[i][:2] for i in expected} == expected
    engine = appdb.create_engine_from_url(db_url)
    try:
        assert len(appdb.read_audit(engine)) == 15
    finally:
        engine.dispose()
    # Dagster's own state went to SQLite under the demo's DAGSTER_HOME
    assert (tmp_path / "demo" / "dagster_home" / "history").is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sensor_ticks(log: Path) -> int:
    return log.read_text(errors="replace").count("Checking for new runs for sensor") if log.exists() else 0


@pytest.mark.slow
def test_the_whole_demo_shows_the_banner_then_operator_lines_and_its_page_link_works(tmp_path):
    root = tmp_path / "demo"
    env = dict(os.environ, CREDITSYNC_DEMO_DIR=str(root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.cli", "demo", "--port", str(_free_port())],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    terminal: list[str] = []

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            terminal.append(line.rstrip("\n"))
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    def until(predicate, what: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                line = ""
            assert line is not None, f"the demo exited before {what}:\n" + "\n".join(terminal[-40:])
            if predicate(line):
                return line
            assert time.monotonic() < deadline, f"no {what} within {timeout:g} s:\n" + "\n".join(terminal[-40:])

    try:
        until(lambda line: line.startswith(BANNER_END), "banner", 400)
        page_url = re.search(r"Sync credits page\s+(\S+)", "\n".join(terminal)).group(1)
        token = page_url.split("instance=", 1)[1]
        base = page_url.split("/billing", 1)[0]
        page = httpx.get(page_url, timeout=30)
        assert page.status_code == 200
        assert page.headers["referrer-policy"] == "no-referrer"
        fields = dict(re.findall(r'data-field="(\w+)">([^<]*)<', page.text))
        assert fields["instance_id"] == STALE_INSTANCE
        assert (fields["plan_id"], fields["credits_total"]) == ("pro", "5000")  # billing says team

        # The daemon's sensors tick meanwhile: their lines must land in the log file only.
        deadline = time.monotonic() + 120
        while _sensor_ticks(root / "logs" / "dagster.log") < 6:
            assert time.monotonic() < deadline, "the sensors never ticked"
            assert proc.poll() is None, "the demo exited"
            time.sleep(0.5)

        synced = httpx.post(f"{base}/api/billing/sync-credits", headers={"x-wix-instance": token}, timeout=60)
        assert synced.status_code == 200, synced.text
        assert synced.json()["new"] == {"plan_id": "team", "credits_total": 20000}
        until(lambda line: f"Synced credits for instance {STALE_INSTANCE}: 5000 → 20000" in line,
              "operator line for the button's sync", 60)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # Ctrl-C
        try:
            proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, "\n".join(terminal[-40:])

    end = next(i for i, line in enumerate(terminal) if line.startswith(BANNER_END))
    banner = "\n".join(terminal[:end])
    assert "Dagster UI" in banner and f"{root / 'logs'}/" in banner
    after = [line for line in terminal[end + 1:] if line.strip()]
    assert after, "no operator line after the banner"
    assert [line for line in after if not OPERATOR_RE.match(line)] == [], "non-operator lines after the banner"
    assert not [line for line in terminal if any(n in line for n in NOISE)]
    assert any("serve  Updating instance plan abc123: pro → team" in line for line in after)
    assert _sensor_ticks(root / "logs" / "dagster.log") >= 6  # the noise is there, not on the terminal
    state = end_state(f"sqlite:///{root / 'app.db'}")
    assert state[STALE_INSTANCE][:2] == ("team", 20000)


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["generic", "wix", "stripe"])
def test_the_lost_upgrade_is_what_each_providers_simulator_then_says(tmp_path, provider):
    """After the first fix, :func:`lose_an_upgrade` makes billing (of every demo provider) say team."""
    from creditsync_pipeline.demo import _BASE_SETTING, billing_side, lose_an_upgrade, seed_database
    from creditsync_pipeline.demo_console import Child, wait_until_up

    data = demo_dataset(NOW)
    db_url = f"sqlite:///{tmp_path / 'app.db'}"
    seed_database(db_url, data)
    sim_args, billing_env = billing_side(provider, data, tmp_path)
    port = _free_port()
    sim_url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DATABASE_URL": db_url, **billing_env, _BASE_SETTING[provider]: sim_url}
    sim = Child("simulator", [sys.executable, *sim_args, "--port", str(port)], env, tmp_path)
    try:
        wait_until_up(sim, f"{sim_url}/_sim/health", "the simulator", 30)

        def fix() -> None:
            done = subprocess.run([sys.executable, "-m", "creditsync_pipeline.cli", "fix", "--instance", STALE_INSTANCE],
                                  env=env, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]

        fix()
        assert end_state(db_url)[STALE_INSTANCE][:2] == ("pro", 5000)
        assert lose_an_upgrade(provider, data, sim_url, datetime.now(timezone.utc)) == STALE_INSTANCE
        fix()
        assert end_state(db_url)[STALE_INSTANCE][:2] == ("team", 20000)
    finally:
        sim.stop(signal.SIGTERM, grace=10)
