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


Modules: :mod:`.cursors` (the JSON cursors), :mod:`.batches` (limits, run requests and
run look-ups both nets share), :mod:`.webhook`, :mod:`.new_instance`, :mod:`.failure`.
"""

from .batches import (
    BATCH_SIZE,
    BATCH_TAG,
    FUTURE_ALLOWANCE,
    LOST_RUN_SECONDS,
    MAX_INFLIGHT_BATCHES,
    MIN_INTERVAL_SECONDS,
    NEW_INSTANCE_LOOKBACK,
    OP_NAME,
    OUTAGE_RETRY_SECONDS,
)
from .cursors import Batch, NewInstanceCursor, WebhookCursor
from .failure import credit_sync_failure_alert, failure_reason
from .new_instance import evaluate_new_instance_sensor, new_instance_sensor
from .webhook import billing_webhook_sensor, evaluate_webhook_sensor

realtime_sensors = [billing_webhook_sensor, new_instance_sensor, credit_sync_failure_alert]

__all__ = [
    "BATCH_SIZE", "BATCH_TAG", "FUTURE_ALLOWANCE", "LOST_RUN_SECONDS", "MAX_INFLIGHT_BATCHES", "MIN_INTERVAL_SECONDS",
    "NEW_INSTANCE_LOOKBACK", "OP_NAME", "OUTAGE_RETRY_SECONDS", "Batch", "NewInstanceCursor", "WebhookCursor",
    "billing_webhook_sensor", "credit_sync_failure_alert", "evaluate_new_instance_sensor", "evaluate_webhook_sensor",
    "failure_reason", "new_instance_sensor", "realtime_sensors",
]
