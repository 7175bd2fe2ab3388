"""Jobs: the full reconciliation (all four assets and their checks)."""

from __future__ import annotations

from dagster import AssetSelection, define_asset_job, in_process_executor

from .assets import GROUP

#: Tag every creditsync run carries; dagster.yaml limits concurrent runs on it.
SYNC_TAG = "creditsync/sync"

# In-process: four small steps; a process per step would cost more than the work.
credit_sync_job = define_asset_job(
    name="credit_sync_job",
    selection=AssetSelection.groups(GROUP),
    description="Full reconciliation: fetch every billing record, diff against every instance, correct (CAS + audit).",
    executor_def=in_process_executor,
    tags={SYNC_TAG: "full"},
)
