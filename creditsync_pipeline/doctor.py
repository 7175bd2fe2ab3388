"""``creditsync doctor``: check each part an operator depends on, one line each.

Every check is a small function returning a :class:`Check` (name, ok, detail,
what_to_do); a FAIL's ``what_to_do`` matches a row of the troubleshooting table in
``docs/operations.md``. No check prints a secret: details name settings, hosts and
counts, never values (database URLs are shown with the password masked), and the
whole output is masked once more against every secret set in the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from . import appdb, settings, sync
from .billing import BillingError
from .logs import env_secrets

#: SPEC: the last successful full sync must be younger than this
FULL_SYNC_MAX_AGE = timedelta(hours=7)
#: a daemon heartbeat older than this means the daemon is not running
HEARTBEAT_MAX_AGE = timedelta(minutes=5)
#: an unprocessed webhook row older than this is waiting too long (the sensor runs every ~5 s)
WEBHOOK_MAX_WAIT = timedelta(minutes=15)
SCHEDULE_NAME = "credit_sync_every_6_hours"
SENSOR_NAMES = ("billing_webhook_sensor", "new_instance_sensor")
FULL_SYNC_ASSET = "credit_corrections"
FULL_SYNC_JOB = "credit_sync_job"


@dataclass(frozen=True)
class Check:
    """One line of the doctor's report."""

    name: str
    ok: bool
    detail: str
    what_to_do: str = ""


@dataclass
class Context:
    """What the checks share: the settings, the app database once reached, the Dagster instance."""

    cfg: settings.Settings
    env: Mapping[str, str]
    now: datetime
    engine: Engine | None = None
    schema_ok: bool = False
    instance: Any = None


def ok(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def fail(name: str, detail: str, what_to_do: str) -> Check:
    return Check(name, False, detail, what_to_do)


# --- the app database ----------------------------------------------------------------


def check_database(ctx: Context) -> Check:
    name = "database"
    if not ctx.cfg.database_url:
        return fail(name, "DATABASE_URL is not set", "set DATABASE_URL to the app database's SQLAlchemy URL")
    label = appdb.redact_url(ctx.cfg.database_url)
    try:
        engine = appdb.create_engine_from_url(ctx.cfg.database_url)
        appdb.ping(engine)
    except appdb.AppDatabaseError as exc:
        return fail(name, sync.one_line(exc), "check DATABASE_URL, that the server is up and the login works")
    ctx.engine = engine
    return ok(name, f"reachable ({label})")


def check_schema(ctx: Context) -> Check:
    name = "schema"
    if ctx.engine is None:
        return fail(name, "not checked: the database is not reachable", "fix the database check first")
    try:
        missing = appdb.missing_tables(ctx.engine)
    except appdb.AppDatabaseError as exc:
        return fail(name, sync.one_line(exc), "check the login's privileges on the app database")
    if missing:
        return fail(name, f"missing table(s): {', '.join(missing)}", "run `creditsync init-db`")
    ctx.schema_ok = True
    return ok(name, "every creditsync table is there")


def check_free_plan(ctx: Context) -> Check:
    name = "free plan"
    if not ctx.schema_ok or ctx.engine is None:
        return fail(name, "not checked: the schema is not applied", "fix the schema check first")
    try:
        free = appdb.free_plan_ids(ctx.engine)
    except appdb.AppDatabaseError as exc:
        return fail(name, sync.one_line(exc), "check the login's privileges on the app database")
    if len(free) != 1:
        shown = ", ".join(free[:5]) or "none"
        return fail(name, f"{len(free)} plan(s) with is_free ({shown}); exactly one is required",
                    "mark exactly one row of plans with is_free")
    return ok(name, f"exactly one: {free[0]}")


def check_billing(ctx: Context) -> Check:
    name = "billing"
    sample: list[str] = []
    if ctx.engine is not None and ctx.schema_ok:
        try:
            sample = appdb.some_instance_ids(ctx.engine)
        except appdb.AppDatabaseError:
            sample = []
    try:
        with sync.open_billing(ctx.cfg, ctx.engine, remember_links=False) as billing:
            detail = billing.check_access(sample)
    except (BillingError, settings.SettingsError) as exc:
        return fail(name, sync.one_line(exc),
                    f"check BILLING_PROVIDER ({ctx.cfg.billing_provider}), the provider's URL and its token or key")
    return ok(name, detail)


def check_webhook_rows(ctx: Context) -> Check:
    name = "webhook rows"
    if not ctx.schema_ok or ctx.engine is None:
        return fail(name, "not checked: the schema is not applied", "fix the schema check first")
    try:
        backlog = appdb.webhook_backlog(ctx.engine, now=ctx.now, older_than=WEBHOOK_MAX_WAIT)
    except appdb.AppDatabaseError as exc:
        return fail(name, sync.one_line(exc), "check the login's privileges on the app database")
    problems = []
    if backlog.waiting:
        minutes = WEBHOOK_MAX_WAIT.total_seconds() / 60
        problems.append(f"{backlog.waiting} unprocessed for more than {minutes:.0f} min")
    if backlog.given_up:
        problems.append(f"{backlog.given_up} given up after repeated failures")
    if problems:
        return fail(name, "; ".join(problems),
                    "see billing_webhook_sensor's ticks; given-up rows: fix the cause, then set attempts = 0")
    return ok(name, "none waiting, none given up")


# --- Dagster ---------------------------------------------------------------------------


def check_dagster_home(ctx: Context) -> Check:
    name = "DAGSTER_HOME"
    home = (ctx.env.get("DAGSTER_HOME") or "").strip()
    if not home:
        return fail(name, "DAGSTER_HOME is not set", "set DAGSTER_HOME to the directory holding dagster.yaml")
    if not Path(home).is_dir():
        return fail(name, f"{home} is not a directory", "create it and copy dagster.yaml into it")
    try:
        from dagster import DagsterInstance

        ctx.instance = DagsterInstance.get()
    except Exception as exc:  # noqa: BLE001 - any failure to open the instance is this FAIL
        return fail(name, f"Dagster's instance cannot be opened: {sync.one_line(exc)}",
                    "check $DAGSTER_HOME/dagster.yaml and the DAGSTER_PG_* settings")
    return ok(name, home)


def check_daemon(ctx: Context) -> Check:
    name = "daemon"
    if ctx.instance is None:
        return fail(name, "not checked: no Dagster instance", "fix the DAGSTER_HOME check first")
    beats = ctx.instance.get_daemon_heartbeats()
    required = list(ctx.instance.get_required_daemon_types())
    limit = ctx.now.timestamp() - HEARTBEAT_MAX_AGE.total_seconds()
    stale = [t for t in required if t not in beats or beats[t].timestamp < limit]
    if stale:
        return fail(name, f"no heartbeat in {HEARTBEAT_MAX_AGE.total_seconds() / 60:.0f} min from: {', '.join(stale)}",
                    "start `dagster-daemon run` (with the same DAGSTER_HOME)")
    return ok(name, f"heartbeats recent ({len(required)} daemon(s))")


def _instigator_states(instance: Any) -> dict[str, str]:
    """Stored status per schedule/sensor name (absent: never toggled, the code's default holds)."""
    states: dict[str, str] = {}
    for state in instance.all_instigator_state():
        states[state.name] = state.status.value
    return states


def _defaults_in_code() -> dict[str, str]:
    from dagster import DefaultScheduleStatus, DefaultSensorStatus

    from .definitions import defs

    out: dict[str, str] = {}
    for schedule in defs.schedules or []:
        out[schedule.name] = "RUNNING" if schedule.default_status == DefaultScheduleStatus.RUNNING else "STOPPED"
    for sensor in defs.sensors or []:
        out[sensor.name] = "RUNNING" if sensor.default_status == DefaultSensorStatus.RUNNING else "STOPPED"
    return out


def check_instigators(ctx: Context) -> Check:
    name = "schedule and sensors"
    if ctx.instance is None:
        return fail(name, "not checked: no Dagster instance", "fix the DAGSTER_HOME check first")
    stored = _instigator_states(ctx.instance)
    defaults = _defaults_in_code()
    stopped = []
    for instigator in (SCHEDULE_NAME, *SENSOR_NAMES):
        status = stored.get(instigator)
        if status in (None, "DECLARED_IN_CODE"):
            status = defaults.get(instigator, "MISSING")
        if status != "RUNNING":
            stopped.append(f"{instigator} {status.lower()}")
    if stopped:
        return fail(name, ", ".join(stopped),
                    "start them in the Dagster UI (Automation) or `dagster schedule start` / `dagster sensor start`")
    return ok(name, f"{SCHEDULE_NAME}, {', '.join(SENSOR_NAMES)} running")


def _last_full_sync(instance: Any) -> float | None:
    from dagster import AssetKey, DagsterRunStatus, RunsFilter

    times: list[float] = []
    materialized = instance.fetch_materializations(AssetKey(FULL_SYNC_ASSET), limit=1)
    if materialized.records:
        times.append(materialized.records[0].timestamp)
    runs = instance.get_run_records(
        filters=RunsFilter(job_name=FULL_SYNC_JOB, statuses=[DagsterRunStatus.SUCCESS]), limit=1
    )
    if runs and runs[0].end_time:
        times.append(runs[0].end_time)
    return max(times) if times else None


def check_last_full_sync(ctx: Context) -> Check:
    name = "last full sync"
    if ctx.instance is None:
        return fail(name, "not checked: no Dagster instance", "fix the DAGSTER_HOME check first")
    last = _last_full_sync(ctx.instance)
    hours = FULL_SYNC_MAX_AGE.total_seconds() / 3600
    if last is None:
        return fail(name, "no successful full sync recorded",
                    f"launch {FULL_SYNC_JOB} and check its run; the schedule runs it every 6 hours")
    age = ctx.now.timestamp() - last
    when = datetime.fromtimestamp(last, timezone.utc).isoformat(timespec="seconds")
    if age > FULL_SYNC_MAX_AGE.total_seconds():
        return fail(name, f"last success {age / 3600:.1f} h ago ({when}), more than {hours:.0f} h",
                    f"look at the failed {FULL_SYNC_JOB} runs and the schedule's ticks; launch it again")
    return ok(name, f"{age / 3600:.1f} h ago ({when})")


CHECKS: tuple[Callable[[Context], Check], ...] = (
    check_database,
    check_schema,
    check_free_plan,
    check_billing,
    check_dagster_home,
    check_daemon,
    check_instigators,
    check_last_full_sync,
    check_webhook_rows,
)


def run_checks(cfg: settings.Settings, env: Mapping[str, str] | None = None,
               now: datetime | None = None) -> list[Check]:
    """Every check in order; a check that raises unexpectedly is a FAIL, not a crash."""
    ctx = Context(cfg=cfg, env=dict(os.environ if env is None else env), now=now or datetime.now(timezone.utc))
    results: list[Check] = []
    secrets = [*cfg.secrets(), *env_secrets(ctx.env)]
    try:
        for check in CHECKS:
            try:
                result = check(ctx)
            except Exception as exc:  # noqa: BLE001 - reported as this check's FAIL
                name = check.__name__.removeprefix("check_").replace("_", " ")
                result = fail(name, f"the check itself failed: {type(exc).__name__}: {sync.one_line(exc)}",
                              "run with CREDITSYNC_DEBUG=1 and report it")
            results.append(_masked(result, secrets))
    finally:
        if ctx.engine is not None:
            ctx.engine.dispose()
        if ctx.instance is not None:
            ctx.instance.dispose()
    return results


def _masked(check: Check, secrets: list[str]) -> Check:
    values = asdict(check)
    for key in ("detail", "what_to_do"):
        text = values[key]
        for secret in sorted(secrets, key=len, reverse=True):
            text = text.replace(secret, "***")
        values[key] = text
    return Check(**values)
