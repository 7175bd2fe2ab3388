"""A billing API simulator: a real HTTP server speaking the SPEC "Billing API" contract.

Used by the tests, the end-to-end suite and the demo. It serves
``GET /v1/subscriptions`` (keyset-paginated) and ``GET /v1/subscriptions/{id}``
behind a bearer token, can inject faults (429, 500, dropped connections, slow,
malformed and wrongly shaped responses) and can be driven from another process
through unauthenticated ``/_sim/...`` admin endpoints.

Records are stored exactly as given (never validated) so that deliberately
invalid data can be served.

Run it standalone::

    BILLING_API_TOKEN=... python -m creditsync_pipeline.simulator --port 8765 --records records.json
"""

from __future__ import annotations

import argparse
import base64
import binascii
import bisect
import hmac
import itertools
import json
import logging
import os
import random
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from datetime import time as dt_time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

__all__ = ["BillingSimulator", "FAULT_KINDS", "FAULT_ENDPOINTS", "SYNTHETIC_PLANS", "generate_records", "main"]

logger = logging.getLogger("creditsync.simulator")

FAULT_KINDS = ("rate_limit", "error", "drop", "slow", "malformed", "bad_shape")
FAULT_ENDPOINTS = ("list", "one", "any")

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
_LIST_PATH = "/v1/subscriptions"
_ONE_PREFIX = "/v1/subscriptions/"
_ADMIN_RECORD_PREFIX = "/_sim/subscriptions/"
_MAX_BODY = 64 * 1024 * 1024
_CURSOR_PREFIX = "k"
_MALFORMED_HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>"
)

_NOT_FOUND_HTML = (
    b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
)


@dataclass
class _Fault:
    """One injected fault rule (mutable counters guarded by the simulator lock)."""

    kind: str
    endpoint: str
    after: int
    count: int | None
    retry_after: float | str | None
    delay: float
    seen: int = 0
    fired: int = 0

    @property
    def exhausted(self) -> bool:
        return self.count is not None and self.fired >= self.count

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "endpoint": self.endpoint,
            "after": self.after,
            "count": self.count,
            "retry_after": self.retry_after,
            "delay": self.delay,
            "seen": self.seen,
            "fired": self.fired,
        }


def _validate_fault(
    kind: Any, endpoint: Any, after: Any, count: Any, retry_after: Any, delay: Any
) -> _Fault:
    """Build a fault rule, raising ValueError on bad parameters."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    if endpoint not in FAULT_ENDPOINTS:
        raise ValueError(f"unknown fault endpoint {endpoint!r}; expected one of {', '.join(FAULT_ENDPOINTS)}")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError("fault 'after' must be an integer >= 0")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError("fault 'count' must be an integer >= 1 or None (persistent)")
    if retry_after is not None and (
        isinstance(retry_after, bool) or not isinstance(retry_after, (int, float, str))
    ):
        raise ValueError("fault 'retry_after' must be a number, a string or None")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError("fault 'delay' must be a number >= 0")
    return _Fault(kind, endpoint, after, count, retry_after, float(delay))


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


def _format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Server(ThreadingHTTPServer):
    """Threading server that tracks live connections so stop() can cut keep-alives."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], sim: BillingSimulator) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns = list(self._conns)
            self._conns.clear()
        for conn in conns:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # Clients hanging up (timeouts, dropped keep-alives) are normal here: stay quiet.
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            logger.debug("connection from %s ended: %s", client_address, type(exc).__name__)
            return
        logger.exception("billing simulator: unexpected error while handling a request")


class _Handler(BaseHTTPRequestHandler):
    """Request handler; all state lives on ``self.server.sim``."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "BillingSimulator/1.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True  # headers and body go out in two writes

    # -- plumbing ---------------------------------------------------------------------------

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet access log (debug level, request line only; headers are never logged)."""
        logger.debug("%s " + format, self.address_string(), *args)

    def _send(
        self,
        status: int,
        body: bytes,
        content_type: str = "application/json",
        headers: dict[str, str] | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(payload).encode("ascii"), headers=headers)

    def _error(self, status: int, error: str, message: str | None = None) -> None:
        payload: dict[str, Any] = {"error": error}
        if message:
            payload["message"] = message
        self._json(status, payload)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON errors for protocol-level failures too (bad request line, etc.)."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._error(code, phrase.lower().replace(" ", "_"), message)

    def _read_body(self) -> bytes | None:
        """Read the request body (Content-Length only); None after sending an error."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self._error(411, "length_required", "chunked request bodies are not supported")
            return None
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header else 0
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self.close_connection = True
            self._error(400, "bad_request", "invalid Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    # -- dispatch ---------------------------------------------------------------------------

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def _dispatch(self, method: str) -> None:
        body = self._read_body()
        if body is None:
            return
        parts = urlsplit(self.path)
        path = parts.path
        if path.startswith("/_sim/"):
            self._admin(method, path, body)
            return
        if path in (_LIST_PATH, _LIST_PATH + "/"):
            endpoint, raw_id = "list", None
        elif path.startswith(_ONE_PREFIX):
            endpoint, raw_id = "one", path[len(_ONE_PREFIX):]
        else:
            # Like a typical web server/gateway: a path outside the API gets an HTML 404,
            # which is what a client with a wrong base URL would really see.
            self._send(404, _NOT_FOUND_HTML, content_type="text/html; charset=utf-8")
            return
        if method not in ("GET", "HEAD"):
            self._error(405, "method_not_allowed")
            return
        sim = self.server.sim
        fault = sim._next_fault(endpoint)
        if fault is not None:
            if fault.kind == "slow":
                time.sleep(fault.delay)
            elif self._apply_fault(fault, endpoint):
                return
        if not sim._authorized(self.headers.get("Authorization")):
            self._error(401, "unauthorized", "missing or invalid bearer token")
            return
        if endpoint == "list":
            self._serve_list(parts.query)
        else:
            assert raw_id is not None
            self._serve_one(raw_id)

    def _apply_fault(self, fault: _Fault, endpoint: str) -> bool:
        """Serve ``fault``; True when the response is complete (no normal serving)."""
        if fault.kind == "rate_limit":
            headers = {}
            if fault.retry_after is not None:
                headers["Retry-After"] = _format_retry_after(fault.retry_after)
            self._json(429, {"error": "rate_limited"}, headers=headers)
        elif fault.kind == "error":
            self._error(500, "internal_error", "simulated failure")
        elif fault.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif fault.kind == "malformed":
            self._send(200, _MALFORMED_HTML, content_type="text/html; charset=utf-8")
        elif fault.kind == "bad_shape":
            self._json(200, {"items": []} if endpoint == "list" else [])
        else:  # pragma: no cover - validated on creation
            return False
        return True

    # -- API --------------------------------------------------------------------------------

    def _serve_list(self, query: str) -> None:
        params = parse_qs(query, keep_blank_values=True)
        limit = DEFAULT_LIMIT
        if "limit" in params:
            raw_limit = params["limit"][-1]
            try:
                limit = int(raw_limit)
            except ValueError:
                limit = -1
            if not 1 <= limit <= MAX_LIMIT:
                self._error(400, "invalid_limit", f"limit must be an integer between 1 and {MAX_LIMIT}")
                return
        after: str | None = None
        if params.get("cursor", [""])[-1]:
            try:
                after = decode_cursor(params["cursor"][-1])
            except ValueError:
                self._error(400, "invalid_cursor")
                return
        page, next_after = self.server.sim._page(after, limit)
        next_cursor = encode_cursor(next_after) if next_after is not None else None
        self._json(200, {"data": page, "next_cursor": next_cursor})

    def _serve_one(self, raw_id: str) -> None:
        if "/" in raw_id or not raw_id:
            self._error(404, "not_found")
            return
        try:
            instance_id = unquote(raw_id, errors="strict")
        except UnicodeDecodeError:
            self._error(400, "bad_request", "instance id is not valid UTF-8")
            return
        record = self.server.sim._get(instance_id)
        if record is _MISSING:
            self._error(404, "not_found")
        else:
            self._json(200, record)

    # -- admin ------------------------------------------------------------------------------

    def _admin(self, method: str, path: str, body: bytes) -> None:
        sim = self.server.sim
        if path == "/_sim/health" and method in ("GET", "HEAD"):
            self._json(200, sim._health())
            return
        if path == "/_sim/faults":
            if method == "DELETE":
                sim.clear_faults()
                self._json(200, {"ok": True})
                return
            if method == "POST":
                spec = self._json_body(body)
                if spec is _MISSING:
                    return
                if not isinstance(spec, dict) or "kind" not in spec:
                    self._error(400, "bad_request", "expected a JSON object with at least 'kind'")
                    return
                unknown = set(spec) - {"kind", "endpoint", "after", "count", "retry_after", "delay"}
                if unknown:
                    self._error(400, "bad_request", f"unknown fault fields: {sorted(unknown)}")
                    return
                try:
                    sim.add_fault(spec.pop("kind"), **spec)
                except (TypeError, ValueError) as exc:
                    self._error(400, "bad_request", str(exc))
                    return
                self._json(201, {"ok": True})
                return
            if method == "GET":
                self._json(200, {"faults": sim._faults_snapshot()})
                return
            self._error(405, "method_not_allowed")
            return
        if path.startswith(_ADMIN_RECORD_PREFIX):
            raw_id = path[len(_ADMIN_RECORD_PREFIX):]
            if not raw_id or "/" in raw_id:
                self._error(404, "not_found")
                return
            try:
                key = unquote(raw_id, errors="strict")
            except UnicodeDecodeError:
                self._error(400, "bad_request", "instance id is not valid UTF-8")
                return
            if method == "PUT":
                record = self._json_body(body)
                if record is _MISSING:
                    return
                sim.upsert(record, key=key)
                self._json(200, {"ok": True})
                return
            if method == "DELETE":
                self._json(200, {"deleted": sim.delete(key)})
                return
            self._error(405, "method_not_allowed")
            return
        self._error(404, "not_found")

    def _json_body(self, body: bytes) -> Any:
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError):
            self._error(400, "bad_request", "request body is not valid JSON")
            return _MISSING


_MISSING: Any = object()


class BillingSimulator:
    """In-memory billing API served over real HTTP (see module docstring).

    Records are kept in a dict keyed by ``instance_id`` plus a sorted id list that is
    maintained incrementally, so a page costs O(log N + limit) even at 1M records.
    Fault rules are evaluated in FIFO order for each API request: every active rule
    whose endpoint matches counts the request; the first one that has let ``after``
    matching requests pass and has not fired ``count`` times yet fires.
    """

    def __init__(
        self,
        records: Iterable[Any] = (),
        *,
        token: str = "sim-token",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self._token = token
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._records: dict[str, Any] = {}
        self._ids: list[str] = []
        self._faults: list[_Fault] = []
        self._counts = {"list": 0, "one": 0}
        self._synthetic = itertools.count(1)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.set_records(records)

    def __repr__(self) -> str:
        state = self.base_url if self._server is not None else "stopped"
        return f"BillingSimulator({state}, records={len(self._ids)})"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> BillingSimulator:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), self)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"billing-simulator-{server.server_address[1]}", daemon=True,
        )
        self._server, self._thread = server, thread
        thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and cut open keep-alive connections (idempotent)."""
        server, thread = self._server, self._thread
        if server is None:
            return
        self._server = self._thread = None
        # serve_forever() only notices shutdown() between polls; poke it awake instead of
        # waiting out the poll interval (a poke it accepts is an empty connection: harmless).
        stopper = threading.Thread(target=server.shutdown, daemon=True)
        stopper.start()
        while stopper.is_alive():
            try:
                socket.create_connection(server.server_address[:2], timeout=0.2).close()
            except OSError:
                pass
            stopper.join(0.01)
        server.server_close()
        server.close_all_connections()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> BillingSimulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only meaningful once started)."""
        if self._server is None:
            raise RuntimeError("billing simulator is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._server is None:
            raise RuntimeError("billing simulator is not running")
        host = self._server.server_address[0]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

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
            if self._records.pop(instance_id, _MISSING) is _MISSING:
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
            return self._records.get(instance_id, _MISSING)

    # -- faults & counters ----------------------------------------------------------------

    def add_fault(
        self,
        kind: str,
        *,
        endpoint: str = "any",
        after: int = 0,
        count: int | None = 1,
        retry_after: float | str | None = 1,
        delay: float = 0.5,
    ) -> None:
        """Queue a fault rule (see class docstring for the matching semantics).

        ``retry_after`` is sent verbatim when a string (to test garbled headers); None
        omits the ``Retry-After`` header.
        """
        fault = _validate_fault(kind, endpoint, after, count, retry_after, delay)
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        with self._lock:
            self._faults.clear()

    def _next_fault(self, endpoint: str) -> _Fault | None:
        with self._lock:
            self._counts[endpoint] += 1
            chosen: _Fault | None = None
            for fault in self._faults:
                if fault.exhausted or fault.endpoint not in (endpoint, "any"):
                    continue
                fault.seen += 1
                if chosen is None and fault.seen > fault.after:
                    fault.fired += 1
                    chosen = fault
            self._faults = [f for f in self._faults if not f.exhausted]
            return chosen

    def _faults_snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return [f.as_dict() for f in self._faults]

    def request_count(self, endpoint: str | None = None) -> int:
        """API requests received (``"list"``, ``"one"`` or both); admin calls excluded."""
        with self._lock:
            if endpoint is None:
                return sum(self._counts.values())
            if endpoint not in self._counts:
                raise ValueError(f"unknown endpoint {endpoint!r}; expected 'list' or 'one'")
            return self._counts[endpoint]

    def reset_counts(self) -> None:
        """Zero the request counters."""
        with self._lock:
            for k in self._counts:
                self._counts[k] = 0

    def _authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, value = header.partition(" ")
        return scheme.lower() == "bearer" and _consteq(value.strip(), self._token)

    def _health(self) -> dict[str, Any]:
        with self._lock:
            return {
                "status": "ok",
                "records": len(self._ids),
                "faults": len(self._faults),
                "requests": dict(self._counts),
            }


def _consteq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


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


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.simulator",
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

    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    print(f"billing simulator listening on {sim.base_url}", flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
