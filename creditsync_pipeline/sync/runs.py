"""Whole runs: a full or targeted reconciliation, stage by stage, timed."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
import logging
import time

from sqlalchemy.engine import Engine

from .. import appdb
from ..billing import BillingProvider, BillingSnapshot
from .model import AppState, Log, SyncOptions, SyncReport, new_run_id, utcnow
from .report import build_report, log_outcome, one_line, reporting_errors
from .stages import apply, decide, fetch_billing, fetch_billing_for, read_state, verify

logger = logging.getLogger("creditsync")


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def stage(self, name: str) -> "_Stage":
        return _Stage(self, name)


class _Stage:
    def __init__(self, timer: _Timer, name: str) -> None:
        self.timer, self.name = timer, name

    def __enter__(self) -> None:
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.timer.timings[self.name] = time.perf_counter() - self.t0


# --- whole runs --------------------------------------------------------------


def _gather(
    engine: Engine, billing: BillingProvider, instance_ids: list[str] | None, timer: _Timer
) -> tuple[BillingSnapshot, AppState]:
    """Billing's side and the app's side of one run (timed as ``fetch`` and ``read``)."""
    plans = appdb.load_plans(engine)
    plan_ids = [str(p) for p in plans["plan_id"]]
    if instance_ids is not None:
        with timer.stage("fetch"):
            snapshot = fetch_billing_for(billing, instance_ids, plan_ids=plan_ids)
        with timer.stage("read"):
            state = read_state(engine, instance_ids, plans=plans)
        return snapshot, state
    if not billing.lists_all:  # every instance is looked up: the rows first
        with timer.stage("read"):
            state = read_state(engine, plans=plans)
        with timer.stage("fetch"):
            snapshot = fetch_billing(billing, engine, state=state)
        return snapshot, state
    if not appdb.shares_data_across_connections(engine):  # in-memory SQLite: one connection
        with timer.stage("fetch"):
            snapshot = fetch_billing(billing, engine, plans=plans)
        with timer.stage("read"):
            state = read_state(engine, plans=plans)
        return snapshot, state
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="creditsync-read") as pool:
        # The read waits on the database while the fetch waits on billing; the
        # "read" stage is then only the part of it the fetch did not hide.
        reading = pool.submit(read_state, engine, plans=plans)
        with timer.stage("fetch"):
            try:
                snapshot = fetch_billing(billing, engine, plans=plans)
            except BaseException:
                reading.cancel()
                raise
        with timer.stage("read"):
            state = reading.result()
    return snapshot, state


def _run(
    engine: Engine,
    billing: BillingProvider,
    instance_ids: list[str] | None,
    *,
    trigger: str,
    run_id: str | None,
    options: SyncOptions,
    log: Log | None,
    clock: Callable[[], datetime],
) -> SyncReport:
    log = log or logger
    run_id = run_id or new_run_id()
    timer = _Timer()
    started = time.perf_counter()
    log.info("[CreditSync] Running credit sync task...")
    with reporting_errors(log):
        snapshot, state = _gather(engine, billing, instance_ids, timer)
        with timer.stage("diff"):
            decision = decide(snapshot, state, options=options, now=clock())
        with timer.stage("write"):
            result = apply(engine, decision, run_id=run_id, trigger=trigger, options=options, now=clock())
        report = build_report(
            run_id=run_id, trigger=trigger, options=options, snapshot=snapshot,
            state=state, decision=decision, result=result,
        )
    # What was committed is committed: from here on a failure is a warning on the report,
    # never a failed run (SPEC: a failure after the commit never turns a committed
    # correction into a reported failure).
    with timer.stage("verify"):
        try:
            report.remaining = verify(engine, snapshot, decision, now=clock())
        except Exception as exc:  # noqa: BLE001 - reported, the commit stands
            report.verified = False
            report.warnings.append(f"the check after the commit failed: {one_line(exc)}")
    report.timings = timer.timings
    report.timings["total"] = time.perf_counter() - started
    try:
        log_outcome(report, log, log_limit=options.log_limit)
    except Exception as exc:  # noqa: BLE001 - a log sink failing cannot undo the commit
        report.warnings.append(f"the operator log lines could not be written: {one_line(exc)}")
    for warning in report.warnings:
        try:
            log.warning("[CreditSync] Committed %d correction(s), but %s", report.applied_count, warning)
        except Exception:  # noqa: BLE001
            logger.warning("[CreditSync] Committed %d correction(s), but %s", report.applied_count, warning)
    return report


def run_full_sync(
    engine: Engine,
    billing: BillingProvider,
    *,
    trigger: str = "manual",
    run_id: str | None = None,
    options: SyncOptions = SyncOptions(),
    log: Log | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> SyncReport:
    """Reconcile every instance against everything billing says."""
    return _run(engine, billing, None, trigger=trigger, run_id=run_id, options=options, log=log, clock=clock)


def run_targeted_sync(
    engine: Engine,
    billing: BillingProvider,
    instance_ids: Iterable[str],
    *,
    trigger: str = "manual",
    run_id: str | None = None,
    options: SyncOptions = SyncOptions(),
    log: Log | None = None,
    clock: Callable[[], datetime] = utcnow,
) -> SyncReport:
    """Reconcile the named instances, each looked up on its own in billing."""
    if isinstance(instance_ids, str):
        raise TypeError("instance_ids must be an iterable of ids, not a single string")
    ids = list(dict.fromkeys(instance_ids))
    return _run(engine, billing, ids, trigger=trigger, run_id=run_id, options=options, log=log, clock=clock)
