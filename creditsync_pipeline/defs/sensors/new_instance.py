"""``new_instance_sensor``: new rows in ``instances`` -> targeted runs (semantics in the package docstring)."""

import time
from datetime import datetime, timezone

from dagster import DagsterRunStatus, DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor
from sqlalchemy.engine import Engine

from ... import appdb, realtime
from ...ids import instance_id_problem, log_safe
from ..jobs import instance_credit_sync_job
from ..resources import AppDatabaseResource
from .batches import (
    BATCH_SIZE, FUTURE_ALLOWANCE, MAX_INFLIGHT_BATCHES, MIN_INTERVAL_SECONDS, NEW_INSTANCE_LOOKBACK,
    OUTAGE_RETRY_SECONDS, _batch_run, _chunks, _run_request,
)
from .cursors import Batch, NewInstanceCursor, _parse_time


def evaluate_new_instance_sensor(
    context: SensorEvaluationContext, engine: Engine, *, now: float | None = None
) -> SensorResult:
    """One tick of ``new_instance_sensor`` (see the module docstring)."""
    now = time.time() if now is None else now
    state = NewInstanceCursor.load(context.cursor, context.log)

    for key, batch in list(state.inflight.items()):
        status, outage = _batch_run(context, key, batch, now)
        if status is None:
            continue
        del state.inflight[key]
        if status == DagsterRunStatus.SUCCESS:
            continue
        if outage:  # billing or the database was down: the batch waits, its attempt given back
            state.retry.append({"ids": batch.ids, "attempt": batch.attempt,
                                "not_before": now + min(OUTAGE_RETRY_SECONDS, realtime.retry_delay(batch.attempt))})
            continue
        if batch.attempt >= realtime.MAX_ATTEMPTS:
            context.log.error(
                f"[CreditSync] Gave up syncing {len(batch.ids)} new instance(s) after {batch.attempt} attempts "
                f"({', '.join(map(str, batch.ids[:20]))}); the periodic full sync still covers them"
            )
            continue
        state.retry.append(
            {"ids": batch.ids, "attempt": batch.attempt + 1, "not_before": now + realtime.retry_delay(batch.attempt)}
        )

    slots = MAX_INFLIGHT_BATCHES - len(state.inflight)
    requests: list[RunRequest] = []

    def dispatch(ids: list[str], attempt: int) -> None:
        key = state.next_key("provisioning")
        state.inflight[key] = Batch(ids=ids, at=now, attempt=attempt)
        requests.append(_run_request(key, "provisioning", ids))

    # Retries first (oldest work), then new instances.
    for entry in sorted(state.retry, key=lambda r: r["not_before"]):
        if len(requests) >= slots:
            break
        if entry["not_before"] <= now:
            state.retry.remove(entry)
            dispatch(list(entry["ids"]), int(entry["attempt"]))

    skipped_invalid: list[str] = []
    room = (slots - len(requests)) * BATCH_SIZE
    if room > 0:
        wm = _parse_time(state.wm) if state.wm else None
        since = (wm if wm is not None else datetime.fromtimestamp(now, timezone.utc)) - NEW_INSTANCE_LOOKBACK
        # At most len(seen) of the rows in the window were handed out already, so this
        # many rows (oldest first) hold every unseen row that fits in this tick.
        rows = appdb.instances_created_since(engine, since, limit=len(state.seen) + room)
        fresh = [(iid, created) for iid, created in rows if iid not in state.seen][:room]
        take: list[str] = []
        # A created_at ahead of the database's clock (an app server with a fast clock) must not
        # move the watermark past it: later instances would never be seen.
        ceiling = appdb.database_now(engine) + FUTURE_ALLOWANCE if fresh else None
        for iid, created in fresh:
            state.seen[iid] = created.isoformat()
            if ceiling is not None and created > ceiling:
                context.log.warning(
                    f"[CreditSync] new_instance_sensor: instance {log_safe(iid, 80)} has created_at "
                    f"{created.isoformat()}, ahead of the database clock; the watermark stops at "
                    f"{ceiling.isoformat()} (check that app server's clock)"
                )
                created = ceiling
            if wm is None or created > wm:
                wm = created
            if instance_id_problem(iid) is not None:
                skipped_invalid.append(iid)
                continue
            take.append(iid)
        if wm is not None:
            state.wm = wm.isoformat()
            horizon = wm - NEW_INSTANCE_LOOKBACK
            state.seen = {i: c for i, c in state.seen.items() if _parse_time(c) >= horizon}
        for chunk in _chunks(take, BATCH_SIZE):
            dispatch(chunk, 1)
    if skipped_invalid:
        context.log.warning(
            f"[CreditSync] {len(skipped_invalid)} new instance(s) have an unusable instance_id and are not synced: "
            + ", ".join(repr(i)[:60] for i in skipped_invalid[:10])
        )

    cursor = state.dump()
    if requests:
        return SensorResult(run_requests=requests, cursor=cursor)
    if slots <= 0:
        reason = f"{len(state.inflight)} batch(es) in flight; new instances wait for a free slot"
    elif state.retry:
        reason = f"no new instances; {len(state.retry)} batch(es) waiting to be retried"
    else:
        reason = "no new instances"
    return SensorResult(skip_reason=reason, cursor=cursor)


@sensor(
    name="new_instance_sensor",
    job=instance_credit_sync_job,
    minimum_interval_seconds=MIN_INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Provisioning net: a new row in instances -> targeted sync of it (batched; look-back window "
    "for late commits; failed batches retried).",
)
def new_instance_sensor(context: SensorEvaluationContext, app_db: AppDatabaseResource) -> SensorResult:
    return evaluate_new_instance_sensor(context, app_db.get_engine())

