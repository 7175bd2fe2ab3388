"""Receivers sync at once: the rows a webhook receiver landed are synced in this process.

SPEC "Real-time nets": right after the 2xx, the receiving process runs the targeted sync
of the event's instance and marks the row processed; the webhook sensor settles every row
the receiver did not (crash, restart, overload, rows landed by the app's own handler).

How it stays safe and bounded:

* A row is landed *with a lease* held by this process (``appdb.land_webhook_event(...,
  lease_owner=...)``) only when a slot is free (:meth:`ReceiverSync.reserve`); the sensor
  never hands out a held row, and :func:`creditsync_pipeline.realtime.run_batch` claims it
  under the same owner, so one event is never synced twice at the same time. A lease
  that ran out (this process crashed) frees the row for the sensor.
* ``workers`` threads (default 2) do the syncs; at most ``max_pending`` rows wait. A burst
  beyond that is landed without a lease and left to the sensor: no thread per request,
  no unbounded queue.
* Rows that arrive together are synced together (one targeted sync per batch drained from
  the queue), so a burst costs a few runs, not one per row.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import uuid
from collections.abc import Callable

from sqlalchemy.engine import Engine

from .. import realtime, sync
from ..billing import BillingProvider

__all__ = ["ReceiverSync"]

logger = logging.getLogger("creditsync.server")
sync_logger = logging.getLogger("creditsync")

_STOP = object()


class ReceiverSync:
    """A small, bounded pool that syncs landed webhook rows in the background."""

    def __init__(
        self,
        engine: Engine,
        billing: BillingProvider,
        *,
        workers: int = 2,
        max_pending: int = 500,
        batch: int = 100,
        lease_seconds: float = 300.0,
        on_done: Callable[[list[int]], None] | None = None,
    ) -> None:
        if workers < 1 or max_pending < 1 or batch < 1:
            raise ValueError("workers, max_pending and batch must be >= 1")
        self.engine = engine
        self.billing = billing
        self.batch = batch
        self.lease_seconds = lease_seconds
        #: who holds the leases this process takes (host, pid and a random part)
        self.owner = f"receiver:{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._slots = threading.BoundedSemaphore(max_pending)
        self._queue: queue.Queue[object] = queue.Queue()
        self._on_done = on_done
        self._closing = threading.Event()
        self._threads = [
            threading.Thread(target=self._work, name=f"creditsync-receiver-{n}", daemon=True) for n in range(workers)
        ]
        for thread in self._threads:
            thread.start()

    # -- the receiver's side --------------------------------------------------------------

    def reserve(self) -> bool:
        """Take a slot for one row; False when the pool is full or closing (the sensor syncs it)."""
        if self._closing.is_set():
            return False
        return self._slots.acquire(blocking=False)

    def cancel(self) -> None:
        """Give back a slot whose row was not leased to us (landing failed, a redelivery)."""
        self._slots.release()

    def submit(self, row_id: int) -> None:
        """Sync a row this process landed and holds (its slot was reserved)."""
        self._queue.put(int(row_id))

    # -- the workers ----------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            ids = [int(item)]  # type: ignore[arg-type]
            while len(ids) < self.batch:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # let this batch finish, then stop
                    break
                ids.append(int(more))  # type: ignore[arg-type]
            try:
                self._sync(ids)
            finally:
                for _ in ids:
                    self._slots.release()
                if self._on_done is not None:
                    self._on_done(ids)

    def _sync(self, ids: list[int]) -> None:
        run_id = sync.new_run_id()
        try:
            result = realtime.run_batch(
                self.engine, self.billing, webhook_event_ids=ids, trigger="webhook", run_id=run_id,
                log=sync_logger, lease_owner=self.owner,
            )
        except Exception as exc:  # noqa: BLE001 - the rows keep their lease until it runs out; the sensor retries
            sync_logger.error(
                "[CreditSync] Error running credit sync task: the receiver could not sync %d webhook row(s) (%s); "
                "the webhook sensor will", len(ids), sync.one_line(exc),
            )
            return
        if result.failed:
            sync_logger.warning(
                "[CreditSync] The receiver left %d webhook row(s) to the sensor: %s",
                len(result.instances.errors) + len(result.invalid_ids), result.failure_summary(),
            )

    # -- shutdown -------------------------------------------------------------------------

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking rows, finish the ones queued (within ``timeout``), stop the workers.

        Rows still queued after the timeout keep their lease until it runs out; the webhook
        sensor then syncs them.
        """
        self._closing.set()
        for _ in self._threads:
            self._queue.put(_STOP)
        per_thread = timeout / max(1, len(self._threads))
        for thread in self._threads:
            thread.join(per_thread)
        left = sum(1 for t in self._threads if t.is_alive())
        if left:
            logger.warning("[CreditSync] %d receiver worker(s) still busy at shutdown; the sensor settles their rows", left)
