"""``billing_webhook_sensor``: landed webhook rows -> targeted runs (semantics in the package docstring)."""

import time

from dagster import DefaultSensorStatus, RunRequest, SensorEvaluationContext, SensorResult, sensor
from sqlalchemy.engine import Engine

from ... import appdb, realtime
from ..jobs import instance_credit_sync_job
from ..resources import AppDatabaseResource
from .batches import (
    BATCH_SIZE, MAX_INFLIGHT_BATCHES, MIN_INTERVAL_SECONDS, OUTAGE_RETRY_SECONDS, _batch_done, _chunks, _held,
    _run_request,
)
from .cursors import Batch, WebhookCursor


def evaluate_webhook_sensor(context: SensorEvaluationContext, engine: Engine, *, now: float | None = None) -> SensorResult:
    """One tick of ``billing_webhook_sensor`` (see the module docstring)."""
    now = time.time() if now is None else now
    state = WebhookCursor.load(context.cursor, context.log)

    # Settle: rows of finished batches that are still unprocessed wait for a retry.
    finished: dict[int, int] = {}  # row id -> dispatches so far
    for key, batch in list(state.inflight.items()):
        if _batch_done(context, key, batch, now) is not None:
            finished.update({int(i): batch.tries.get(str(i), 0) + 1 for i in batch.ids})
            del state.inflight[key]
    if finished:
        gave_up: dict[int, str] = {}
        for row in appdb.webhook_events_by_id(engine, finished):
            if row.processed_at is not None:
                continue
            # attempts counts the failures that were this row's own (an outage of billing
            # or the database gives its attempt back): only they use up the retry budget.
            # Dispatches (runs that failed before claiming, outages) only space the retries.
            if row.attempts >= realtime.MAX_ATTEMPTS:
                if row.outcome != realtime.FAILED:
                    gave_up[row.id] = realtime.FAILED
                continue
            delay = realtime.retry_delay(max(row.attempts, finished[row.id]))
            if row.outcome == realtime.WAITING or row.attempts < finished[row.id]:
                delay = min(delay, OUTAGE_RETRY_SECONDS)  # settle soon after billing is back
            state.wait[row.id] = [now + delay, finished[row.id]]
        if gave_up:
            appdb.mark_webhook_events(engine, gave_up, processed=False)
            context.log.error(
                f"[CreditSync] Gave up on {len(gave_up)} webhook row(s) after {realtime.MAX_ATTEMPTS} attempts "
                f"(ids {', '.join(map(str, sorted(gave_up)[:20]))}); the periodic full sync still covers their instances"
            )

    slots = MAX_INFLIGHT_BATCHES - len(state.inflight)
    requests: list[RunRequest] = []
    junk: dict[int, str] = {}
    db_now = appdb.database_now(engine)
    if slots > 0:
        budget = slots * BATCH_SIZE
        candidates: list[appdb.WebhookEvent] = []
        if state.hw > 0:
            inflight_ids = {int(i) for b in state.inflight.values() for i in b.ids}
            limit = len(inflight_ids) + len(state.wait) + budget
            older = appdb.unprocessed_webhook_events(
                engine, upto_id=state.hw, max_attempts=realtime.MAX_ATTEMPTS,
                skip_outcomes=(realtime.FAILED,), limit=limit, now=db_now,
            )
            if len(older) < limit:  # complete: forget waits of rows settled or given up meanwhile
                pending = {row.id for row in older}
                state.wait = {i: t for i, t in state.wait.items() if i in pending}
            for row in older:
                if row.id in inflight_ids or (row.id in state.wait and state.wait[row.id][0] > now):
                    continue
                candidates.append(row)
                if len(candidates) >= budget:
                    break
        room = budget - len(candidates)
        if room > 0:
            fresh = appdb.unprocessed_webhook_events(engine, after_id=state.hw, limit=room)
            if fresh:
                state.hw = fresh[-1].id
            # A row a receiver holds (it is syncing it right now) is not handed out; once
            # settled it is processed, and if its sync failed the older-rows pass retries it.
            candidates.extend(row for row in fresh if not _held(row, db_now))

        good: list[tuple[int, str]] = []
        prior: dict[int, int] = {}
        for row in candidates:
            waited = state.wait.pop(row.id, None)
            if waited is not None and waited[1] > 0:
                prior[row.id] = int(waited[1])
            if row.duplicate:
                junk[row.id] = realtime.DUPLICATE_EVENT
                continue
            name, problem = realtime.event_instance_id(row.instance_id, row.payload)
            if name is None:
                junk[row.id] = realtime.UNREADABLE
                context.log.warning(f"[CreditSync] Webhook row {row.id} is unreadable: {problem}")
            else:
                good.append((row.id, name))
        if junk:
            appdb.mark_webhook_events(engine, junk)
        good.sort()
        for chunk in _chunks(good, BATCH_SIZE):
            key = state.next_key("webhook")
            row_ids = [row_id for row_id, _ in chunk]
            instance_ids = list(dict.fromkeys(name for _, name in chunk))
            tries = {str(i): prior[i] for i in row_ids if i in prior}
            state.inflight[key] = Batch(ids=row_ids, at=now, tries=tries)
            requests.append(_run_request(key, "webhook", instance_ids, row_ids))

    cursor = state.dump()
    if requests:
        return SensorResult(run_requests=requests, cursor=cursor)
    if junk:
        reason = f"marked {len(junk)} unusable webhook row(s); nothing to sync"
    elif slots <= 0:
        reason = f"{len(state.inflight)} batch(es) in flight; new rows wait for a free slot"
    else:
        reason = "no unprocessed webhook rows"
    return SensorResult(skip_reason=reason, cursor=cursor)


@sensor(
    name="billing_webhook_sensor",
    job=instance_credit_sync_job,
    minimum_interval_seconds=MIN_INTERVAL_SECONDS,
    default_status=DefaultSensorStatus.RUNNING,
    description="Webhook net: a landed billing_webhook_events row -> targeted sync of the instance it names "
    "(batched; processed_at set after the sync committed; failed rows retried).",
)
def billing_webhook_sensor(context: SensorEvaluationContext, app_db: AppDatabaseResource) -> SensorResult:
    return evaluate_webhook_sensor(context, app_db.get_engine())

