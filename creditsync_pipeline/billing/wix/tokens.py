"""Per-instance access tokens of a Wix app: cached, single-flight, bounded.

Wix grants one OAuth access token per app instance (about 4 hours). A
:class:`TokenCache` keeps each until shortly before it expires -- the smaller of 5
minutes and 10 % of its lifetime before -- and asks for it once however many threads
want it at the same moment (single-flight: the others wait for that answer, a refusal
included). It holds at most ``max_entries`` tokens, least recently used out first, so
a full run over 1M instances keeps memory flat.

:func:`shared_cache` gives every provider object of the same app in the process the
same cache (``creditsync serve``, the sensors' targeted syncs and repeated runs reuse
tokens). The key is (API base, app id, a digest of the app secret): a token granted to
one secret is never handed to a provider configured with another, so a wrong secret
is noticed at once instead of hidden behind cached tokens.

Tokens never appear in a repr; the cache does not log.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime

__all__ = ["DEFAULT_MAX_ENTRIES", "TokenCache", "TokenRefused", "refresh_margin", "shared_cache"]

#: tokens kept per app (a Wix token is a few hundred bytes)
DEFAULT_MAX_ENTRIES = 10_000
#: refresh at most this long before a token expires
MAX_MARGIN_SECONDS = 300.0


class TokenRefused(Exception):
    """Wix refused a token for this one instance (the app is no longer installed there)."""

    def __init__(self, sent_at: datetime, reason: str) -> None:
        super().__init__(reason)
        self.sent_at = sent_at
        self.reason = reason


def refresh_margin(lifetime: float) -> float:
    """How long before expiry a token is replaced: min(5 minutes, 10 % of its lifetime)."""
    return min(MAX_MARGIN_SECONDS, 0.1 * lifetime)


class _Flight:
    """One token request in progress; waiters read its outcome."""

    __slots__ = ("done", "error", "token")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.token: str | None = None
        self.error: BaseException | None = None


class TokenCache:
    """instance id -> access token, until shortly before it expires (thread-safe)."""

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, *, clock: Callable[[], float] = time.monotonic) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self._clock = clock
        self._lock = threading.Lock()
        self._tokens: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._flights: dict[str, _Flight] = {}
        #: tokens granted (requests that returned one) and answers served from the cache
        self.granted = 0
        self.hits = 0

    def __repr__(self) -> str:
        return f"TokenCache(entries={len(self)}, max_entries={self.max_entries})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._tokens)

    def get(self, instance_id: str, fetch: Callable[[], tuple[str, float | None]]) -> str:
        """The instance's valid token, from the cache or from ``fetch()`` (called once at a time).

        ``fetch`` returns (token, lifetime in seconds or None: not cached). Its exception
        reaches every thread that waited for it.
        """
        with self._lock:
            cached = self._tokens.get(instance_id)
            if cached is not None:
                if cached[1] > self._clock():
                    self._tokens.move_to_end(instance_id)
                    self.hits += 1
                    return cached[0]
                del self._tokens[instance_id]
            flight = self._flights.get(instance_id)
            leader = flight is None
            if leader:
                flight = self._flights[instance_id] = _Flight()
        assert flight is not None
        if not leader:
            flight.done.wait()
            if flight.error is not None:
                raise _copy(flight.error)
            assert flight.token is not None
            return flight.token
        started = self._clock()
        try:
            token, lifetime = fetch()
        except BaseException as exc:
            flight.error = exc
            raise
        else:
            flight.token = token
            with self._lock:
                self.granted += 1
                if lifetime is not None and lifetime > 0:
                    self._tokens[instance_id] = (token, started + lifetime - refresh_margin(lifetime))
                    self._tokens.move_to_end(instance_id)
                    while len(self._tokens) > self.max_entries:
                        self._tokens.popitem(last=False)
            return token
        finally:
            with self._lock:
                self._flights.pop(instance_id, None)
            flight.done.set()

    def drop(self, instance_id: str, token: str | None = None) -> None:
        """Forget the instance's token (only if it is still ``token``, when given)."""
        with self._lock:
            cached = self._tokens.get(instance_id)
            if cached is not None and (token is None or cached[0] == token):
                del self._tokens[instance_id]

    def clear(self) -> None:
        with self._lock:
            self._tokens.clear()


def _copy(exc: BaseException) -> BaseException:
    """An equal exception for another thread to raise (its own traceback)."""
    if isinstance(exc, TokenRefused):
        return TokenRefused(exc.sent_at, exc.reason)
    try:
        return type(exc)(str(exc))
    except Exception:  # noqa: BLE001 - an exception type with another signature
        return exc


_SHARED: dict[tuple[str, str, str], TokenCache] = {}
_SHARED_LOCK = threading.Lock()


def shared_cache(api_base: str, app_id: str, app_secret: str) -> TokenCache:
    """The process-wide cache of one app (see the module docstring for the key)."""
    digest = hashlib.sha256(app_secret.encode("utf-8", "surrogatepass")).hexdigest()[:32]
    key = (api_base.rstrip("/"), app_id, digest)
    with _SHARED_LOCK:
        cache = _SHARED.get(key)
        if cache is None:
            cache = _SHARED[key] = TokenCache()
        return cache
