"""Asset checks: the two facts ops watch after every run."""

from dagster import AssetCheckResult, AssetCheckSeverity, MetadataValue, asset_check

from .. import sync
from ..rules import Decision
from .assets import credit_corrections, credit_mismatches, mismatch_table


@asset_check(
    asset=credit_corrections,
    description="After the corrections, no instance is still on the wrong plan or allowance "
    "(the touched rows are re-read from the app database).",
)
def no_mismatches_after_fix(credit_corrections: sync.SyncReport) -> AssetCheckResult:
    remaining = credit_corrections.remaining
    remaining_view = remaining.rename(
        columns={
            "old_plan_id": "current_plan_id",
            "new_plan_id": "expected_plan_id",
            "old_credits_total": "current_credits_total",
            "new_credits_total": "expected_credits_total",
        }
    ).assign(kind="unfixed")
    why = "dry run: nothing was written" if credit_corrections.dry_run else "rows still differ from billing"
    return AssetCheckResult(
        passed=remaining.empty,
        severity=AssetCheckSeverity.ERROR,
        description=None if remaining.empty else f"{len(remaining)} instance(s) still wrong ({why})",
        metadata={
            "remaining": MetadataValue.int(len(remaining)),
            "applied": MetadataValue.int(credit_corrections.applied_count),
            "remaining_instances": mismatch_table(remaining_view),
        },
    )


@asset_check(
    asset=credit_mismatches,
    description="Billing entitles no instance to a plan missing from the plans table (such instances are never written).",
)
def no_unknown_plans(credit_mismatches: Decision) -> AssetCheckResult:
    unknown = credit_mismatches.mismatches[credit_mismatches.mismatches["kind"] == "unknown_plan"]
    plans = sorted(set(unknown["expected_plan_id"].dropna().astype(str)))
    return AssetCheckResult(
        passed=unknown.empty,
        severity=AssetCheckSeverity.ERROR,
        description=None if unknown.empty else f"{len(unknown)} instance(s) entitled to unknown plan(s): {', '.join(plans)}",
        metadata={
            "unknown_plan_instances": MetadataValue.int(len(unknown)),
            "unknown_plans": MetadataValue.json(plans),
            "instances": mismatch_table(unknown),
        },
    )


credit_sync_checks = [no_mismatches_after_fix, no_unknown_plans]
