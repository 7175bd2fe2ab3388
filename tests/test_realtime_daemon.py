"""End to end: a real ``dagster-daemon`` runs the real-time nets.

A temporary DAGSTER_HOME (the repo's dagster.yaml without its PostgreSQL
storage: SQLite), the billing simulator over HTTP, a SQLite app database.
A plan changes in billing and a webhook row lands; an instance is
provisioned on the free plan after a purchase: the daemon's sensors must
launch targeted runs that correct both. Waits are bounded; the daemon (and
every process it started) is always stopped.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import demo_dataset, write_dagster_home
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, end_state

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
DEADLINE_SECONDS = 90.0


def iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


def daemon_command() -> list[str]:
    script = Path(sys.executable).with_name("dagster-daemon")
    if script.exists():
        return [str(script), "run", "-m", "creditsync_pipeline.definitions"]
    return [sys.executable, "-m", "dagster._daemon", "run", "-m", "creditsync_pipeline.definitions"]


def stop_process_group(proc: subprocess.Popen) -> None:
    """SIGTERM the daemon's process group (daemon, code server, runs), then SIGKILL."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group, if any
    except ProcessLookupError:
        pass
    if proc.poll() is None:
        proc.wait(timeout=10)


class Daemon:
    def __init__(self, tmp: Path, db_url: str, sim: BillingSimulator) -> None:
        self.home = tmp / "dagster_home"
        write_dagster_home(self.home)
        self.log_path = tmp / "daemon.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CREDITSYNC_"))}
        env.update(
            DAGSTER_HOME=str(self.home),
            DATABASE_URL=db_url,
            BILLING_API_URL=sim.base_url,
            BILLING_API_TOKEN=TOKEN,
            PYTHONUNBUFFERED="1",
        )
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            daemon_command(), env=env, cwd=REPO, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = 60) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])

    def wait_for(self, what: str, condition: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE_SECONDS
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"dagster-daemon exited ({self.proc.returncode}) before {what}:\n{self.tail()}")
            if condition():
                return
            time.sleep(0.25)
        pytest.fail(f"timed out after {DEADLINE_SECONDS:.0f} s waiting for {what}; daemon log:\n{self.tail()}")

    def stop(self) -> None:
        try:
            stop_process_group(self.proc)
        finally:
            self._log.close()


@pytest.fixture
def world(tmp_path, sqlite_url) -> Iterator[tuple]:
    now = datetime.now(timezone.utc)
    data = demo_dataset(now)
    engine = appdb.create_engine_from_url(sqlite_url)
    appdb.init_db(engine)
    appdb.upsert_plans(engine, data.plans)
    old = now - timedelta(days=2)  # not "new": the provisioning net leaves them to the full sync
    appdb.insert_instances(engine, [{**row, "created_at": old, "updated_at": old} for row in data.instances])
    with BillingSimulator(data.records, token=TOKEN) as sim:
        daemon = Daemon(tmp_path, sqlite_url, sim)
        try:
            yield data, sim, engine, daemon
        finally:
            daemon.stop()
            engine.dispose()


def test_daemon_corrects_a_webhook_poke_and_a_new_instance(world, sqlite_url):
    data, sim, engine, daemon = world
    now = datetime.now(timezone.utc)
    upgraded = next(r["instance_id"] for r in data.instances
                    if (r["plan_id"], r["credits_total"]) == ("pro", 5000) == data.expected.get(r["instance_id"]))
    assert end_state(sqlite_url)[upgraded][:2] == ("pro", 5000)

    # billing changes a plan, the app's handler lands the webhook (the payload is only a poke)
    sim.upsert({"instance_id": upgraded, "plan_id": "team", "status": "active",
                "current_period_end": iso(now + timedelta(days=30)), "updated_at": iso(now)})
    appdb.land_webhook_event(engine, event_id="evt_e2e_1", event_type="subscription.updated",
                             instance_id=upgraded, payload='{"plan_id": "free"}')
    appdb.land_webhook_event(engine, event_id="evt_e2e_junk", event_type="subscription.updated",
                             instance_id=None, payload="<html>not json")
    # a purchase raced provisioning: the instance row appears on the free plan
    sim.upsert({"instance_id": "fresh-e2e", "plan_id": "pro", "status": "active",
                "current_period_end": iso(now + timedelta(days=30)), "updated_at": iso(now)})
    appdb.insert_instances(engine, [{"instance_id": "fresh-e2e", "plan_id": "free", "credits_total": 100}])

    daemon.wait_for("the webhook poke to be corrected",
                    lambda: end_state(sqlite_url)[upgraded][:2] == ("team", 20000))
    daemon.wait_for("the new instance to be corrected",
                    lambda: end_state(sqlite_url)["fresh-e2e"][:2] == ("pro", 5000))

    def rows() -> dict[str, dict]:
        t = appdb.billing_webhook_events
        with engine.connect() as conn:
            return {r.event_id: dict(r._mapping) for r in conn.execute(sa.select(t))}

    daemon.wait_for("the webhook rows to be processed",
                    lambda: all(r["processed_at"] is not None for r in rows().values()))
    settled = rows()
    assert settled["evt_e2e_1"]["outcome"] == "corrected"
    assert settled["evt_e2e_junk"]["outcome"] == "unreadable"

    audit = audit_rows(sqlite_url)
    by_instance = {row.instance_id: row for row in audit.itertuples(index=False)}
    assert set(by_instance) == {upgraded, "fresh-e2e"}
    assert by_instance[upgraded].trigger == "webhook"
    assert (by_instance[upgraded].old_plan_id, by_instance[upgraded].new_plan_id) == ("pro", "team")
    assert by_instance["fresh-e2e"].trigger == "provisioning"
    # processed_at only after the correction committed
    assert settled["evt_e2e_1"]["processed_at"] >= by_instance[upgraded].applied_at.to_pydatetime()
    # credits_used untouched by the nets
    used = {r["instance_id"]: r["credits_used"] for r in data.instances}
    assert end_state(sqlite_url)[upgraded][2] == used[upgraded]

    # the runs, as Dagster recorded them: targeted, tagged with their net, all successful
    from dagster import DagsterInstance, DagsterRunStatus
    from dagster._core.instance.ref import InstanceRef

    with DagsterInstance.from_ref(InstanceRef.from_dir(str(daemon.home))) as instance:
        # a run commits its work before it reports success: let every run finish before stopping
        daemon.wait_for("every run to finish", lambda: all(r.is_finished for r in instance.get_runs()))
        daemon.stop()
        runs = instance.get_runs()
        assert runs, "the daemon launched no run"
        assert {r.job_name for r in runs} == {"instance_credit_sync_job"}
        failed = {r.run_id: r for r in runs if r.status != DagsterRunStatus.SUCCESS}
        assert not failed, "\n".join(
            f"{run_id} {run.status} {run.tags.get('creditsync/trigger')}: "
            + " | ".join(e.message for e in instance.all_logs(run_id) if e.level >= 40)
            for run_id, run in failed.items()
        )
        assert {r.tags["creditsync/trigger"] for r in runs} == {"webhook", "provisioning"}
        assert all(r.tags["creditsync/sync"] == "targeted" for r in runs)
        run_ids = {r.run_id for r in runs}
    assert set(audit["run_id"]) <= run_ids

    # the billing token appears nowhere: not in Dagster's storage, the run logs, or the daemon's output
    needle = TOKEN.encode()
    leaks = [p for p in daemon.home.rglob("*") if p.is_file() and needle in p.read_bytes()]
    assert not leaks, f"billing token found in {leaks}"
    assert needle not in daemon.log_path.read_bytes()
