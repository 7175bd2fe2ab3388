"""The credit_sync asset group: the full sync as one step.

One ``@multi_asset`` produces the four SPEC assets (``billing_subscriptions``,
``instance_credits``, ``credit_mismatches``, ``credit_corrections``) and the two asset
checks by calling :func:`creditsync_pipeline.sync.run_full_sync` once -- the same call
as ``creditsync fix``: the app read overlaps the billing fetch, and nothing is handed
between steps, so nothing is pickled or stored under ``DAGSTER_HOME`` but the events
and the mismatch report (see docs/dagster.md, "Storage budget").

The step is in the concurrency pool :data:`FULL_SYNC_POOL` (limit 1 in dagster.yaml):
one full sync at a time whether a schedule tick, a ``credit_sync_job`` launch or a UI
"Materialize" started it. The asset keys stay separate so each keeps its own page,
metadata and plots; the assets are materialized together or not at all.
"""

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetSpec,
    Config,
    Failure,
    MaterializeResult,
    multi_asset,
)
from pydantic import Field

from .. import reports, settings, sync
from . import report as render
from .checks import credit_sync_check_specs, no_mismatches_after_fix, no_unknown_plans
from .resources import AppDatabaseResource, BillingResource

GROUP = "credit_sync"
TRIGGER_TAG = "creditsync/trigger"
#: the concurrency pool of the full-sync step; dagster.yaml gives pools a limit of 1
FULL_SYNC_POOL = "creditsync_full_sync"
#: the op (step) name of the full sync: its run config lives under ``ops.credit_sync``
STEP = "credit_sync"
#: rows shown inline in the UI (the full list is in the CSV report)
TABLE_ROWS = render.TABLE_ROWS
#: per-instance "Synced credits for instance ..." lines a run puts in Dagster's event log.
#: Each is one stored event (~5 ms apiece on SQLite: 1,000 lines cost more than the whole
#: sync at 100k); the corrected instances are in ``credit_corrections``' metadata table,
#: the full list in the report and every change in ``credit_sync_audit``.
LOG_LINES = 20

BILLING = AssetKey("billing_subscriptions")
INSTANCES = AssetKey("instance_credits")
MISMATCHES = AssetKey("credit_mismatches")
CORRECTIONS = AssetKey("credit_corrections")


class FullSyncConfig(Config):
    """How the diff is judged and whether corrections are written."""

    force: bool = Field(default=False, description="Override the guard rails (mass change, paid downgrade, empty billing list)")
    max_change_ratio: float = Field(
        default=0.10, description="Refuse a run that changes more than max(10, this share of all instances)"
    )
    max_paid_downgrade_ratio: float = Field(
        default=0.10, description="Refuse a run that moves more than max(10, this share of the paid instances) to the free plan"
    )
    dry_run: bool = Field(default=False, description="Compute and report, write nothing")

    def options(self) -> sync.SyncOptions:
        return sync.SyncOptions(
            dry_run=self.dry_run,
            force=self.force,
            max_change_ratio=self.max_change_ratio,
            max_paid_downgrade_ratio=self.max_paid_downgrade_ratio,
            log_limit=LOG_LINES,
        )


def _trigger(context: AssetExecutionContext) -> str:
    return context.run.tags.get(TRIGGER_TAG, "manual")


def write_report(report: sync.SyncReport, folder: Path, retention: timedelta) -> tuple[Path, list[Path]]:
    """The run's full mismatch list as a spreadsheet-safe CSV in ``folder``; older reports pruned."""
    removed = reports.prune(folder, retention, pattern=reports.REPORT_PATTERN)
    path = reports.write_csv(report.mismatches, folder / f"credit_mismatches-{report.run_id}.csv")
    return path, removed


@multi_asset(
    name=STEP,
    specs=[
        AssetSpec(
            BILLING, group_name=GROUP, kinds={"python"},
            description="Every subscription record from the billing provider (all pages or every instance looked up, validated).",
        ),
        AssetSpec(INSTANCES, group_name=GROUP, kinds={"sql"},
                  description="Plans and every instance's plan and credit allowance in the app database."),
        AssetSpec(
            MISMATCHES, group_name=GROUP, kinds={"pandas"}, deps=[BILLING, INSTANCES],
            description="Every instance whose plan or allowance differs from billing, by kind, and the guard-rail verdict.",
        ),
        AssetSpec(CORRECTIONS, group_name=GROUP, kinds={"sql"}, deps=[MISMATCHES],
                  description="The corrections applied (compare-and-set, audited), skipped or refused."),
    ],
    check_specs=credit_sync_check_specs,
    pool=FULL_SYNC_POOL,
    can_subset=False,
    description="The full sync (creditsync fix's run_full_sync): fetch every billing record while reading every "
    "instance, diff, correct (CAS + audit), re-check. One step, one full sync at a time (pool creditsync_full_sync).",
)
def credit_sync(
    context: AssetExecutionContext, config: FullSyncConfig, app_db: AppDatabaseResource, billing: BillingResource
) -> Iterator[Any]:
    with sync.reporting_errors(context.log):
        cfg = settings.from_env()  # a bad setting fails the step before anything is read or written
    options = config.options()
    engine = app_db.get_engine()
    with billing.get_client(engine, remember_links=not options.dry_run) as client:
        report = sync.run_full_sync(
            engine, client, trigger=_trigger(context), run_id=context.run.run_id, options=options, log=context.log
        )
    folder = cfg.report_folder(context.instance.storage_directory())
    path: Optional[Path] = None
    if folder is not None:
        try:
            path, removed = write_report(report, folder, timedelta(days=cfg.report_retention_days))
        except OSError as exc:  # after the commit: a warning on the report, never a failed run
            report.warnings.append(f"the mismatch report could not be written ({exc.strerror or type(exc).__name__})")
            context.log.warning(f"[CreditSync] Committed {report.applied_count} correction(s), but {report.warnings[-1]}")
        else:
            if removed:
                context.log.info(
                    f"[CreditSync] Pruned {len(removed)} mismatch report(s) older than {cfg.report_retention_days} day(s)"
                )
    link = render.report_link(cfg.public_url, str(cfg.app_secret), path) if path is not None else None

    yield MaterializeResult(asset_key=BILLING, metadata=render.billing_metadata(report))
    yield MaterializeResult(asset_key=INSTANCES, metadata=render.instances_metadata(report))
    yield MaterializeResult(asset_key=MISMATCHES, metadata=render.mismatches_metadata(report, path, link))
    yield no_unknown_plans(report)
    corrections = render.corrections_metadata(report, path, link)
    if report.refused:  # as `creditsync fix` (exit 3), a dry run that a real run would refuse too
        raise Failure(description=f"[CreditSync] refused: {report.refused}", metadata=corrections)
    yield MaterializeResult(asset_key=CORRECTIONS, metadata=corrections)
    yield no_mismatches_after_fix(report)


credit_sync_assets = [credit_sync]
