"""The sync service: a full or targeted reconciliation, and its report.

Every entry point (Dagster assets, sensors' jobs, the CLI, the HTTP app)
calls these functions; none of them re-implements a step. A run is five
stages, each also callable on its own (the Dagster assets call them one per
asset):

1. :func:`fetch_billing` / :func:`fetch_billing_for` — billing records;
2. :func:`read_state` — plans and instance rows (a full run reads them while
   the billing pages arrive; either order is safe: a row changed after the read
   fails the compare-and-set, a row changed before it is newer than the billing
   data and is skipped as stale);
3. :func:`decide` — the pure rules and guard rails;
4. :func:`apply` — bulk compare-and-set writes with audit rows, one transaction;
5. :func:`verify` — re-read the touched rows: what is still wrong.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

import numpy as np
import pandas as pd
from sqlalchemy.engine import Engine

from . import appdb, rules, settings
from .ids import log_safe
from .billing import BillingProvider, BillingSnapshot, provider_from_settings
from .billing.base import UNRESOLVED_COLUMNS, empty_unresolved
from .rules import CORRECTION_COLUMNS, KINDS, MISMATCH_COLUMNS, Decision, Guardrails, Scope

logger = logging.getLogger("creditsync")

TRIGGERS = ("periodic", "manual", "webhook", "provisioning")
#: left-alone instances listed one by one in a report's summary (all of them are in ``unresolved``)
UNRESOLVED_LISTED = 100


class Log(Protocol):
    """What the service needs of a logger (stdlib logging or Dagster's)."""

    def info(self, msg: str, *args: Any) -> Any: ...
    def warning(self, msg: str, *args: Any) -> Any: ...
    def error(self, msg: str, *args: Any) -> Any: ...


@dataclass(frozen=True)
class SyncOptions:
    """Knobs of one run."""

    dry_run: bool = False
    force: bool = False
    max_change_ratio: float = 0.10
    max_paid_downgrade_ratio: float = 0.10
    #: per-instance "Synced credits for instance ..." lines before summarising
    log_limit: int = 1000

    @property
    def guardrails(self) -> Guardrails:
        return Guardrails(
            max_change_ratio=self.max_change_ratio,
            max_paid_downgrade_ratio=self.max_paid_downgrade_ratio,
            force=self.force,
        )

    @classmethod
    def from_settings(cls, cfg: settings.Settings, **overrides: Any) -> SyncOptions:
        """The guard-rail settings of the environment (``CREDITSYNC_MAX_*``), plus ``overrides``."""
        values: dict[str, Any] = {
            "max_change_ratio": cfg.max_change_ratio,
            "max_paid_downgrade_ratio": cfg.max_paid_downgrade_ratio,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class AppState:
    """The app side of a run: plans, the rows in scope, the table size."""

    plans: pd.DataFrame
    instances: pd.DataFrame
    total_instances: int
    #: when the read of the rows began (a row with neither updated_at nor created_at is
    #: only overwritten by billing data observed after it)
    read_started_at: datetime | None = None


@dataclass
class SyncReport:
    """What a run found and did; each entry point renders it its own way."""

    run_id: str
    trigger: str
    scope: Scope
    dry_run: bool
    forced: bool
    total_instances: int = 0
    billing_records: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    mismatches: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(MISMATCH_COLUMNS))
    planned: int = 0
    applied: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(CORRECTION_COLUMNS))
    skipped_conflict: int = 0
    skipped_stale: int = 0
    refused: str | None = None
    #: the guard rails' figures (``rules.GuardReport.as_dict``): the rule that refused, if any
    guard: dict[str, Any] | None = None
    #: False when the check after the commit could not run (``remaining`` is then unknown)
    verified: bool = True
    remaining: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(CORRECTION_COLUMNS))
    #: requested ids (targeted runs) that have no row in ``instances``
    unknown_instance_ids: list[str] = field(default_factory=list)
    #: instances billing could not answer for (``UNRESOLVED_COLUMNS``): left alone
    unresolved: pd.DataFrame = field(default_factory=empty_unresolved)
    #: billing records that belong to no instance (Stripe subscriptions without one)
    unassigned: int = 0
    #: per-instance look-ups made (providers without a list, targeted runs)
    lookups: int = 0
    provider: str = "generic"
    #: billing pages read (a list) and records that failed validation
    billing_pages: int = 0
    invalid_records: int = 0
    #: valid billing records per subscription status
    billing_status_counts: dict[str, int] = field(default_factory=dict)
    #: the plans table with the instances on each plan when the run read them
    #: (``plan_id``, ``credits``, ``is_free``, ``instances``)
    plans: list[dict[str, Any]] = field(default_factory=list)
    #: things that went wrong after the commit (the verify re-read, say): the run still
    #: reports what it committed
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mismatch_count(self) -> int:
        return int(len(self.mismatches))

    @property
    def applied_count(self) -> int:
        return int(len(self.applied))

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (no per-instance rows)."""
        return {
            "run_id": self.run_id,
            "trigger": self.trigger,
            "scope": self.scope,
            "dry_run": self.dry_run,
            "forced": self.forced,
            "total_instances": self.total_instances,
            "billing_records": self.billing_records,
            "mismatch_count": self.mismatch_count,
            "counts": dict(self.counts),
            "planned": self.planned,
            "applied": self.applied_count,
            "skipped_conflict": self.skipped_conflict,
            "skipped_stale": self.skipped_stale,
            "remaining": int(len(self.remaining)),
            "refused": self.refused,
            "guard": dict(self.guard) if self.guard else None,
            "verified": self.verified,
            "unknown_instance_ids": list(self.unknown_instance_ids),
            "provider": self.provider,
            "lookups": self.lookups,
            "unresolved": self.unresolved_counts(),
            "unresolved_instances": [
                {"instance_id": str(r.instance_id), "status": str(r.status), "reason": str(r.reason)}
                for r in self.unresolved.head(UNRESOLVED_LISTED).itertuples(index=False)
            ],
            "unassigned_records": self.unassigned,
            "warnings": list(self.warnings),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def unresolved_counts(self) -> dict[str, int]:
        """Left-alone instances per status (``unavailable``, ``error``, ``removed``, ``unlinked``)."""
        return {str(k): int(v) for k, v in self.unresolved["status"].value_counts().items()}


class DecisionTooOld(Exception):
    """A decision whose billing data is too old to write (SPEC: fresh decisions only)."""


class SyncRefused(Exception):
    """A guard rail refused the run; nothing was written."""

    def __init__(self, report: SyncReport) -> None:
        super().__init__(f"refused: {report.refused}")
        self.report = report


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    return uuid.uuid4().hex


class AppDbCustomerLinks:
    """A provider's remembered instance <-> customer links, kept in the app database."""

    def __init__(self, engine: Engine, provider: str, *, read_only: bool = False) -> None:
        self.engine = engine
        self.provider = provider
        #: a dry run reads the links but writes none
        self.read_only = read_only

    def customers_of(self, instance_ids: Iterable[str]) -> dict[str, str]:
        return appdb.customer_links_for(self.engine, self.provider, list(instance_ids))

    def instances_of(self, customer_ids: Iterable[str]) -> dict[str, list[str]]:
        return appdb.instances_for_customers(self.engine, self.provider, list(customer_ids))

    def remember(self, links: dict[str, str]) -> None:
        if links and not self.read_only:
            appdb.remember_customer_links(self.engine, self.provider, links)


def open_billing(
    cfg: settings.Settings, engine: Engine | None = None, *, interactive: bool = False, remember_links: bool = True
) -> BillingProvider:
    """The billing provider ``BILLING_PROVIDER`` selects, for every entry point.

    ``engine`` (the app database) keeps a provider's remembered customer links (read
    only unless ``remember_links``: a dry run writes nothing); ``interactive`` gives the
    provider the budget of a person waiting on a button.
    """
    links = (
        AppDbCustomerLinks(engine, cfg.billing_provider, read_only=not remember_links) if engine is not None else None
    )
    return provider_from_settings(cfg, interactive=interactive, links=links)


# --- the stages ------------------------------------------------------------


def fetch_billing(
    billing: BillingProvider, engine: Engine, *, plans: pd.DataFrame | None = None, state: AppState | None = None
) -> BillingSnapshot:
    """Every billing record; raises on an incomplete list.

    A provider without a list of its own (``lists_all`` False: Wix) looks up every
    instance of ``state`` (or of the app database, read now).
    """
    if plans is None:
        plans = state.plans if state is not None else appdb.load_plans(engine)
    plan_ids = [str(p) for p in plans["plan_id"]]
    if billing.lists_all:
        return billing.fetch_all(plan_ids=plan_ids)
    instances = state.instances if state is not None else appdb.read_instances(engine, ordered=False)
    return billing.fetch_all([str(i) for i in instances["instance_id"]], plan_ids=plan_ids)


def fetch_billing_for(
    billing: BillingProvider, instance_ids: Iterable[str], *, plan_ids: Iterable[str] = ()
) -> BillingSnapshot:
    """The records of the named instances, one look-up each."""
    return billing.fetch_instances(instance_ids, plan_ids=list(plan_ids))


def read_state(engine: Engine, instance_ids: Iterable[str] | None = None, *, plans: pd.DataFrame | None = None) -> AppState:
    """Plans and the instance rows in scope (all, or the named ones)."""
    plans = appdb.load_plans(engine) if plans is None else plans
    read_started_at = utcnow()
    # The rules order their output themselves: a full read skips the ORDER BY (a sort of the table).
    instances = appdb.read_instances(
        engine, None if instance_ids is None else list(instance_ids), ordered=instance_ids is not None
    )
    total = len(instances) if instance_ids is None else appdb.count_instances(engine)
    return AppState(plans=plans, instances=instances, total_instances=total, read_started_at=read_started_at)


def decide(
    snapshot: BillingSnapshot, state: AppState, *, options: SyncOptions, now: datetime | None = None
) -> Decision:
    """Apply the rules to one snapshot and one state."""
    scope: Scope = "full" if snapshot.requested_ids is None else "targeted"
    return rules.decide(
        plans=state.plans,
        instances=state.instances,
        records=snapshot.records,
        invalid=snapshot.invalid,
        absent_basis_at=snapshot.started_at,
        now=now or utcnow(),
        total_instances=state.total_instances,
        scope=scope,
        guardrails=options.guardrails,
        left_alone=left_alone(snapshot, state),
        read_started_at=state.read_started_at,
        fetched_at=snapshot.finished_at,
    )


def left_alone(snapshot: BillingSnapshot, state: AppState) -> list[str]:
    """Instances in scope that billing could not answer for (never written, reported).

    The unresolved look-ups, and -- for a provider that looks every instance up (Wix) --
    the rows that were not looked up (created after the look-ups began).
    """
    ids = [str(i) for i in snapshot.unresolved["instance_id"]]
    if snapshot.looked_up is not None:
        covered = snapshot.looked_up
        ids.extend(str(i) for i in state.instances["instance_id"] if i not in covered)
    return ids


def apply(
    engine: Engine,
    decision: Decision,
    *,
    run_id: str,
    trigger: str,
    options: SyncOptions,
    now: datetime | None = None,
) -> appdb.ApplyResult | None:
    """Write the decision's corrections (CAS + audit, one transaction).

    Returns ``None`` when nothing may be written: a dry run or a refusal. Raises
    :class:`DecisionTooOld` when the billing data behind the decision was fetched more than
    ``rules.MAX_DECISION_AGE`` ago (a re-executed old Dagster step, say): nothing is
    written and the run must be repeated.
    """
    if options.dry_run or decision.refusal is not None:
        return None
    now = now or utcnow()
    if decision.fetched_at is not None and now - decision.fetched_at > rules.MAX_DECISION_AGE:
        minutes = (now - decision.fetched_at).total_seconds() / 60
        raise DecisionTooOld(
            f"refusing to write a decision made from billing data fetched {minutes:.0f} minute(s) ago "
            f"(at {decision.fetched_at.isoformat(timespec='seconds')}; the limit is "
            f"{rules.MAX_DECISION_AGE.total_seconds() / 60:.0f}); nothing written: run the sync again"
        )
    return appdb.apply_corrections(
        engine, decision.corrections, run_id=run_id, trigger=trigger, now=now, read_started_at=decision.read_started_at
    )


def verify(
    engine: Engine, snapshot: BillingSnapshot, decision: Decision, *, now: datetime | None = None
) -> pd.DataFrame:
    """Re-read the rows this run found wrong; return the corrections still due.

    A row changed after the billing data was read is not counted: this
    run's data is too old to judge it.
    """
    fixable = decision.mismatches[decision.mismatches["kind"].isin(rules.WRITABLE_KINDS)]
    ids = list(fixable["instance_id"])
    if not ids:
        return rules.empty_frame(CORRECTION_COLUMNS)
    state = AppState(
        plans=appdb.load_plans(engine),
        instances=appdb.read_instances(engine, ids, ordered=False),
        total_instances=decision.total_instances,
    )
    # A set lookup per record (hashes are cached by now) beats isin() against a long list.
    wanted = set(ids)
    record_ids = snapshot.records["instance_id"].to_numpy(dtype=object)
    keep = np.fromiter(map(wanted.__contains__, record_ids), dtype=bool, count=len(record_ids))
    records = snapshot.records[keep]
    again = rules.decide(
        plans=state.plans,
        instances=state.instances,
        records=records,
        invalid=snapshot.invalid.iloc[0:0],
        absent_basis_at=snapshot.started_at,
        now=now or utcnow(),
        total_instances=state.total_instances,
        scope="targeted",
    )
    return again.corrections


# --- reporting ---------------------------------------------------------------


def build_report(
    *,
    run_id: str,
    trigger: str,
    options: SyncOptions,
    snapshot: BillingSnapshot,
    state: AppState,
    decision: Decision,
    result: appdb.ApplyResult | None,
) -> SyncReport:
    """Assemble the report of a run from its stages' outputs."""
    requested = snapshot.requested_ids
    unknown: list[str] = []
    if requested is not None:
        have = set(state.instances["instance_id"])
        unknown = [i for i in requested if i not in have]
    return SyncReport(
        run_id=run_id,
        trigger=trigger,
        scope=decision.scope,
        dry_run=options.dry_run,
        forced=decision.guardrails.force,
        total_instances=state.total_instances,
        billing_records=int(len(snapshot.records) + len(snapshot.invalid)),
        counts=dict(decision.counts),
        mismatches=decision.mismatches,
        planned=int(len(decision.corrections)),
        applied=result.applied if result is not None else rules.empty_frame(CORRECTION_COLUMNS),
        skipped_conflict=int(len(result.skipped)) if result is not None else 0,
        skipped_stale=int(len(decision.stale)),
        refused=decision.refusal,
        guard=decision.guard.as_dict() if decision.guard is not None else None,
        unknown_instance_ids=unknown,
        unresolved=snapshot.unresolved.reset_index(drop=True),
        unassigned=snapshot.unassigned,
        lookups=snapshot.lookups,
        provider=snapshot.provider,
        billing_pages=int(snapshot.pages),
        invalid_records=int(len(snapshot.invalid)),
        billing_status_counts=_value_counts(snapshot.records, "status"),
        plans=_plan_rows(state),
    )


def _value_counts(frame: pd.DataFrame, column: str) -> dict[str, int]:
    if column not in frame.columns:
        return {}
    return {str(k): int(v) for k, v in frame[column].value_counts().items()}


def _plan_rows(state: AppState) -> list[dict[str, Any]]:
    """Each plan with the instances on it (the report's view of the app side)."""
    per_plan = _value_counts(state.instances, "plan_id")
    return [
        {"plan_id": str(p.plan_id), "credits": int(p.credits), "is_free": bool(p.is_free),
         "instances": per_plan.get(str(p.plan_id), 0)}
        for p in state.plans.itertuples(index=False)
    ]


def log_outcome(report: SyncReport, log: Log, *, log_limit: int = 1000) -> None:
    """The operator log lines of a finished run (SPEC vocabulary); ids are escaped for the log."""
    if report.dry_run:
        log.info(
            "[CreditSync] Dry run: %d mismatch(es) found, would sync credits for %d instance(s); nothing written%s",
            report.mismatch_count,
            report.planned,
            f" (a real run would be refused: {report.refused})" if report.refused else "",
        )
        return
    if report.refused:
        log.error("[CreditSync] Error running credit sync task: refused: %s", report.refused)
        return
    for row in report.applied.head(log_limit).itertuples(index=False):
        if row.old_plan_id != row.new_plan_id:
            log.info("Updating instance plan %s: %s → %s", log_safe(row.instance_id), log_safe(row.old_plan_id),
                     log_safe(row.new_plan_id))
        log.info(
            "Synced credits for instance %s: %s → %s",
            log_safe(row.instance_id),
            row.old_credits_total,
            row.new_credits_total,
        )
    if report.applied_count > log_limit:
        log.info("... and %d more instance(s); every change is in credit_sync_audit", report.applied_count - log_limit)
    if report.applied_count:
        log.info("[CreditSync] Successfully synced credits for %d instance(s)", report.applied_count)
    elif report.mismatch_count == 0 and report.unresolved.empty:
        log.info("[CreditSync] All instances already have correct credits")
    if report.skipped_conflict or report.skipped_stale:
        log.warning(
            "[CreditSync] Skipped %d instance(s) changed during the run (%d by compare-and-set, %d newer than billing data); "
            "the next run re-checks them",
            report.skipped_conflict + report.skipped_stale,
            report.skipped_conflict,
            report.skipped_stale,
        )
    unwritable = {k: v for k, v in report.counts.items() if k not in rules.WRITABLE_KINDS and v}
    if unwritable:
        log.warning(
            "[CreditSync] %d mismatch(es) need a person (never written): %s",
            sum(unwritable.values()),
            ", ".join(f"{k}={v}" for k, v in unwritable.items()),
        )
    if not report.unresolved.empty:
        shown = ", ".join(log_safe(i, 60) for i in report.unresolved["instance_id"].head(10))
        more = f" and {len(report.unresolved) - 10} more" if len(report.unresolved) > 10 else ""
        log.warning(
            "[CreditSync] Left %d instance(s) alone that billing could not answer for (%s): %s%s",
            len(report.unresolved),
            ", ".join(f"{k}={v}" for k, v in sorted(report.unresolved_counts().items())),
            shown,
            more,
        )


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


def run_revert(
    engine: Engine,
    run_id: str,
    *,
    dry_run: bool = False,
    log: Log | None = None,
    revert_run_id: str | None = None,
    clock: Callable[[], datetime] = utcnow,
    log_limit: int = 1000,
) -> appdb.RevertResult:
    """Undo one run's corrections (``appdb.revert_run``) and log the operator lines.

    The one revert of every entry point (``creditsync revert``, the Dagster job
    ``revert_credit_sync_run``). Raises ``appdb.UnknownRunError`` for a run without audit rows.
    """
    log = log or logger
    shown = log_safe(run_id)
    try:
        result = appdb.revert_run(
            engine, run_id, revert_run_id=revert_run_id or new_run_id(), now=clock(), dry_run=dry_run
        )
    except Exception as exc:
        log.error("[CreditSync] Error reverting run %s: %s", shown, one_line(exc))
        raise
    if result.already_reverted:
        log.info("[CreditSync] Run %s was already reverted: nothing to revert", shown)
        return result
    skipped = len(result.skipped)
    if dry_run:
        log.info("[CreditSync] Dry run: would revert %d instance(s) of run %s, skip %d changed since; nothing written",
                 len(result.reverted), shown, skipped)
        return result
    for row in result.reverted.head(log_limit).itertuples(index=False):
        if row.current_plan_id != row.target_plan_id:
            log.info("Updating instance plan %s: %s → %s", log_safe(row.instance_id),
                     log_safe(row.current_plan_id), log_safe(row.target_plan_id))
        log.info("Synced credits for instance %s: %s → %s", log_safe(row.instance_id),
                 row.current_credits_total, row.target_credits_total)
    if len(result.reverted) > log_limit:
        log.info("... and %d more instance(s); every change is in credit_sync_audit", len(result.reverted) - log_limit)
    log.info("[CreditSync] Reverted %d instance(s) of run %s", len(result.reverted), shown)
    if skipped:
        ids = ", ".join(log_safe(i, 60) for i in result.skipped["instance_id"].head(10))
        more = f" and {skipped - 10} more" if skipped > 10 else ""
        log.warning("[CreditSync] Skipped %d instance(s) of run %s changed since the run (left as they are): %s%s",
                    skipped, shown, ids, more)
    return result


@contextmanager
def reporting_errors(log: Log | None = None) -> Iterator[None]:
    """Log any failure as the operators' one error line, then re-raise."""
    try:
        yield
    except Exception as exc:
        (log or logger).error("[CreditSync] Error running credit sync task: %s", one_line(exc))
        raise


def one_line(exc: BaseException) -> str:
    """An exception as one line: its type where the message is empty."""
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
