"""Per-instance rate limit of the "Sync credits" button (in-process).

A sliding window: at most ``limit`` syncs per instance in any ``window``
seconds. A refused request learns how long to wait (``Retry-After``). The
state lives in the serving process: with several workers or replicas each
has its own budget, so the effective limit is ``limit x processes`` (still
bounded; put a shared limiter in front when that matters).

Memory is bounded: instances whose window has passed are forgotten, and at
most ``max_tracked`` instances are tracked (the least recently seen are
dropped first).
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Decision", "RateLimiter"]


@dataclass(frozen=True)
class Decision:
    allowed: bool
    #: whole seconds to wait before the next attempt can succeed (0 when allowed)
    retry_after: int = 0


class RateLimiter:
    """At most ``limit`` acquisitions per key in any ``window`` seconds."""

    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_tracked: int = 100_000,
    ) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        if window <= 0:
            raise ValueError("window must be > 0")
        self.limit = limit
        self.window = float(window)
        self._clock = clock
        self._max_tracked = max_tracked
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, key: str) -> Decision:
        """Count one request for ``key`` if the budget allows it."""
        with self._lock:
            now = self._clock()
            horizon = now - self.window
            hits = self._hits.get(key)
            if hits is None:
                hits = self._hits[key] = deque()
            self._hits.move_to_end(key)
            while hits and hits[0] <= horizon:
                hits.popleft()
            if len(hits) >= self.limit:
                wait = hits[0] + self.window - now
                return Decision(False, max(1, math.ceil(wait)))
            hits.append(now)
            self._evict(horizon)
            return Decision(True)

    def _evict(self, horizon: float) -> None:
        # Oldest-seen first: drop keys whose newest hit is outside the window,
        # and any beyond the cap.
        while self._hits:
            key, hits = next(iter(self._hits.items()))
            if len(self._hits) > self._max_tracked or not hits or hits[-1] <= horizon:
                self._hits.popitem(last=False)
                continue
            break

    def __len__(self) -> int:
        with self._lock:
            return len(self._hits)
