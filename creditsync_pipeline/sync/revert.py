"""Rollback: undo one run's corrections, with the operator lines."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
import logging

from sqlalchemy.engine import Engine

from .. import appdb
from ..ids import log_safe
from .model import Log, new_run_id, utcnow
from .report import one_line

logger = logging.getLogger("creditsync")


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
