"""The Dagster code location: ``creditsync_pipeline.definitions:defs``.

Only assembles; each concept lives in its own module under ``defs/``.
"""

from __future__ import annotations

from dagster import Definitions

from .defs.assets import credit_sync_assets
from .defs.checks import credit_sync_checks
from .defs.jobs import credit_sync_job, instance_credit_sync_job, revert_credit_sync_run
from .defs.resources import resources_from_env
from .defs.schedules import credit_sync_every_6_hours
from .defs.sensors import realtime_sensors

defs = Definitions(
    assets=credit_sync_assets,
    asset_checks=credit_sync_checks,
    jobs=[credit_sync_job, instance_credit_sync_job, revert_credit_sync_run],
    schedules=[credit_sync_every_6_hours],
    sensors=realtime_sensors,
    resources=resources_from_env(),
)
