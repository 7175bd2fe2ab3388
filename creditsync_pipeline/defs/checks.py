"""Asset checks: the two facts ops watch after every full sync.

Both are evaluated by the full-sync step itself (``check_specs`` of the multi-asset in
:mod:`.assets`) from the run's :class:`~creditsync_pipeline.sync.SyncReport`: no value is
stored between steps for a separate check step to load.
"""

from __future__ import annotations

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec

from ..sync import SyncReport
from . import report as render

NO_MISMATCHES_AFTER_FIX = AssetCheckSpec(
    "no_mismatches_after_fix",
    asset="credit_corrections",
    description="After the corrections, no instance is still on the wrong plan or allowance "
    "(the touched rows are re-read from the app database).",
)
NO_UNKNOWN_PLANS = AssetCheckSpec(
    "no_unknown_plans",
    asset="credit_mismatches",
    description="Billing entitles no instance to a plan missing from the plans table (such instances are never written).",
)
credit_sync_check_specs = [NO_MISMATCHES_AFTER_FIX, NO_UNKNOWN_PLANS]
#: separate check definitions: none any more (the checks run inside the full-sync step);
#: kept so ``Definitions(asset_checks=...)`` and older imports stay valid
credit_sync_checks: list = []


def no_mismatches_after_fix(report: SyncReport) -> AssetCheckResult:
    """Passed when the re-read after the write finds nothing still wrong."""
    remaining = report.remaining
    why = "dry run: nothing was written" if report.dry_run else "rows still differ from billing"
    if not report.verified:
        description = "the check after the commit could not run: " + "; ".join(report.warnings)
    else:
        description = None if remaining.empty else f"{len(remaining)} instance(s) still wrong ({why})"
    return AssetCheckResult(
        asset_key=NO_MISMATCHES_AFTER_FIX.asset_key,
        check_name=NO_MISMATCHES_AFTER_FIX.name,
        passed=bool(remaining.empty and report.verified),
        severity=AssetCheckSeverity.ERROR,
        description=description,
        metadata=render.remaining_check_metadata(report),
    )


def no_unknown_plans(report: SyncReport) -> AssetCheckResult:
    """Passed when no instance is entitled to a plan missing from ``plans``."""
    metadata, plans = render.unknown_plans_check_metadata(report)
    count = metadata["unknown_plan_instances"].value
    return AssetCheckResult(
        asset_key=NO_UNKNOWN_PLANS.asset_key,
        check_name=NO_UNKNOWN_PLANS.name,
        passed=count == 0,
        severity=AssetCheckSeverity.ERROR,
        description=None if count == 0 else f"{count} instance(s) entitled to unknown plan(s): {', '.join(plans)}",
        metadata=metadata,
    )
