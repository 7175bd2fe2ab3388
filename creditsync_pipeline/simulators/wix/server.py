"""The Wix simulator: Wix's OAuth token endpoint and App Instance API over real HTTP.

Serves what :mod:`creditsync_pipeline.billing.wix` calls:

* ``POST /oauth2/token`` (fault endpoint ``token``): JSON ``{"grant_type":
  "client_credentials", "client_id", "client_secret", "instance_id"}`` ->
  ``{"access_token", "token_type": "Bearer", "expires_in"}``. Refusals follow the OAuth
  2.0 conventions (RFC 6749 5.2) that Wix's endpoint documents: a wrong client id or
  secret -> 401 ``{"error": "invalid_client"}``; an instance the app is not installed on
  (never known, deleted or removed) -> ``removed_status`` (default 400) ``{"error":
  "invalid_grant"}``; another grant type -> 400 ``unsupported_grant_type``.
* ``GET /apps/v1/instance`` (fault endpoint ``instance``) with ``Authorization:
  <access_token>`` -> ``{"instance": {...}, "site": {...}}``; a missing, unknown,
  expired or revoked token -> 401 with Wix's standard error shape
  (``{"message", "details": {"applicationError": {"code": "UNAUTHENTICATED"}}}``).

Tokens look like Wix's (``OauthNG.JWS.<random>``) and live ``token_ttl`` seconds
(Wix: 14400). ``rate_limit`` (requests a minute per instance, both endpoints; Wix: 200)
answers 429 with ``Retry-After`` (seconds to the end of the minute window) beyond it.
The fault kinds of :mod:`..base` apply to either endpoint.

Admin endpoints (unauthenticated, for a simulator in another process), beside the common
ones: ``PUT /_sim/instances/{id}`` (the instance object as served under ``"instance"``;
re-installs a removed one), ``GET``/``DELETE /_sim/instances/{id}``, ``POST
/_sim/instances/{id}/remove`` (the app uninstalled: tokens refused, issued ones revoked),
``POST /_sim/tokens/expire`` (every issued token expires now), ``POST
/_sim/tokens/dead_on_arrival`` (``{"count": N}``: the next N tokens granted, one per instance,
expire before their first use -- a token that expires mid-run), ``PUT``/``DELETE
/_sim/instances/{id}/failure`` (``{"status": 500, "endpoint": "token" | "instance" |
"any"}``: that instance's requests fail persistently), ``PUT /_sim/rate_limit``
(``{"per_minute": N | null}``).
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import unquote

from ..base import MISSING, NOT_FOUND_HTML, Handler, Simulator, consteq

__all__ = ["DEFAULT_APP_ID", "DEFAULT_APP_SECRET", "DEFAULT_TOKEN_TTL", "FAULT_ENDPOINTS", "WixSimulator"]

FAULT_ENDPOINTS = ("token", "instance", "any")
DEFAULT_APP_ID = "sim-wix-app-id"
DEFAULT_APP_SECRET = "sim-wix-app-secret"
DEFAULT_TOKEN_TTL = 14400
TOKEN_PATH = "/oauth2/token"
INSTANCE_PATH = "/apps/v1/instance"
_ADMIN_PREFIX = "/_sim/instances/"
_TOKEN_PREFIX = "OauthNG.JWS."
_UNAUTHENTICATED = {
    "message": "Unauthorized: missing, invalid or expired access token",
    "details": {"applicationError": {"code": "UNAUTHENTICATED", "description": "access token is not valid"}},
}


class WixSimulator(Simulator):
    """In-memory Wix app: installed instances, issued tokens (see the module docstring)."""

    ENDPOINTS = ("token", "instance")

    def __init__(
        self,
        instances: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]] = (),
        *,
        app_id: str = DEFAULT_APP_ID,
        app_secret: str = DEFAULT_APP_SECRET,
        token_ttl: float = DEFAULT_TOKEN_TTL,
        rate_limit: int | None = None,
        removed_status: int = 400,
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        super().__init__(host=host, port=port)
        if not 400 <= removed_status < 500 or removed_status == 429:
            raise ValueError("removed_status must be a 4xx other than 429")
        self.app_id = app_id
        self._secret = app_secret
        self.token_ttl = float(token_ttl)
        self.removed_status = removed_status
        self._rate_limit = rate_limit
        self._instances: dict[str, dict[str, Any]] = {}
        self._removed: set[str] = set()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expires at, monotonic)
        self._windows: dict[str, list[float]] = {}  # instance id -> [window start, requests]
        self._failing: dict[str, tuple[int, str]] = {}  # instance id -> (HTTP status, endpoint)
        self._dead_on_arrival = 0
        self._dead_for: set[str] = set()
        self.tokens_granted = 0
        self.set_instances(instances)

    def __repr__(self) -> str:
        state = self.base_url if self._server is not None else "stopped"
        return f"WixSimulator({state}, instances={len(self._instances)}, removed={len(self._removed)})"

    # -- the API --------------------------------------------------------------------------

    def route(self, handler: Handler, method: str, path: str, query: str, body: bytes) -> None:
        if path == TOKEN_PATH:
            endpoint = "token"
        elif path == INSTANCE_PATH:
            endpoint = "instance"
        else:
            handler.send(404, NOT_FOUND_HTML, content_type="text/html; charset=utf-8")
            return
        if method != ("POST" if endpoint == "token" else "GET"):
            handler.error(405, "method_not_allowed")
            return
        if handler.fault(endpoint, bad_shape={"items": []}):
            return
        if endpoint == "token":
            self._serve_token(handler, body)
        else:
            self._serve_instance(handler)

    def _serve_token(self, handler: Handler, body: bytes) -> None:
        doc = handler.json_body(body)
        if doc is MISSING:
            return
        if not isinstance(doc, dict):
            self._oauth_error(handler, 400, "invalid_request", "the body must be a JSON object")
            return
        if doc.get("grant_type") != "client_credentials":
            self._oauth_error(handler, 400, "unsupported_grant_type", "grant_type must be client_credentials")
            return
        client_id, client_secret = doc.get("client_id"), doc.get("client_secret")
        if not (isinstance(client_id, str) and isinstance(client_secret, str)
                and consteq(client_id, self.app_id) and consteq(client_secret, self._secret)):
            self._oauth_error(handler, 401, "invalid_client", "client authentication failed")
            return
        instance_id = doc.get("instance_id")
        if not isinstance(instance_id, str) or not instance_id:
            self._oauth_error(handler, 400, "invalid_request", "instance_id is required")
            return
        if self._limited(handler, instance_id) or self._failed(handler, instance_id, "token"):
            return
        with self._lock:
            installed = instance_id in self._instances and instance_id not in self._removed
            if installed:
                token = _TOKEN_PREFIX + secrets.token_urlsafe(32)
                expires = time.monotonic() + self.token_ttl
                if self._dead_on_arrival and instance_id not in self._dead_for:  # expires before its first use
                    self._dead_on_arrival -= 1
                    self._dead_for.add(instance_id)
                    expires = 0.0
                self._tokens[token] = (instance_id, expires)
                self.tokens_granted += 1
        if not installed:
            self._oauth_error(
                handler, self.removed_status, "invalid_grant", "the app is not installed on this instance"
            )
            return
        ttl = self.token_ttl
        handler.json(200, {
            "access_token": token, "token_type": "Bearer",
            "expires_in": int(ttl) if float(ttl).is_integer() else ttl,
        })

    def _serve_instance(self, handler: Handler) -> None:
        token = (handler.headers.get("Authorization") or "").strip()
        with self._lock:
            issued = self._tokens.get(token)
            if issued is not None and issued[1] <= time.monotonic():
                del self._tokens[token]
                issued = None
            instance = None if issued is None else self._instances.get(issued[0])
        if instance is None:
            handler.json(401, _UNAUTHENTICATED)
            return
        assert issued is not None
        if self._limited(handler, issued[0]) or self._failed(handler, issued[0], "instance"):
            return
        handler.json(200, {"instance": instance, "site": {"siteId": f"site-of-{issued[0]}", "locale": "en"}})

    @staticmethod
    def _oauth_error(handler: Handler, status: int, code: str, description: str) -> None:
        handler.json(status, {"error": code, "error_description": description})

    def _limited(self, handler: Handler, instance_id: str) -> bool:
        """429 + Retry-After when the instance is over its per-minute limit."""
        limit = self._rate_limit
        if limit is None:
            return False
        now = time.monotonic()
        with self._lock:
            window = self._windows.get(instance_id)
            if window is None or now - window[0] >= 60.0:
                window = self._windows[instance_id] = [now, 0.0]
            window[1] += 1
            over = window[1] > limit
            wait = max(1, math.ceil(60.0 - (now - window[0])))
        if over:
            handler.json(429, {"message": "rate limit exceeded", "details": {
                "applicationError": {"code": "RESOURCE_EXHAUSTED", "description": "too many requests"}}},
                headers={"Retry-After": str(wait)})
        return over

    def _failed(self, handler: Handler, instance_id: str, endpoint: str) -> bool:
        """The persistent per-instance failure set by :meth:`set_failure`, if any."""
        with self._lock:
            failure = self._failing.get(instance_id)
        if failure is None or failure[1] not in (endpoint, "any"):
            return False
        handler.json(failure[0], {"message": "simulated failure", "details": {
            "applicationError": {"code": "INTERNAL", "description": "simulated failure"}}})
        return True

    # -- admin ----------------------------------------------------------------------------

    def admin(self, handler: Handler, method: str, path: str, body: bytes) -> bool:
        if path == "/_sim/tokens/expire" and method == "POST":
            handler.json(200, {"expired": self.expire_tokens()})
            return True
        if path == "/_sim/tokens/dead_on_arrival" and method == "POST":
            doc = handler.json_body(body)
            if doc is MISSING:
                return True
            count = doc.get("count") if isinstance(doc, dict) else None
            if isinstance(count, bool) or not isinstance(count, int) or count < 0:
                handler.error(400, "bad_request", "expected {\"count\": an integer >= 0}")
                return True
            self.expire_next_tokens(count)
            handler.json(200, {"ok": True})
            return True
        if path == "/_sim/rate_limit" and method == "PUT":
            doc = handler.json_body(body)
            if doc is MISSING:
                return True
            limit = doc.get("per_minute") if isinstance(doc, dict) else MISSING
            if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
                handler.error(400, "bad_request", "expected {\"per_minute\": a positive integer or null}")
                return True
            self.set_rate_limit(limit)
            handler.json(200, {"ok": True})
            return True
        if not path.startswith(_ADMIN_PREFIX):
            return False
        raw, action = path[len(_ADMIN_PREFIX):], ""
        for suffix in ("/remove", "/failure"):
            if raw.endswith(suffix):
                raw, action = raw[: -len(suffix)], suffix[1:]
        try:
            instance_id = unquote(raw, errors="strict")
        except UnicodeDecodeError:
            handler.error(400, "bad_request", "instance id is not valid UTF-8")
            return True
        if not raw or "/" in raw:
            handler.error(404, "not_found")
        elif action == "remove":
            if method == "POST":
                handler.json(200, {"removed": self.remove_instance(instance_id)})
            else:
                handler.error(405, "method_not_allowed")
        elif action == "failure":
            doc = handler.json_body(body) if method == "PUT" else {"status": None}
            if doc is MISSING:
                return True
            if method not in ("PUT", "DELETE") or not isinstance(doc, dict):
                handler.error(405 if method not in ("PUT", "DELETE") else 400, "bad_request")
                return True
            try:
                self.set_failure(instance_id, doc.get("status"), endpoint=doc.get("endpoint", "any"))
            except ValueError as exc:
                handler.error(400, "bad_request", str(exc))
                return True
            handler.json(200, {"ok": True})
        elif method == "PUT":
            doc = handler.json_body(body)
            if doc is MISSING:
                return True
            if not isinstance(doc, dict):
                handler.error(400, "bad_request", "expected the instance as a JSON object")
                return True
            self.set_instance(instance_id, doc)
            handler.json(200, {"ok": True})
        elif method == "GET":
            found = self.instance(instance_id)
            if found is None:
                handler.error(404, "not_found")
            else:
                handler.json(200, {"instance": found, "removed": instance_id in self._removed})
        elif method == "DELETE":
            handler.json(200, {"deleted": self.delete_instance(instance_id)})
        else:
            handler.error(405, "method_not_allowed")
        return True

    def health(self) -> dict[str, Any]:
        doc = super().health()
        with self._lock:
            doc.update(instances=len(self._instances), removed=len(self._removed), tokens_granted=self.tokens_granted)
        return doc

    # -- state ----------------------------------------------------------------------------

    def set_instances(self, instances: Mapping[str, Mapping[str, Any]] | Iterable[Mapping[str, Any]]) -> None:
        """Replace every instance (a mapping id -> instance, or instances carrying ``instanceId``)."""
        items = instances.items() if isinstance(instances, Mapping) else ((i["instanceId"], i) for i in instances)
        new = {str(k): dict(v) for k, v in items}
        with self._lock:
            self._instances = new
            self._removed.clear()
            self._tokens.clear()

    def set_instance(self, instance_id: str, instance: Mapping[str, Any]) -> None:
        """Install or replace one instance (stored as given; a removed one is installed again)."""
        with self._lock:
            self._instances[instance_id] = dict(instance)
            self._removed.discard(instance_id)

    def instance(self, instance_id: str) -> dict[str, Any] | None:
        with self._lock:
            found = self._instances.get(instance_id)
            return None if found is None else dict(found)

    def remove_instance(self, instance_id: str) -> bool:
        """The app was uninstalled from that site: tokens refused, issued ones revoked."""
        with self._lock:
            if instance_id not in self._instances:
                return False
            self._removed.add(instance_id)
            self._revoke(instance_id)
            return True

    def delete_instance(self, instance_id: str) -> bool:
        """Forget the instance entirely (Wix never knew it)."""
        with self._lock:
            self._removed.discard(instance_id)
            self._revoke(instance_id)
            return self._instances.pop(instance_id, None) is not None

    def _revoke(self, instance_id: str) -> None:
        for token in [t for t, (i, _) in self._tokens.items() if i == instance_id]:
            del self._tokens[token]

    def expire_tokens(self) -> int:
        """Every token issued so far expires now (a token that expires mid-run); returns how many."""
        with self._lock:
            count = len(self._tokens)
            self._tokens.clear()
            return count

    def expire_next_tokens(self, count: int = 1) -> None:
        """The next ``count`` tokens granted, one per instance, expire before their first use
        (a token that expires mid-run: 401, then a fresh token for that instance works)."""
        with self._lock:
            self._dead_on_arrival = max(0, int(count))
            self._dead_for.clear()

    def set_failure(self, instance_id: str, status: int | None = 500, *, endpoint: str = "any") -> None:
        """Every request for this instance (``token``, ``instance`` or ``any``) answers ``status``;
        None heals it. A persistent failure of one look-up, whatever the retries."""
        if endpoint not in FAULT_ENDPOINTS:
            raise ValueError(f"endpoint must be one of {', '.join(FAULT_ENDPOINTS)}")
        if status is not None and (isinstance(status, bool) or not isinstance(status, int) or not 400 <= status < 600):
            raise ValueError("status must be an HTTP error status (4xx/5xx) or None")
        with self._lock:
            if status is None:
                self._failing.pop(instance_id, None)
            else:
                self._failing[instance_id] = (status, endpoint)

    def set_rate_limit(self, per_minute: int | None) -> None:
        with self._lock:
            self._rate_limit = per_minute
            self._windows.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._instances)
