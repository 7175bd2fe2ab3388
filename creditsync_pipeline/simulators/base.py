"""What every billing simulator shares: a real HTTP server, injectable faults, admin endpoints.

A simulator (:class:`Simulator` subclass) serves a provider's API over real HTTP on
127.0.0.1 (tests, the demo, the benchmarks) and can be told to misbehave. Fault rules are
evaluated in FIFO order for each API request: every active rule whose endpoint matches
counts the request; the first one that has let ``after`` matching requests pass and has
not fired ``count`` times yet fires. Kinds (the same for every simulator):

* ``rate_limit`` -- 429 with ``Retry-After`` (``retry_after``; None omits the header);
* ``error`` -- 500; ``drop`` -- the connection is cut without an answer;
* ``slow`` -- the answer comes after ``delay`` seconds;
* ``malformed`` -- 200 with an HTML page; ``bad_shape`` -- 200 with JSON of the wrong shape.

Unauthenticated admin endpoints (for a simulator run as its own process):
``GET /_sim/health``, ``POST/GET/DELETE /_sim/faults``, plus each simulator's own.
"""

from __future__ import annotations

import hmac
import json
import logging
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, ClassVar
from urllib.parse import urlsplit

__all__ = ["FAULT_KINDS", "Fault", "Handler", "Simulator", "consteq", "MALFORMED_HTML", "NOT_FOUND_HTML"]

logger = logging.getLogger("creditsync.simulator")

FAULT_KINDS = ("rate_limit", "error", "drop", "slow", "malformed", "bad_shape")
_MAX_BODY = 64 * 1024 * 1024
MALFORMED_HTML = (
    b"<!DOCTYPE html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>Bad Gateway</h1><p>The upstream server is unavailable.</p></body></html>"
)
NOT_FOUND_HTML = b"<!DOCTYPE html><html><head><title>404 Not Found</title></head><body><h1>Not Found</h1></body></html>"
MISSING: Any = object()


@dataclass
class Fault:
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
            "kind": self.kind, "endpoint": self.endpoint, "after": self.after, "count": self.count,
            "retry_after": self.retry_after, "delay": self.delay, "seen": self.seen, "fired": self.fired,
        }


def _validate_fault(
    kind: Any, endpoint: Any, after: Any, count: Any, retry_after: Any, delay: Any, endpoints: tuple[str, ...]
) -> Fault:
    """Build a fault rule, raising ValueError on bad parameters."""
    if kind not in FAULT_KINDS:
        raise ValueError(f"unknown fault kind {kind!r}; expected one of {', '.join(FAULT_KINDS)}")
    if endpoint not in endpoints:
        raise ValueError(f"unknown fault endpoint {endpoint!r}; expected one of {', '.join(endpoints)}")
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        raise ValueError("fault 'after' must be an integer >= 0")
    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError("fault 'count' must be an integer >= 1 or None (persistent)")
    if retry_after is not None and (isinstance(retry_after, bool) or not isinstance(retry_after, (int, float, str))):
        raise ValueError("fault 'retry_after' must be a number, a string or None")
    if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
        raise ValueError("fault 'delay' must be a number >= 0")
    return Fault(kind, endpoint, after, count, retry_after, float(delay))


def format_retry_after(value: float | str) -> str:
    if isinstance(value, str):
        return value
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


def consteq(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode("utf-8", "surrogatepass"), b.encode("utf-8", "surrogatepass"))


class _Server(ThreadingHTTPServer):
    """Threading server that tracks live connections so stop() can cut keep-alives."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 256

    def __init__(self, address: tuple[str, int], sim: Simulator, handler: type[Handler]) -> None:
        self.sim = sim
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(address, handler)

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


class Handler(BaseHTTPRequestHandler):
    """Request plumbing; a simulator's own routes live in its :meth:`Simulator.route`."""

    server: _Server
    protocol_version = "HTTP/1.1"
    server_version = "BillingSimulator/1.0"
    sys_version = ""
    timeout = 120  # idle keep-alive connections are closed after this many seconds
    disable_nagle_algorithm = True  # headers and body go out in two writes

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        """Quiet access log (debug level, request line only; headers are never logged)."""
        logger.debug("%s " + format, self.address_string(), *args)

    def send(self, status: int, body: bytes, content_type: str = "application/json", headers: dict[str, str] | None = None) -> None:
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

    def json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        self.send(status, json.dumps(payload).encode("ascii"), headers=headers)

    def error(self, status: int, error: str, message: str | None = None) -> None:
        payload: dict[str, Any] = {"error": error}
        if message:
            payload["message"] = message
        self.json(status, payload)

    def rate_limited(self, headers: dict[str, str]) -> None:
        """The 429 of a ``rate_limit`` fault (a provider's simulator answers in its own shape)."""
        self.json(429, {"error": "rate_limited"}, headers=headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """JSON errors for protocol-level failures too (bad request line, etc.)."""
        self.close_connection = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self.error(code, phrase.lower().replace(" ", "_"), message)

    def _read_body(self) -> bytes | None:
        """Read the request body (Content-Length only); None after sending an error."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            self.error(411, "length_required", "chunked request bodies are not supported")
            return None
        length_header = self.headers.get("Content-Length")
        try:
            length = int(length_header) if length_header else 0
        except ValueError:
            length = -1
        if length < 0 or length > _MAX_BODY:
            self.close_connection = True
            self.error(400, "bad_request", "invalid Content-Length")
            return None
        return self.rfile.read(length) if length else b""

    def json_body(self, body: bytes) -> Any:
        """The request body as JSON, or MISSING after answering 400."""
        try:
            return json.loads(body)
        except (UnicodeDecodeError, ValueError):
            self.error(400, "bad_request", "request body is not valid JSON")
            return MISSING

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
        sim = self.server.sim
        if parts.path.startswith("/_sim/"):
            if not sim.admin(self, method, parts.path, body) and not self._admin(method, parts.path, body):
                self.error(404, "not_found")
            return
        sim.route(self, method, parts.path, parts.query, body)

    def fault(self, endpoint: str, *, bad_shape: Any = None) -> bool:
        """Apply the next fault rule for ``endpoint``; True when the answer is already sent."""
        fault = self.server.sim._next_fault(endpoint)
        if fault is None:
            return False
        if fault.kind == "slow":
            time.sleep(fault.delay)
            return False
        if fault.kind == "rate_limit":
            headers = {} if fault.retry_after is None else {"Retry-After": format_retry_after(fault.retry_after)}
            self.rate_limited(headers)
        elif fault.kind == "error":
            self.error(500, "internal_error", "simulated failure")
        elif fault.kind == "drop":
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        elif fault.kind == "malformed":
            self.send(200, MALFORMED_HTML, content_type="text/html; charset=utf-8")
        elif fault.kind == "bad_shape":
            self.json(200, {"items": []} if bad_shape is None else bad_shape)
        return True

    def _admin(self, method: str, path: str, body: bytes) -> bool:
        """The admin endpoints every simulator has; False when ``path`` is not one."""
        sim = self.server.sim
        if path == "/_sim/health" and method in ("GET", "HEAD"):
            self.json(200, sim.health())
            return True
        if path != "/_sim/faults":
            return False
        if method == "DELETE":
            sim.clear_faults()
            self.json(200, {"ok": True})
        elif method == "POST":
            spec = self.json_body(body)
            if spec is MISSING:
                return True
            if not isinstance(spec, dict) or "kind" not in spec:
                self.error(400, "bad_request", "expected a JSON object with at least 'kind'")
                return True
            unknown = set(spec) - {"kind", "endpoint", "after", "count", "retry_after", "delay"}
            if unknown:
                self.error(400, "bad_request", f"unknown fault fields: {sorted(unknown)}")
                return True
            try:
                sim.add_fault(spec.pop("kind"), **spec)
            except (TypeError, ValueError) as exc:
                self.error(400, "bad_request", str(exc))
                return True
            self.json(201, {"ok": True})
        elif method == "GET":
            self.json(200, {"faults": sim._faults_snapshot()})
        else:
            self.error(405, "method_not_allowed")
        return True


class Simulator:
    """Lifecycle, fault rules and request counters of one simulated provider API.

    Subclasses set :attr:`ENDPOINTS` (the fault endpoints it counts; ``"any"`` matches
    all) and implement :meth:`route` (and optionally :meth:`admin`, :meth:`health`).
    """

    ENDPOINTS: ClassVar[tuple[str, ...]] = ()
    handler: ClassVar[type[Handler]] = Handler

    def __init__(self, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._counts = {e: 0 for e in self.ENDPOINTS}
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> Simulator:
        """Bind and serve in a daemon thread; returns self."""
        if self._server is not None:
            return self
        server = _Server((self._host, self._port), self, self.handler)
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1},
            name=f"{type(self).__name__}-{server.server_address[1]}", daemon=True,
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

    def __enter__(self) -> Simulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only meaningful once started)."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._server is None:
            raise RuntimeError(f"{type(self).__name__} is not running")
        host = self._server.server_address[0]
        if ":" in str(host):
            host = f"[{host}]"
        return f"http://{host}:{self.port}"

    # -- what subclasses serve --------------------------------------------------------------

    def route(self, handler: Handler, method: str, path: str, query: str, body: bytes) -> None:
        """Answer one API request (faults: :meth:`Handler.fault`)."""
        raise NotImplementedError

    def admin(self, handler: Handler, method: str, path: str, body: bytes) -> bool:
        """This simulator's own ``/_sim/...`` endpoints; False when ``path`` is not one."""
        return False

    def health(self) -> dict[str, Any]:
        with self._lock:
            return {"status": "ok", "faults": len(self._faults), "requests": dict(self._counts)}

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
        """Queue a fault rule (see the module docstring for the matching semantics).

        ``retry_after`` is sent verbatim when a string (to test garbled headers); None
        omits the ``Retry-After`` header.
        """
        fault = _validate_fault(kind, endpoint, after, count, retry_after, delay, (*self.ENDPOINTS, "any"))
        with self._lock:
            self._faults.append(fault)

    def clear_faults(self) -> None:
        """Remove every fault rule."""
        with self._lock:
            self._faults.clear()

    def _next_fault(self, endpoint: str) -> Fault | None:
        with self._lock:
            self._counts[endpoint] += 1
            chosen: Fault | None = None
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
        """API requests received (one endpoint, or all); admin calls excluded."""
        with self._lock:
            if endpoint is None:
                return sum(self._counts.values())
            if endpoint not in self._counts:
                raise ValueError(f"unknown endpoint {endpoint!r}; expected one of {', '.join(self._counts)}")
            return self._counts[endpoint]

    def reset_counts(self) -> None:
        """Zero the request counters."""
        with self._lock:
            for k in self._counts:
                self._counts[k] = 0


def serve_until_signalled(sim: Simulator, banner: Callable[[], str]) -> int:
    """Run ``sim`` in the foreground until SIGTERM/SIGINT (the simulators' ``main``)."""
    import signal

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(banner(), flush=True)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        sim.stop()
    return 0
