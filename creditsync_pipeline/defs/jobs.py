"""Jobs: the full reconciliation (all four assets and their checks) and the targeted sync."""

from dagster import (
    AssetSelection,
    Config,
    Failure,
    MetadataValue,
    OpExecutionContext,
    Output,
    define_asset_job,
    in_process_executor,
    job,
    op,
)
from pydantic import Field

from .. import realtime
from .assets import GROUP, TRIGGER_TAG
from .resources import AppDatabaseResource, BillingResource

#: Tag every creditsync run carries; dagster.yaml limits concurrent runs on it.
SYNC_TAG = "creditsync/sync"
#: Tag a targeted run sets on itself when it failed for an outage of billing or the database.
OUTAGE_TAG = "creditsync/outage"

# In-process: four small steps; a process per step would cost more than the work.
credit_sync_job = define_asset_job(
    name="credit_sync_job",
    selection=AssetSelection.groups(GROUP),
    description="Full reconciliation: fetch every billing record, diff against every instance, correct (CAS + audit).",
    executor_def=in_process_executor,
    tags={SYNC_TAG: "full"},
)


class TargetedSyncConfig(Config):
    """Which instances a targeted run syncs (the sensors fill this in; so can a person)."""

    instance_ids: list[str] = Field(
        default_factory=list,
        description="Instances to sync; each is fetched with GET /v1/subscriptions/{id} (404 = no subscription)",
    )
    trigger: str = Field(
        default="",
        description="Audit trigger: manual, webhook or provisioning (default: the run's creditsync/trigger tag, else manual)",
    )
    webhook_event_ids: list[int] = Field(
        default_factory=list,
        description="billing_webhook_events.id rows this run settles (set by billing_webhook_sensor); "
        "their instances are synced too",
    )


@op(
    name="sync_instances",
    description="Targeted sync of the named instances (same rules, compare-and-set writes and audit as the full sync); "
    "marks the webhook rows it settles.",
)
def sync_instances_op(
    context: OpExecutionContext,
    config: TargetedSyncConfig,
    app_db: AppDatabaseResource,
    billing: BillingResource,
) -> Output[dict]:
    trigger = config.trigger or context.run.tags.get(TRIGGER_TAG) or "manual"
    if trigger not in realtime.TARGETED_TRIGGERS:
        raise Failure(description=f"[CreditSync] unknown trigger {trigger!r}; expected one of {', '.join(realtime.TARGETED_TRIGGERS)}")
    if not config.instance_ids and not config.webhook_event_ids:
        raise Failure(description="[CreditSync] nothing to sync: set ops.sync_instances.config.instance_ids")
    engine = app_db.get_engine()
    with billing.get_client(engine) as client:
        result = realtime.run_batch(
            engine,
            client,
            instance_ids=config.instance_ids,
            webhook_event_ids=config.webhook_event_ids,
            trigger=trigger,
            run_id=context.run.run_id,
            log=context.log,
        )
    outcomes: dict[str, int] = {}
    for outcome in result.instances.outcomes.values():
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    metadata = {
        "trigger": MetadataValue.text(trigger),
        "instances": MetadataValue.int(len(result.instances.outcomes) + len(result.instances.errors)),
        "applied": MetadataValue.int(result.instances.applied),
        "instance_outcomes": MetadataValue.json(outcomes),
        "not_synced": MetadataValue.int(len(result.instances.errors) + len(result.invalid_ids)),
        "webhook_rows": MetadataValue.json(result.counts()),
        "webhook_rows_already_processed": MetadataValue.int(len(result.already_processed)),
    }
    if result.failed:
        summary = result.failure_summary()
        context.log.error("[CreditSync] Error running credit sync task: %s", summary)
        errors = result.instances.errors
        if errors and set(errors) <= result.instances.outage and not result.invalid_ids:
            # Billing or the database was down as a whole: the sensors retry this batch
            # without counting the attempt (SPEC: an outage never uses up a retry budget).
            context.instance.add_run_tags(context.run.run_id, {OUTAGE_TAG: "true"})
        raise Failure(description=f"[CreditSync] {summary}", metadata=metadata)
    return Output(
        {"outcomes": dict(result.instances.outcomes), "webhook_rows": {str(k): v for k, v in result.rows.items()}},
        metadata=metadata,
    )


# In-process as well: one step; latency matters more than isolation here.
@job(
    name="instance_credit_sync_job",
    description="Targeted sync of chosen instances (config instance_ids): the webhook, provisioning and manual nets.",
    executor_def=in_process_executor,
    tags={SYNC_TAG: "targeted"},
)
def instance_credit_sync_job() -> None:
    sync_instances_op()


# --- rollback (issue 13): the same revert as `creditsync revert` -------------------------


class RevertConfig(Config):
    """Which run to undo (its ``credit_sync_audit`` rows), and whether only to say what would happen."""

    run_id: str = Field(description="run_id of the credit_sync_audit rows to undo (a Dagster run id, or the CLI's)")
    dry_run: bool = Field(default=False, description="compute what would be reverted; write nothing")


@op(
    name="revert_run",
    description="Undo one run's corrections from its audit rows: compare-and-set against the run's new values, "
    "credits_used untouched, audited with trigger revert, one transaction.",
)
def revert_run_op(context: OpExecutionContext, config: RevertConfig, app_db: AppDatabaseResource) -> Output[dict]:
    from .. import appdb, sync

    try:
        result = sync.run_revert(
            app_db.get_engine(), config.run_id, dry_run=config.dry_run, log=context.log,
            revert_run_id=context.run.run_id,
        )
    except appdb.AppDatabaseError as exc:  # unknown run, database down: one line, no traceback
        raise Failure(description=f"[CreditSync] {sync.one_line(exc)}") from None
    metadata = {
        "reverted_run_id": MetadataValue.text(config.run_id),
        "dry_run": MetadataValue.bool(config.dry_run),
        "already_reverted": MetadataValue.bool(result.already_reverted),
        "reverted": MetadataValue.int(len(result.reverted)),
        "skipped": MetadataValue.int(len(result.skipped)),
    }
    return Output(
        {"reverted": [str(i) for i in result.reverted["instance_id"]],
         "skipped": [str(i) for i in result.skipped["instance_id"]]},
        metadata=metadata,
    )


@job(
    name="revert_credit_sync_run",
    description="Roll back one run's corrections (config run_id; dry_run to preview). Same as `creditsync revert`.",
    executor_def=in_process_executor,
    tags={SYNC_TAG: "revert"},
)
def revert_credit_sync_run() -> None:
    revert_run_op()
