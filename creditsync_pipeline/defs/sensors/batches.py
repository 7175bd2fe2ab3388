"""What both real-time sensors share: the batch limits, the run request of a batch, and
how a tick finds out whether a batch's run finished."""

import logging
from datetime import datetime, timedelta
from typing import Any

from dagster import DagsterRunStatus, RunRequest, RunsFilter, SensorEvaluationContext

from ... import appdb
from ..assets import TRIGGER_TAG
from ..jobs import OUTAGE_TAG, SYNC_TAG
from .cursors import Batch

logger = logging.getLogger("creditsync")

#: Tag carrying a batch's run key; the sensors look their runs up by it.
BATCH_TAG = "creditsync/batch"
#: Rows (webhook rows or instances) per run.
BATCH_SIZE = 500
#: Runs in flight per sensor; more work waits and is batched together.
MAX_INFLIGHT_BATCHES = 2
#: A requested run not found after this long is taken as lost (its rows are retried).
LOST_RUN_SECONDS = 300.0
#: How far behind the watermark new instances are looked for.
NEW_INSTANCE_LOOKBACK = timedelta(minutes=10)
#: Lower bound of the evaluation interval (the daemon's sensor loop runs every ~5 s).
MIN_INTERVAL_SECONDS = 1
#: Retries of work that failed for an outage come at least this often, so rows settle
#: within a minute of billing (or the database) coming back.
OUTAGE_RETRY_SECONDS = 60.0
#: How far ahead of the database's clock a created_at may move the provisioning watermark.
FUTURE_ALLOWANCE = timedelta(seconds=60)


OP_NAME = "sync_instances"
_FINISHED = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}



def _batch_run(context: SensorEvaluationContext, key: str, batch: Batch, now: float) -> tuple[DagsterRunStatus | None, bool]:
    """(the final status of a batch's run -- ``FAILURE`` for a lost run, ``None`` while in
    flight --, whether it failed for an outage of billing or the database as a whole)."""
    runs = context.instance.get_runs(filters=RunsFilter(tags={BATCH_TAG: key}), limit=1)
    if not runs:
        return (DagsterRunStatus.FAILURE if now - batch.at > LOST_RUN_SECONDS else None), False
    status = runs[0].status
    return (status if status in _FINISHED else None), runs[0].tags.get(OUTAGE_TAG) == "true"


def _batch_done(context: SensorEvaluationContext, key: str, batch: Batch, now: float) -> DagsterRunStatus | None:
    """The final status of a batch's run, ``FAILURE`` for a lost run, ``None`` while in flight."""
    return _batch_run(context, key, batch, now)[0]


def _run_request(key: str, trigger: str, instance_ids: list[str], webhook_event_ids: list[int] | None = None) -> RunRequest:
    config: dict[str, Any] = {"instance_ids": instance_ids, "trigger": trigger}
    if webhook_event_ids is not None:
        config["webhook_event_ids"] = webhook_event_ids
    return RunRequest(
        run_key=key,
        run_config={"ops": {OP_NAME: {"config": config}}},
        tags={TRIGGER_TAG: trigger, SYNC_TAG: "targeted", BATCH_TAG: key},
    )


def _held(row: appdb.WebhookEvent, db_now: datetime) -> bool:
    """Another process (a receiver, a run) holds the row's lease right now."""
    return row.claimed_by is not None and row.claimed_until is not None and row.claimed_until > db_now


def _chunks(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]

