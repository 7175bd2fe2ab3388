"""Sensors: the two real-time safety nets, and the failure alert.

``billing_webhook_sensor`` and ``new_instance_sensor`` turn landed rows into
``instance_credit_sync_job`` runs (targeted sync, trigger ``webhook`` /
``provisioning``); ``credit_sync_failure_alert`` logs and posts every failed
creditsync run. All three run by default; the Dagster daemon evaluates
sensors about every 5 seconds (its loop period; ``minimum_interval_seconds``
only bounds it from below).

Semantics (what "never lost, never synced twice, retried, never blocking" means)
-------------------------------------------------------------------------------

Both sensors keep a JSON cursor with a generation (random, made when the
cursor is empty, so run keys never collide with runs of an earlier cursor),
a batch counter and the batches *in flight*: ``{run_key: {ids, at}}``. A
batch is one run with ``run_key = <net>-<generation>-<n>`` and the tag
``creditsync/batch`` = that key, so the same tick evaluated twice asks for
the same run (Dagster drops the duplicate) and a tick can look its runs up.

Each tick first *settles* the in-flight batches: a batch whose run finished
(success, failure, canceled), or that has no run :data:`LOST_RUN_SECONDS`
after it was requested, leaves the cursor. At most
:data:`MAX_INFLIGHT_BATCHES` batches of at most :data:`BATCH_SIZE` rows are in
flight per sensor: under load rows wait for a free slot and are batched
together (1,000 rows landing at once are two runs, not 1,000).

Webhook rows (``billing_webhook_events``):

- The cursor holds ``hw``, the highest row ``id`` handed out. New rows are the
  unprocessed rows above ``hw``; they are triaged at once: a row whose
  ``event_id`` an earlier row already carries is marked ``duplicate_event``, a
  row without a usable instance id (column, else payload) ``unreadable`` --
  both with ``processed_at`` set, in the tick, without a run. The rest go to
  runs; the run config lists the row ids (``webhook_event_ids``) and their
  instances.
- The run *claims* its rows (``attempts + 1`` on rows still unprocessed; rows
  another run processed meanwhile are skipped), syncs, and sets
  ``processed_at`` + ``outcome`` on a row only after its instance's sync
  committed (``corrected``, ``already_correct``, ``unknown_instance``,
  ``unknown_plan``, ``invalid_record``). A row whose sync failed keeps
  ``processed_at`` null with outcome ``error`` (see :mod:`creditsync_pipeline.realtime`).
- Retries: once a batch has settled, its rows that are still unprocessed wait
  ``realtime.retry_delay(attempts)`` (5 s, 15 s, 45 s, ... capped at 1 h; kept
  in the cursor's ``wait`` map) and then go out in a new batch. Any
  unprocessed row at or below ``hw`` that is neither in flight nor waiting
  (a PostgreSQL identity value committed late, a lost run) is picked up the
  same way, so no row is ever lost. After ``realtime.MAX_ATTEMPTS`` attempts
  a row is given up: outcome ``failed``, ``processed_at`` stays null (it never
  synced), it is logged and no longer retried; the periodic full sync still
  covers the instance.
- A row is never in two in-flight batches, so one event is never synced twice
  by the sensor (a retry after a failure is a new attempt, not a duplicate).

New instances (``instances.created_at``):

- The cursor holds the watermark ``wm`` (the newest ``created_at`` handed
  out) and ``seen``, the ids handed out with ``created_at`` inside the
  look-back window. Each tick reads the instances created since
  ``wm - LOOKBACK`` (:data:`NEW_INSTANCE_LOOKBACK`, 10 minutes) and hands out
  those not ``seen``: a row committed late with an older ``created_at``
  (a long transaction, clock skew, PostgreSQL's transaction-start
  ``CURRENT_TIMESTAMP``) is still found, and nothing is synced twice. With
  an empty cursor the window starts ``LOOKBACK`` before now (a new
  deployment does not re-sync every existing instance; the full sync does).
- Nothing waits on a full sync: an instance created while a full run is in
  progress is handed out on the next tick (the two runs may overlap;
  compare-and-set and the "never older than the state it overwrites" rule
  keep the newest truth).
- A batch whose run failed is retried whole (syncing an instance again is
  harmless) after ``retry_delay``; after ``MAX_ATTEMPTS`` runs it is given
  up and logged.
"""

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from dagster import (
    DagsterRunStatus,
    DefaultSensorStatus,
    RunFailureSensorContext,
    RunRequest,
    RunsFilter,
    SensorEvaluationContext,
    SensorResult,
    run_failure_sensor,
    sensor,
)
from sqlalchemy.engine import Engine

from .. import appdb, realtime
from ..ids import instance_id_problem, log_safe
from .assets import TRIGGER_TAG
from .jobs import OUTAGE_TAG, SYNC_TAG, instance_credit_sync_job
from .resources import AlertWebhookResource, AppDatabaseResource

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


# ------------------------------------------------------------------------- cursors


@dataclass
class Batch:
    """One requested run: the rows (or instances) it covers, when it was requested."""

    ids: list[Any]
    at: float
    #: provisioning: the how-manieth run for these instances
    attempt: int = 1
    #: webhook: earlier dispatches of a row that settled without processing it (sparse)
    tries: dict[str, int] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ids": self.ids, "at": round(self.at, 3), "attempt": self.attempt}
        if self.tries:
            doc["tries"] = self.tries
        return doc

    @classmethod
    def load(cls, raw: Any) -> "Batch":
        return cls(
            ids=list(raw.get("ids", [])),
            at=float(raw.get("at", 0.0)),
            attempt=int(raw.get("attempt", 1)),
            tries={str(k): int(v) for k, v in dict(raw.get("tries", {})).items()},
        )


@dataclass
class _CursorBase:
    gen: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seq: int = 0
    inflight: dict[str, Batch] = field(default_factory=dict)

    def next_key(self, net: str) -> str:
        self.seq += 1
        return f"{net}-{self.gen}-{self.seq}"

    def _base_dump(self) -> dict[str, Any]:
        return {"v": 1, "gen": self.gen, "seq": self.seq, "inflight": {k: b.dump() for k, b in self.inflight.items()}}

    def _base_load(self, raw: dict[str, Any]) -> None:
        self.gen = str(raw["gen"])
        self.seq = int(raw.get("seq", 0))
        self.inflight = {str(k): Batch.load(v) for k, v in dict(raw.get("inflight", {})).items()}


@dataclass
class WebhookCursor(_CursorBase):
    #: highest billing_webhook_events.id handed out
    hw: int = 0
    #: row id -> [epoch seconds before which it is not retried, dispatches so far]
    wait: dict[int, list[float]] = field(default_factory=dict)

    def dump(self) -> str:
        doc = self._base_dump()
        doc.update({"hw": self.hw, "wait": {str(k): [round(v[0], 3), int(v[1])] for k, v in sorted(self.wait.items())}})
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None, log: Any = None) -> "WebhookCursor":
        state = cls()
        if not text:
            return state
        try:
            raw = json.loads(text)
            state._base_load(raw)
            state.hw = int(raw.get("hw", 0))
            state.wait = {int(k): [float(v[0]), int(v[1])] for k, v in dict(raw.get("wait", {})).items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            (log or logger).warning("[CreditSync] billing_webhook_sensor: unreadable cursor; starting over")
            return cls()
        return state


@dataclass
class NewInstanceCursor(_CursorBase):
    #: newest created_at handed out (ISO-8601), None before the first instance
    wm: str | None = None
    #: instance_id -> created_at (ISO-8601) of ids handed out inside the look-back window
    seen: dict[str, str] = field(default_factory=dict)
    #: batches waiting for a retry: {"ids", "attempt", "not_before"}
    retry: list[dict[str, Any]] = field(default_factory=list)

    def dump(self) -> str:
        doc = self._base_dump()
        doc.update({"wm": self.wm, "seen": self.seen, "retry": self.retry})
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None, log: Any = None) -> "NewInstanceCursor":
        state = cls()
        if not text:
            return state
        try:
            raw = json.loads(text)
            state._base_load(raw)
            state.wm = raw.get("wm")
            if state.wm is not None:
                _parse_time(state.wm)
            state.seen = {str(k): str(v) for k, v in dict(raw.get("seen", {})).items()}
            state.retry = [
                {"ids": list(r["ids"]), "attempt": int(r["attempt"]), "not_before": float(r["not_before"])}
                for r in list(raw.get("retry", []))
            ]
        except (ValueError, TypeError, KeyError, AttributeError):
            (log or logger).warning("[CreditSync] new_instance_sensor: unreadable cursor; starting over")
            return cls()
        return state


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


# ---------------------------------------------------------------------- shared bits


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


# ------------------------------------------------------------------- webhook sensor


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


# -------------------------------------------------------------- new instance sensor


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


# --------------------------------------------------------------------- failure alert


def failure_reason(context: RunFailureSensorContext) -> str:
    """One line: why the run failed (the step errors, else Dagster's run failure message)."""
    reasons: list[str] = []
    try:
        step_failures = context.get_step_failure_events()
    except Exception:  # noqa: BLE001 - the event log may be unavailable; fall back below
        step_failures = []
    for event in step_failures:
        data = event.step_failure_data
        text = ""
        if data is not None and data.user_failure_data is not None and data.user_failure_data.description:
            text = data.user_failure_data.description
        elif data is not None and data.error is not None:
            text = data.error.message
            head, sep, rest = text.partition(": ")
            if sep and "." in head and " " not in head:  # "package.module.ErrorClass: message"
                text = f"{head.rsplit('.', 1)[-1]}: {rest}"
        text = " ".join(text.split())
        if text.startswith("[CreditSync] "):
            text = text[len("[CreditSync] ") :]
        if text:
            reasons.append(f"{event.step_key}: {text}" if event.step_key else text)
    if not reasons:
        reasons.append(" ".join((context.failure_event.message or "run failed").split()))
    return "; ".join(reasons)[:1000]


def _redact(text: str) -> str:
    """Mask the secrets this process knows, defensively (errors never carry them by design)."""
    for name in ("BILLING_API_TOKEN", "CREDITSYNC_APP_SECRET", "CREDITSYNC_WEBHOOK_SECRET"):
        secret = os.environ.get(name, "").strip()
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return appdb.redact_url(text) if "://" in text else text


@run_failure_sensor(
    name="credit_sync_failure_alert",
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=MIN_INTERVAL_SECONDS,
    description="Logs '[CreditSync] Error running credit sync task: ...' for every failed creditsync run and posts it "
    "to the alert webhook in CREDITSYNC_ALERT_WEBHOOK_URL when that is set.",
)
def credit_sync_failure_alert(context: RunFailureSensorContext, alert_webhook: AlertWebhookResource) -> None:
    run = context.dagster_run
    trigger = run.tags.get(TRIGGER_TAG, "manual")
    message = _redact(
        f"[CreditSync] Error running credit sync task: {run.job_name} run {run.run_id[:8]} "
        f"(trigger {trigger}) failed: {failure_reason(context)}"
    )
    context.log.error(message)
    logger.error(message)
    if not alert_webhook.configured():
        return
    problem = alert_webhook.post(
        {"text": message, "job_name": run.job_name, "run_id": run.run_id, "trigger": trigger}
    )
    if problem:
        context.log.warning(f"[CreditSync] Could not post the failure alert: {problem}")


realtime_sensors = [billing_webhook_sensor, new_instance_sensor, credit_sync_failure_alert]
