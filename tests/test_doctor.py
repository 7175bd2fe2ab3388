"""``creditsync doctor`` end to end: the real CLI, the simulator over HTTP, a real Dagster instance.

Each FAIL path is provoked for real (a database that is down, an empty database, no
free plan, a wrong billing token, no DAGSTER_HOME, no daemon, a stopped schedule, no
or an old full sync, webhook rows waiting or given up), and the all-ok path after a
real full sync. Every run is made with real secrets set; none may appear in the output.
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from dagster import DagsterInstance, materialize

from creditsync_pipeline import appdb, doctor, settings
from creditsync_pipeline.defs.assets import credit_sync_assets
from creditsync_pipeline.defs.checks import credit_sync_checks
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource

from .helpers import TOKEN
from .test_cli_e2e import run_cli, sim, world  # noqa: F401 - fixtures

APP_SECRET = "app-SECRET-doctor-5c2e"
WEBHOOK_SECRET = "whsec-SECRET-doctor-9b1f"
DB_PASSWORD = "pw-SECRET-doctor-31aa"
SECRETS = (TOKEN, APP_SECRET, WEBHOOK_SECRET, DB_PASSWORD)


@pytest.fixture
def home(tmp_path, monkeypatch):
    path = tmp_path / "dagster_home"
    path.mkdir()
    (path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(path))
    monkeypatch.setenv("CREDITSYNC_APP_SECRET", APP_SECRET)
    monkeypatch.setenv("CREDITSYNC_WEBHOOK_SECRET", WEBHOOK_SECRET)
    return path


def beat(instance: DagsterInstance, age: float = 0.0) -> None:
    from dagster._daemon.types import DaemonHeartbeat

    for daemon_type in instance.get_required_daemon_types():
        instance.add_daemon_heartbeat(DaemonHeartbeat(time.time() - age, daemon_type, "test-daemon", None))


def full_sync(instance: DagsterInstance, db_url: str, sim) -> None:
    resources = {
        "app_db": AppDatabaseResource(database_url=db_url),
        "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN),
    }
    materialize([*credit_sync_assets, *credit_sync_checks], resources=resources, instance=instance,
                tags={"creditsync/trigger": "periodic"})


def doctor_json(capsys) -> tuple[int, dict[str, dict]]:
    code, out, err = run_cli(capsys, "doctor", "--json")
    for secret in SECRETS:
        assert secret not in out and secret not in err, "a secret leaked into doctor's output"
    doc = json.loads(out)
    return code, {c["name"]: c for c in doc["checks"]}


def failing(checks: dict[str, dict]) -> set[str]:
    return {name for name, c in checks.items() if not c["ok"]}


@pytest.fixture
def healthy(world, db_url, sim, home):
    """Everything an operator depends on, working: a full sync done, the daemon beating."""
    with DagsterInstance.get() as instance:
        full_sync(instance, db_url, sim)
        beat(instance)
    return world


def test_all_ok_after_a_full_sync_with_the_daemon_running(healthy, capsys):
    code, out, err = run_cli(capsys, "doctor")
    assert code == 0, out + err
    lines = out.splitlines()
    assert len(lines) == len(doctor.CHECKS) + 1 and all(line.startswith("ok ") for line in lines[:-1])
    assert lines[-1] == f"{len(doctor.CHECKS)} ok, 0 FAIL"
    for secret in SECRETS:
        assert secret not in out + err
    code, checks = doctor_json(capsys)
    assert code == 0 and failing(checks) == set()


def test_database_down_fails_without_showing_its_password(healthy, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"postgresql+psycopg2://creditsync:{DB_PASSWORD}@127.0.0.1:9/app")
    code, checks = doctor_json(capsys)
    assert code == 1
    assert {"database", "schema", "free plan", "webhook rows"} <= failing(checks)
    assert "***" in checks["database"]["detail"]
    code, out, _ = run_cli(capsys, "doctor")
    assert code == 1 and any(line.startswith("FAIL database") for line in out.splitlines())


def test_no_database_url_fails(healthy, monkeypatch, capsys):
    monkeypatch.delenv("DATABASE_URL")
    code, checks = doctor_json(capsys)
    assert code == 1 and checks["database"]["detail"] == "DATABASE_URL is not set"


def test_missing_schema_says_init_db(healthy, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", f"sqlite:///{tmp_path / 'empty.db'}")
    code, checks = doctor_json(capsys)
    assert code == 1 and checks["schema"]["what_to_do"] == "run `creditsync init-db`"
    assert checks["database"]["ok"]


def test_no_free_plan_fails(healthy, db_url, capsys):
    # (the shipped DDL's unique index already refuses a second free plan)
    engine = appdb.create_engine_from_url(db_url)
    with engine.begin() as conn:
        conn.execute(sa.update(appdb.schema.plans).values(is_free=False))
    engine.dispose()
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"free plan"}
    assert checks["free plan"]["detail"] == "0 plan(s) with is_free (none); exactly one is required"


def test_billing_token_refused_and_billing_down(healthy, sim, monkeypatch, capsys):
    monkeypatch.setenv("BILLING_API_TOKEN", "tok-SECRET-wrong-0000")
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"billing"}
    assert "tok-SECRET-wrong-0000" not in json.dumps(checks)
    monkeypatch.setenv("BILLING_API_TOKEN", TOKEN)
    monkeypatch.setenv("BILLING_API_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("BILLING_API_MAX_ATTEMPTS", "1")
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"billing"}


def test_no_dagster_home_fails_the_dagster_checks(healthy, monkeypatch, capsys):
    monkeypatch.delenv("DAGSTER_HOME")
    code, checks = doctor_json(capsys)
    assert code == 1
    assert failing(checks) == {"DAGSTER_HOME", "daemon", "schedule and sensors", "last full sync"}


def test_daemon_not_beating_fails(world, db_url, sim, home, capsys):
    with DagsterInstance.get() as instance:
        full_sync(instance, db_url, sim)
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"daemon"}
    with DagsterInstance.get() as instance:
        beat(instance, age=3600)
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"daemon"}


def test_a_stopped_schedule_fails(healthy, capsys):
    from dagster._core.remote_origin import (
        InProcessCodeLocationOrigin,
        RemoteInstigatorOrigin,
        RemoteRepositoryOrigin,
    )
    from dagster._core.scheduler.instigation import (
        InstigatorState,
        InstigatorStatus,
        InstigatorType,
        ScheduleInstigatorData,
    )
    from dagster._core.types.loadable_target_origin import LoadableTargetOrigin

    location = InProcessCodeLocationOrigin(
        LoadableTargetOrigin(module_name="creditsync_pipeline.definitions", attribute="defs"))
    origin = RemoteInstigatorOrigin(RemoteRepositoryOrigin(location, "__repository__"), "credit_sync_every_6_hours")
    with DagsterInstance.get() as instance:
        instance.add_instigator_state(InstigatorState(origin, InstigatorType.SCHEDULE, InstigatorStatus.STOPPED,
                                                     ScheduleInstigatorData("0 */6 * * *")))
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"schedule and sensors"}
    assert checks["schedule and sensors"]["detail"] == "credit_sync_every_6_hours stopped"


def test_no_full_sync_and_an_old_one_fail(world, db_url, sim, home, capsys):
    with DagsterInstance.get() as instance:
        beat(instance)
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"last full sync"}
    assert checks["last full sync"]["detail"] == "no successful full sync recorded"
    with DagsterInstance.get() as instance:
        full_sync(instance, db_url, sim)
        ctx = doctor.Context(cfg=settings.from_env(), env={}, now=datetime.now(timezone.utc) + timedelta(hours=8),
                             instance=instance)
        old = doctor.check_last_full_sync(ctx)
    assert not old.ok and "more than 7 h" in old.detail


def test_webhook_rows_waiting_and_given_up_fail(healthy, db_url, capsys):
    events = appdb.schema.billing_webhook_events
    long_ago = datetime.now(timezone.utc) - timedelta(hours=1)
    engine = appdb.create_engine_from_url(db_url)
    with engine.begin() as conn:
        conn.execute(sa.insert(events).values(event_id="evt-old", instance_id="abc123", event_type="x",
                                              received_at=long_ago))
    code, checks = doctor_json(capsys)
    assert code == 1 and failing(checks) == {"webhook rows"}
    assert checks["webhook rows"]["detail"] == "1 unprocessed for more than 15 min"
    with engine.begin() as conn:
        conn.execute(sa.insert(events).values(event_id="evt-failed", instance_id="abc123", event_type="x",
                                              outcome="failed", attempts=8))
    engine.dispose()
    code, checks = doctor_json(capsys)
    assert checks["webhook rows"]["detail"] == "1 unprocessed for more than 15 min; 1 given up after repeated failures"


def test_doctor_cannot_run_with_unusable_settings(home, monkeypatch, capsys):
    monkeypatch.setenv("BILLING_PROVIDER", "nope")
    code, out, err = run_cli(capsys, "doctor")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1
