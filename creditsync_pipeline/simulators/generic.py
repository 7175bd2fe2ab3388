"""The generic billing simulator: a real HTTP server speaking the SPEC "Billing API" contract.

Used by the tests, the end-to-end suite, the benchmarks and the demo. It serves
``GET /v1/subscriptions`` (keyset-paginated) and ``GET /v1/subscriptions/{id}`` (404
``{"error": "subscription_not_found"}`` for an instance without a subscription) behind a
bearer token, with the faults of :mod:`.base`, and can be driven from another process
through unauthenticated ``/_sim/...`` admin endpoints (``PUT``/``DELETE
/_sim/subscriptions/{id}`` beside the common ones).

Records are stored exactly as given (never validated) so that deliberately invalid data
can be served.

Run it standalone::

    BILLING_API_TOKEN=... python -m creditsync_pipeline.simulators.generic --port 8765 --records records.json
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import itertools
import json
import os
import random
import sys
from collections.abc import Iterable, Iterator
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from typing import Any
from urllib.parse import parse_qs, unquote

from .base import MISSING, NOT_FOUND_HTML, FAULT_KINDS, Handler, Simulator, consteq, serve_until_signalled

__all__ = [
    "BillingSimulator", "FAULT_KINDS", "FAULT_ENDPOINTS", "SYNTHETIC_PLANS",
    "decode_cursor", "encode_cursor", "generate_records", "main",
]

FAULT_ENDPOINTS = ("list", "one", "any")
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_LIST_PATH = "/v1/subscriptions"
_ONE_PREFIX = "/v1/subscriptions/"
_ADMIN_RECORD_PREFIX = "/_sim/subscriptions/"
_CURSOR_PREFIX = "k"


def encode_cursor(instance_id: str) -> str:
    """Opaque keyset cursor for "everything after ``instance_id``" (never empty)."""
    raw = instance_id.encode("utf-8", "surrogatepass")
    return _CURSOR_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> str:
    """Inverse of :func:`encode_cursor`; ValueError when the cursor is not one of ours."""
    if not cursor.startswith(_CURSOR_PREFIX):
        raise ValueError("invalid cursor")
    body = cursor[len(_CURSOR_PREFIX):]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
        return raw.decode("utf-8", "surrogatepass")
    except (binascii.Error, ValueError) as exc:
        raise ValueError("invalid cursor") from exc


class BillingSimulator(Simulator):
    """In-memory billing API served over real HTTP (see the module docstring).

    Records are kept in a dict keyed by ``instance_id`` plus a sorted id list that is
    maintained incrementally, so a page costs O(log N + limit) even at 1M records.
    """

    ENDPOINTS = ("list", "one")

    def __init__(
        self,
        records: Iterable[Any] = (),
        *,
        token: str = "sim-token",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        self._token = token
        #: the 404 body for an instance without a record: the contract's, or (tests) what a
        #: framework or gateway in front of a billing API answers ({"detail": "Not Found"})
        self.not_found_body: dict[str, Any] = {"error": "subscription_not_found"}
        self._records: dict[str, Any] = {}
        self._ids: list[str] = []
        self._synthetic = itertools.count(1)
        self.set_records(records)

    def __repr__(self) -> str:
        state = self.base_url if self._server is not None else "stopped"
        return f"BillingSimulator({state}, records={len(self._ids)})"

    # -- the API --------------------------------------------------------------------------

    def route(self, handler: Handler, method: str, path: str, query: str, body: bytes) -> None:
        if path in (_LIST_PATH, _LIST_PATH + "/"):
            endpoint, raw_id = "list", None
        elif path.startswith(_ONE_PREFIX):
            endpoint, raw_id = "one", path[len(_ONE_PREFIX):]
        else:
            # Like a typical web server/gateway: a path outside the API gets an HTML 404,
            # which is what a client with a wrong base URL would really see.
            handler.send(404, NOT_FOUND_HTML, content_type="text/html; charset=utf-8")
            return
        if method not in ("GET", "HEAD"):
            handler.error(405, "method_not_allowed")
            return
        if handler.fault(endpoint, bad_shape={"items": []} if endpoint == "list" else []):
            return
        if not self._authorized(handler.headers.get("Authorization")):
            handler.error(401, "unauthorized", "missing or invalid bearer token")
            return
        if raw_id is None:
            self._serve_list(handler, query)
        else:
            self._serve_one(handler, raw_id)

    def _serve_list(self, handler: Handler, query: str) -> None:
        params = parse_qs(query, keep_blank_values=True)
        limit = DEFAULT_LIMIT
        if "limit" in params:
            try:
                limit = int(params["limit"][-1])
            except ValueError:
                limit = -1
            if not 1 <= limit <= MAX_LIMIT:
                handler.error(400, "invalid_limit", f"limit must be an integer between 1 and {MAX_LIMIT}")
                return
        after: str | None = None
        if params.get("cursor", [""])[-1]:
            try:
                after = decode_cursor(params["cursor"][-1])
            except ValueError:
                handler.error(400, "invalid_cursor")
                return
        page, next_after = self._page(after, limit)
        next_cursor = encode_cursor(next_after) if next_after is not None else None
        handler.json(200, {"data": page, "next_cursor": next_cursor})

    def _serve_one(self, handler: Handler, raw_id: str) -> None:
        if "/" in raw_id or not raw_id:
            handler.error(404, "not_found")  # no such route: not the contract's "no subscription"
            return
        try:
            instance_id = unquote(raw_id, errors="strict")
        except UnicodeDecodeError:
            handler.error(400, "bad_request", "instance id is not valid UTF-8")
            return
        record = self._get(instance_id)
        if record is MISSING:
            handler.json(404, self.not_found_body)
        else:
            handler.json(200, record)

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and consteq(value.strip(), self._token)

    # -- admin ----------------------------------------------------------------------------

    def admin(self, handler: Handler, method: str, path: str, body: bytes) -> bool:
        if not path.startswith(_ADMIN_RECORD_PREFIX):
            return False
        raw_id = path[len(_ADMIN_RECORD_PREFIX):]
        if not raw_id or "/" in raw_id:
            handler.error(404, "not_found")
            return True
        try:
            key = unquote(raw_id, errors="strict")
        except UnicodeDecodeError:
            handler.error(400, "bad_request", "instance id is not valid UTF-8")
            return True
        if method == "PUT":
            record = handler.json_body(body)
            if record is not MISSING:
                self.upsert(record, key=key)
                handler.json(200, {"ok": True})
        elif method == "DELETE":
            handler.json(200, {"deleted": self.delete(key)})
        else:
            handler.error(405, "method_not_allowed")
        return True

    def health(self) -> dict[str, Any]:
        doc = super().health()
        with self._lock:
            doc["records"] = len(self._ids)
        return doc

    # -- data -----------------------------------------------------------------------------

    def _key_for(self, record: Any) -> str:
        if isinstance(record, dict) and isinstance(record.get("instance_id"), str):
            return record["instance_id"]
        # Deliberately invalid records (no usable id) still need a storage slot.
        return f"~sim-invalid-{next(self._synthetic):08d}"

    def upsert(self, record: Any, *, key: str | None = None) -> None:
        """Insert or replace a record (stored as given, not validated).

        ``key`` defaults to ``record["instance_id"]``; records without a string id get
        a synthetic key so invalid data can be served too.
        """
        stored = dict(record) if isinstance(record, dict) else record
        with self._lock:
            k = key if key is not None else self._key_for(record)
            if k not in self._records:
                bisect.insort(self._ids, k)
            self._records[k] = stored

    def delete(self, instance_id: str) -> bool:
        """Remove a record; True when it existed."""
        with self._lock:
            if self._records.pop(instance_id, MISSING) is MISSING:
                return False
            i = bisect.bisect_left(self._ids, instance_id)
            del self._ids[i]
            return True

    def set_records(self, records: Iterable[Any]) -> None:
        """Replace all records (last one wins for a repeated id)."""
        new: dict[str, Any] = {}
        for record in records:
            new[self._key_for(record)] = dict(record) if isinstance(record, dict) else record
        ids = sorted(new)
        with self._lock:
            self._records, self._ids = new, ids

    def records(self) -> list[Any]:
        """All records in id order (shallow copies)."""
        with self._lock:
            return [dict(r) if isinstance(r, dict) else r for r in (self._records[k] for k in self._ids)]

    def __len__(self) -> int:
        with self._lock:
            return len(self._ids)

    def _page(self, after: str | None, limit: int) -> tuple[list[Any], str | None]:
        with self._lock:
            start = 0 if after is None else bisect.bisect_right(self._ids, after)
            keys = self._ids[start:start + limit]
            page = [self._records[k] for k in keys]
            more = start + limit < len(self._ids)
        return page, (keys[-1] if more and keys else None)

    def _get(self, instance_id: str) -> Any:
        with self._lock:
            return self._records.get(instance_id, MISSING)


#: Plans of the synthetic data set (``plan_id``, ``credits``, ``is_free``), as an app would sell them.
SYNTHETIC_PLANS = (("free", 100, True), ("starter", 1000, False), ("pro", 5000, False), ("team", 20000, False))
#: (status, period end in days from the anchor or None, weight): what a paid app's billing looks like.
_SYNTHETIC_STATUSES = (
    ("active", 30, 70),
    ("trialing", 14, 5),
    ("past_due", 3, 5),
    ("canceled", 20, 5),  # paid through the period: still entitled
    ("canceled", -20, 3),
    ("canceled", None, 2),
    ("expired", -40, 10),
)
_SYNTHETIC_PAID = (("starter", 40), ("pro", 40), ("team", 20))


def synthetic_instance_id(seed: int, index: int) -> str:
    """The id of synthetic instance ``index``: unique, not in index order (like real ids)."""
    mixed = ((index + 1) * 0x9E3779B97F4A7C15 + seed * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
    return f"inst-{mixed:016x}"


def generate_records(n: int, *, seed: int = 0, anchor: date | None = None) -> list[dict[str, Any]]:
    """``n`` deterministic synthetic subscription records, one per instance (benchmarks, load tests).

    The same ``(n, seed, anchor)`` always gives the same records. Dates are whole days
    away from ``anchor`` (default: today, UTC), so whether a record entitles does not
    depend on the hour it is evaluated at.
    """
    if n < 0:
        raise ValueError("n must be >= 0")
    rng = random.Random(seed)
    day = datetime.combine(anchor or datetime.now(timezone.utc).date(), dt_time(), tzinfo=timezone.utc)
    statuses = rng.choices(
        [(s, d) for s, d, _ in _SYNTHETIC_STATUSES], weights=[w for *_, w in _SYNTHETIC_STATUSES], k=n
    )
    plans = rng.choices([p for p, _ in _SYNTHETIC_PAID], weights=[w for _, w in _SYNTHETIC_PAID], k=n)
    # updated_at: 2..300 days before the anchor, at a random second of that day.
    days_ago = [(day - timedelta(days=d)).strftime("%Y-%m-%d") for d in range(2, 301)]
    clock = [f"T{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}Z" for s in range(86_400)]
    ages = [rng.randrange(len(days_ago)) for _ in range(n)]
    seconds = [rng.randrange(86_400) for _ in range(n)]
    ends = {
        d: None if d is None else (day + timedelta(days=d)).strftime("%Y-%m-%dT%H:%M:%SZ")
        for _, d, _ in _SYNTHETIC_STATUSES
    }
    return [
        {
            "instance_id": synthetic_instance_id(seed, i),
            "plan_id": plans[i],
            "status": status,
            "current_period_end": ends[days],
            "updated_at": days_ago[ages[i]] + clock[seconds[i]],
        }
        for i, (status, days) in enumerate(statuses)
    ]


def _load_records(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return iter(data)


def _load_records(path: str) -> Iterator[Any]:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records")
    return iter(data)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.simulators.generic",
        description="Billing API simulator (token from BILLING_API_TOKEN, default 'sim-token').",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--records", metavar="FILE.json", help="a JSON list of subscription records")
    parser.add_argument(
        "--generate", type=int, metavar="N", help="serve N synthetic records instead (see generate_records)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --generate (default 0)")
    parser.add_argument(
        "--anchor", type=date.fromisoformat, metavar="YYYY-MM-DD", help="anchor day of --generate (default today, UTC)"
    )
    args = parser.parse_args(argv)
    if args.records and args.generate is not None:
        parser.error("--records and --generate are mutually exclusive")

    token = os.environ.get("BILLING_API_TOKEN") or "sim-token"
    try:
        if args.generate is not None:
            records: Iterable[Any] = generate_records(args.generate, seed=args.seed, anchor=args.anchor)
        else:
            records = _load_records(args.records) if args.records else ()
        sim = BillingSimulator(records, token=token, host=args.host, port=args.port)
        sim.start()
    except (OSError, ValueError) as exc:
        print(f"billing simulator: {exc}", file=sys.stderr)
        return 2
    return serve_until_signalled(sim, lambda: f"billing simulator listening on {sim.base_url}")


if __name__ == "__main__":
    sys.exit(main())
