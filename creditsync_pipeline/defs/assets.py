"""The credit_sync asset group: fetch, read, diff, correct.

Each asset is one stage of :mod:`creditsync_pipeline.sync`; the CLI runs the
same stages in one call. The values pass between assets through the IO
manager, so every materialization keeps its full mismatch list.
"""

from datetime import timedelta
from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, Config, Failure, MetadataValue, TableColumn, TableRecord, TableSchema, asset
from pydantic import Field

from .. import reports, settings, sync
from ..billing import BillingSnapshot
from ..rules import KINDS, Decision
from .resources import AppDatabaseResource, BillingResource

GROUP = "credit_sync"
#: rows shown inline in the UI; the full list is in the CSV and the IO manager
TABLE_ROWS = 50
TRIGGER_TAG = "creditsync/trigger"


class MismatchConfig(Config):
    """How the diff is judged."""

    force: bool = Field(default=False, description="Override the guard rails (mass change, paid downgrade, empty billing list)")
    max_change_ratio: float = Field(
        default=0.10, description="Refuse a run that changes more than max(10, this share of all instances)"
    )
    max_paid_downgrade_ratio: float = Field(
        default=0.10, description="Refuse a run that moves more than max(10, this share of the paid instances) to the free plan"
    )


class CorrectionConfig(Config):
    """Whether corrections are written."""

    dry_run: bool = Field(default=False, description="Compute and report, write nothing")


def _trigger(context: AssetExecutionContext) -> str:
    return context.run.tags.get(TRIGGER_TAG, "manual")


@asset(group_name=GROUP, kinds={"python"}, description="Every subscription record from the billing provider (all pages or every instance looked up, validated).")
def billing_subscriptions(
    context: AssetExecutionContext, billing: BillingResource, app_db: AppDatabaseResource
) -> BillingSnapshot:
    context.log.info("[CreditSync] Running credit sync task...")
    engine = app_db.get_engine()
    with sync.reporting_errors(context.log), billing.get_client(engine) as client:
        snapshot = sync.fetch_billing(client, engine)
    context.add_output_metadata(
        {
            "records": MetadataValue.int(len(snapshot.records)),
            "invalid_records": MetadataValue.int(len(snapshot.invalid)),
            "pages": MetadataValue.int(snapshot.pages),
            "fetch_seconds": MetadataValue.float((snapshot.finished_at - snapshot.started_at).total_seconds()),
            "status_counts": MetadataValue.json(
                {str(k): int(v) for k, v in snapshot.records["status"].value_counts().items()}
            ),
        }
    )
    return snapshot


@asset(group_name=GROUP, kinds={"sql"}, description="Plans and every instance's plan and credit allowance in the app database.")
def instance_credits(context: AssetExecutionContext, app_db: AppDatabaseResource) -> sync.AppState:
    with sync.reporting_errors(context.log):
        state = sync.read_state(app_db.get_engine())
    per_plan = state.instances["plan_id"].value_counts()
    context.add_output_metadata(
        {
            "instances": MetadataValue.int(state.total_instances),
            "plans": MetadataValue.md(
                "| plan | credits | free | instances |\n|---|---|---|---|\n"
                + "\n".join(
                    f"| {p.plan_id} | {p.credits} | {'yes' if p.is_free else ''} | {int(per_plan.get(p.plan_id, 0))} |"
                    for p in state.plans.itertuples(index=False)
                )
            ),
        }
    )
    return state


def mismatch_table(mismatches: pd.DataFrame, limit: int = TABLE_ROWS) -> MetadataValue:
    """The first ``limit`` mismatches as a UI table."""
    schema = TableSchema(
        columns=[
            TableColumn("instance_id", "string"),
            TableColumn("kind", "string"),
            TableColumn("current_plan_id", "string"),
            TableColumn("expected_plan_id", "string"),
            TableColumn("current_credits_total", "int"),
            TableColumn("expected_credits_total", "int"),
            TableColumn("reason", "string"),
        ]
    )
    records = []
    for row in mismatches.head(limit).itertuples(index=False):
        data = {}
        for col in schema.columns:
            value = getattr(row, col.name)
            if value is None or (not isinstance(value, str) and pd.isna(value)):
                data[col.name] = None
            else:
                data[col.name] = int(value) if col.type == "int" else str(value)
        records.append(TableRecord(data))
    return MetadataValue.table(records=records, schema=schema)


def _write_report_csv(context: AssetExecutionContext, mismatches: pd.DataFrame) -> Path:
    """The full mismatch list as a spreadsheet-safe CSV; reports past the retention are pruned."""
    folder = Path(context.instance.storage_directory()) / "creditsync_reports"
    retention = timedelta(days=settings.from_env().report_retention_days)
    removed = reports.prune(folder, retention, pattern="credit_mismatches-*.csv")
    if removed:
        context.log.info(f"[CreditSync] Pruned {len(removed)} mismatch report(s) older than {retention.days} day(s)")
    return reports.write_csv(mismatches, folder / f"credit_mismatches-{context.run.run_id}.csv")


@asset(group_name=GROUP, kinds={"pandas"}, description="Every instance whose plan or allowance differs from billing, by kind, and the guard-rail verdict.")
def credit_mismatches(
    context: AssetExecutionContext,
    config: MismatchConfig,
    billing_subscriptions: BillingSnapshot,
    instance_credits: sync.AppState,
) -> Decision:
    options = sync.SyncOptions(
        force=config.force,
        max_change_ratio=config.max_change_ratio,
        max_paid_downgrade_ratio=config.max_paid_downgrade_ratio,
    )
    with sync.reporting_errors(context.log):
        decision = sync.decide(billing_subscriptions, instance_credits, options=options)
    path = _write_report_csv(context, decision.mismatches)
    shown = min(TABLE_ROWS, len(decision.mismatches))
    metadata: dict[str, MetadataValue] = {f"{kind}_count": MetadataValue.int(decision.counts[kind]) for kind in KINDS}
    metadata.update(
        {
            "mismatch_count": MetadataValue.int(len(decision.mismatches)),
            "total_instances": MetadataValue.int(decision.total_instances),
            "planned_corrections": MetadataValue.int(len(decision.corrections)),
            "withheld_newer_rows": MetadataValue.int(len(decision.stale)),
            "guard_rail": MetadataValue.text(decision.refusal or "ok"),
            "mismatches": mismatch_table(decision.mismatches),
            "full_list_csv": MetadataValue.path(str(path)),
            "summary": MetadataValue.md(
                f"**{len(decision.mismatches)} mismatch(es)** among {decision.total_instances} instance(s)"
                f" (showing {shown}; all of them in `{path.name}`).\n\n"
                + "\n".join(f"- `{k}`: {decision.counts[k]}" for k in KINDS)
                + (f"\n\n**Refused:** {decision.refusal}" if decision.refusal else "")
            ),
        }
    )
    context.add_output_metadata(metadata)
    return decision


@asset(group_name=GROUP, kinds={"sql"}, description="The corrections applied (compare-and-set, audited), skipped or refused.")
def credit_corrections(
    context: AssetExecutionContext,
    config: CorrectionConfig,
    app_db: AppDatabaseResource,
    billing_subscriptions: BillingSnapshot,
    instance_credits: sync.AppState,
    credit_mismatches: Decision,
) -> sync.SyncReport:
    options = sync.SyncOptions(dry_run=config.dry_run)
    engine = app_db.get_engine()
    with sync.reporting_errors(context.log):
        result = sync.apply(engine, credit_mismatches, run_id=context.run.run_id, trigger=_trigger(context), options=options)
        report = sync.build_report(
            run_id=context.run.run_id,
            trigger=_trigger(context),
            options=options,
            snapshot=billing_subscriptions,
            state=instance_credits,
            decision=credit_mismatches,
            result=result,
        )
        report.remaining = sync.verify(engine, billing_subscriptions, credit_mismatches)
    sync.log_outcome(report, context.log)
    metadata = {
        "applied": MetadataValue.int(report.applied_count),
        "planned": MetadataValue.int(report.planned),
        "skipped_conflict": MetadataValue.int(report.skipped_conflict),
        "skipped_stale": MetadataValue.int(report.skipped_stale),
        "remaining": MetadataValue.int(len(report.remaining)),
        "dry_run": MetadataValue.bool(report.dry_run),
        "refused": MetadataValue.text(report.refused or "no"),
        "trigger": MetadataValue.text(report.trigger),
    }
    if report.refused:
        raise Failure(description=f"[CreditSync] refused: {report.refused}", metadata=metadata)
    context.add_output_metadata(metadata)
    return report


credit_sync_assets = [billing_subscriptions, instance_credits, credit_mismatches, credit_corrections]
