"""Schedules: the periodic safety net."""

from __future__ import annotations

from dagster import DefaultScheduleStatus, ScheduleDefinition

from .assets import TRIGGER_TAG
from .jobs import credit_sync_job

credit_sync_every_6_hours = ScheduleDefinition(
    name="credit_sync_every_6_hours",
    cron_schedule="0 */6 * * *",
    execution_timezone="UTC",
    job=credit_sync_job,
    tags={TRIGGER_TAG: "periodic"},
    default_status=DefaultScheduleStatus.RUNNING,
    description="Full reconciliation every 6 hours (UTC).",
)
