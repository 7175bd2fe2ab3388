"""A finished run's report and its operator log lines (SPEC vocabulary)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
import logging
from typing import Any

import pandas as pd

from .. import appdb, rules
from ..billing import BillingSnapshot
from ..ids import log_safe
from ..rules import CORRECTION_COLUMNS, Decision
from .model import AppState, Log, SyncOptions, SyncReport

logger = logging.getLogger("creditsync")


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
