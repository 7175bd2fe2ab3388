"""The Stripe simulator: the part of Stripe's API creditsync reads, over real HTTP.

Served (bearer or basic auth with the API key; Stripe's error JSON
``{"error": {"type", "code", "message", "param"}}`` for every refusal):

* ``GET /v1/subscriptions`` -- ``status`` (``all``; absent: every status but canceled;
  ``ended``; one status), ``customer``, ``limit`` 1..100 (default 10), ``starting_after``
  (an unknown id is a 400 ``resource_missing``, as Stripe answers -- or, with
  ``restart_on_unknown_cursor``, the list restarts from the top, as localstripe does),
  ``expand[]=data.customer`` (or ``expand[0]``); newest first, ``has_more``. Unknown parameters are refused.
* ``GET /v1/customers/search`` and ``GET /v1/subscriptions/search`` -- ``query`` of one
  ``metadata['k']:'v'`` clause (either quote, backslash escapes; matched case-insensitively
  like Stripe), ``limit``, ``page``; an object is found only ``search_lag`` seconds after
  it was written (Stripe indexes within about a minute); ``search_enabled=False`` answers
  404 like a server without search.
* ``Stripe-Version``: before ``2025-03-31`` (or ``legacy_periods``) periods are rendered on
  the subscription instead of its items.

Fault endpoints (:mod:`..base`): ``list`` (the unfiltered list), ``customer_list`` (the list
of one customer), ``search`` (both searches), ``any``.

Admin endpoints (unauthenticated, for a simulator in another process): :mod:`.admin`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs

import orjson

from ..base import Handler, Simulator, consteq
from .admin import admin_request
from .convert import MetadataOn, stripe_objects_from_records
from .objects import Customer, Item, Price, Subscription, object_id, render_customer, render_subscription

__all__ = ["DEFAULT_API_KEY", "StripeHandler", "StripeSimulator"]

DEFAULT_API_KEY = "sk_test_simulator"
MAX_LIMIT = 100
_BASIL = "2025-03-31"
_LIST = "/v1/subscriptions"
_SEARCH = {"/v1/customers/search": "customers", "/v1/subscriptions/search": "subscriptions"}
_LIST_PARAMS = {"status", "customer", "limit", "starting_after"}
_SEARCH_PARAMS = {"query", "limit", "page"}
#: ``expand``, ``expand[]``, ``expand[0]`` (the official libraries index the array)
_EXPAND_RE = re.compile(r"expand(?:\[\d*\])?")
_STATUS_FILTERS = {"all", "ended", "active", "trialing", "past_due", "canceled", "unpaid", "incomplete",
                   "incomplete_expired", "paused"}
#: metadata['key']:'value' (either quote; backslash escapes)
_CLAUSE_RE = re.compile(r"""\s*metadata\[(?P<kq>['"])(?P<key>(?:\\.|(?!(?P=kq)).)*)(?P=kq)\]\s*:\s*(?P<vq>['"])(?P<value>(?:\\.|(?!(?P=vq)).)*)(?P=vq)\s*""")
_UNESCAPE_RE = re.compile(r"\\(.)")


def _unescape(text: str) -> str:
    return _UNESCAPE_RE.sub(r"\1", text)


class StripeHandler(Handler):
    """Stripe's error shape for every refusal, faults included."""

    server_version = "StripeSimulator/1.0"

    def error(self, status: int, error: str, message: str | None = None, *, code: str | None = None,
              param: str | None = None) -> None:
        kind = "api_error" if status >= 500 else "invalid_request_error"
        if status == 429:
            kind = "rate_limit_error"
        body: dict[str, Any] = {"type": kind, "message": message or error.replace("_", " ")}
        if code:
            body["code"] = code
        if param:
            body["param"] = param
        self.json(status, {"error": body}, headers={"Request-Id": "req_sim"})

    def rate_limited(self, headers: dict[str, str]) -> None:
        self.json(
            429,
            {"error": {"type": "invalid_request_error", "code": "rate_limit",
                       "message": "Too many requests hit the API too quickly."}},
            headers={**headers, "Stripe-Should-Retry": "true"},
        )


class StripeSimulator(Simulator):
    """In-memory Stripe (customers, prices, subscriptions) served over real HTTP."""

    ENDPOINTS = ("list", "customer_list", "search")
    handler = StripeHandler

    def __init__(
        self,
        *,
        api_key: str = DEFAULT_API_KEY,
        host: str = "127.0.0.1",
        port: int = 0,
        search_lag: float = 0.0,
        search_enabled: bool = True,
        restart_on_unknown_cursor: bool = False,
        legacy_periods: bool = False,
    ) -> None:
        super().__init__(host=host, port=port)
        self._key = api_key
        self._customers: dict[str, Customer] = {}
        self._subs: dict[str, Subscription] = {}
        self._order: list[str] | None = None
        self._pos: dict[str, int] = {}
        self._by_customer: dict[str, list[str]] | None = None
        self.search_lag = search_lag
        self.search_enabled = search_enabled
        self.restart_on_unknown_cursor = restart_on_unknown_cursor
        self.legacy_periods = legacy_periods

    def __repr__(self) -> str:
        state = self.base_url if self._server is not None else "stopped"
        return f"StripeSimulator({state}, customers={len(self._customers)}, subscriptions={len(self._subs)})"

    # -- data (Python API) ----------------------------------------------------------------

    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]], *, metadata_key: str = "instance_id",
                     metadata_on: MetadataOn = "alternate", lookup_keys: Mapping[str, str | None] | None = None,
                     now: datetime | None = None, **options: Any) -> StripeSimulator:
        """A simulator serving SPEC-shaped ``records`` (see :mod:`.convert`)."""
        sim = cls(**options)
        sim.load_records(records, metadata_key=metadata_key, metadata_on=metadata_on, lookup_keys=lookup_keys, now=now)
        return sim

    def load_records(self, records: Iterable[Mapping[str, Any]], **convert: Any) -> None:
        """Replace everything with the Stripe equivalent of SPEC-shaped records."""
        customers, subscriptions = stripe_objects_from_records(records, **convert)
        self.set_objects(customers, subscriptions)

    def set_objects(self, customers: Iterable[Customer], subscriptions: Iterable[Subscription]) -> None:
        """Replace every customer and subscription."""
        with self._lock:
            self._customers = {c.id: c for c in customers}
            self._subs = {s.id: s for s in subscriptions}
            self._dirty()

    def clear(self) -> None:
        self.set_objects((), ())

    def put_customer(self, customer_id: str, *, metadata: Mapping[str, Any] | None = None, email: str | None = None,
                     name: str | None = None, created: int | None = None, deleted: bool = False,
                     extra: Mapping[str, Any] | None = None) -> Customer:
        """Create or replace a customer (search sees it ``search_lag`` seconds from now)."""
        customer = Customer(
            id=customer_id, metadata=dict(metadata or {}), created=int(created if created is not None else time.time()),
            email=email, name=name, deleted=deleted, extra=dict(extra) if extra else None,
            indexed_at=time.monotonic() + self.search_lag,
        )
        with self._lock:
            self._customers[customer_id] = customer
        return customer

    def put_subscription(
        self,
        subscription_id: str,
        *,
        customer: str,
        status: str = "active",
        created: int | None = None,
        items: Iterable[Mapping[str, Any]] = ({"price": "price_pro", "lookup_key": "pro"},),
        metadata: Mapping[str, Any] | None = None,
        current_period_end: int | None = None,
        cancel_at_period_end: bool = False,
        cancel_at: int | None = None,
        canceled_at: int | None = None,
        ended_at: int | None = None,
        trial_end: int | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> Subscription:
        """Create or replace a subscription.

        ``items``: ``{"price": id, "lookup_key": key | None, "plan_only": bool,
        "current_period_end": ts}`` each (the period end defaults to ``current_period_end``,
        else ``created`` + 30 days).
        """
        created = int(created if created is not None else time.time())
        built: list[Item] = []
        for n, spec in enumerate(items):
            end = spec.get("current_period_end", current_period_end)
            end = int(end if end is not None else created + 30 * 86_400)
            price = Price(id=str(spec["price"]), lookup_key=spec.get("lookup_key"), plan_only=bool(spec.get("plan_only")),
                          product=str(spec.get("product", f"prod_{spec['price']}")))
            built.append(Item(id=object_id("si", subscription_id, n), price=price,
                              current_period_start=end - 30 * 86_400, current_period_end=end))
        sub = Subscription(
            id=subscription_id, customer=customer, status=status, created=created, items=built,
            metadata=dict(metadata or {}), cancel_at_period_end=cancel_at_period_end, cancel_at=cancel_at,
            canceled_at=canceled_at, ended_at=ended_at, trial_start=created if trial_end else None, trial_end=trial_end,
            extra=dict(extra) if extra else None, indexed_at=time.monotonic() + self.search_lag,
        )
        with self._lock:
            self._subs[subscription_id] = sub
            self._dirty()
        return sub

    def delete_customer(self, customer_id: str) -> bool:
        with self._lock:
            return self._customers.pop(customer_id, None) is not None

    def delete_subscription(self, subscription_id: str) -> bool:
        with self._lock:
            found = self._subs.pop(subscription_id, None) is not None
            self._dirty()
            return found

    def customers(self) -> dict[str, Customer]:
        with self._lock:
            return dict(self._customers)

    def subscriptions(self) -> dict[str, Subscription]:
        with self._lock:
            return dict(self._subs)

    def event(self, subscription_id: str, event_type: str = "customer.subscription.updated", *,
              event_id: str | None = None, created: int | None = None) -> bytes:
        """The body Stripe would POST to a webhook endpoint about one subscription (its customer
        not expanded, as in real events); sign it with ``server.stripe.sign_stripe_payload``."""
        with self._lock:
            sub = self._subs[subscription_id]
            obj = render_subscription(sub, sub.customer)
        created = int(created if created is not None else time.time())
        return orjson.dumps({
            "id": event_id or object_id("evt", subscription_id, event_type, created), "object": "event",
            "api_version": _BASIL + ".basil", "created": created, "data": {"object": obj}, "livemode": False,
            "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}, "type": event_type,
        })

    def health(self) -> dict[str, Any]:
        doc = super().health()
        with self._lock:
            doc.update(customers=len(self._customers), subscriptions=len(self._subs))
        return doc

    def _dirty(self) -> None:
        self._order = None
        self._by_customer = None

    def _ordered(self) -> list[str]:
        """Subscription ids newest first (the caller holds the lock)."""
        if self._order is None:
            self._order = sorted(self._subs, key=lambda k: (self._subs[k].created, k), reverse=True)
            self._pos = {k: i for i, k in enumerate(self._order)}
        return self._order

    def _of_customer(self, customer_id: str) -> list[str]:
        if self._by_customer is None:
            index: dict[str, list[str]] = {}
            for k in self._ordered():
                index.setdefault(self._subs[k].customer, []).append(k)
            self._by_customer = index
        return self._by_customer.get(customer_id, [])

    # -- the API --------------------------------------------------------------------------

    def route(self, handler: Handler, method: str, path: str, query: str, body: bytes) -> None:
        assert isinstance(handler, StripeHandler)
        path = path.rstrip("/") or "/"
        if path == _LIST:
            params = parse_qs(query, keep_blank_values=True)
            endpoint = "customer_list" if params.get("customer") else "list"
        elif path in _SEARCH:
            endpoint = "search"
        else:
            handler.error(404, "not_found", f"Unrecognized request URL ({method}: {path}).")
            return
        if method not in ("GET", "HEAD"):
            handler.error(405, "method_not_allowed", f"Unrecognized request URL ({method}: {path}).")
            return
        if handler.fault(endpoint, bad_shape={"object": "list", "items": []}):
            return
        if not self._authorized(handler):
            return
        legacy = self.legacy_periods or (handler.headers.get("Stripe-Version") or "9999")[:10] < _BASIL
        if endpoint == "search":
            if not self.search_enabled:
                handler.error(404, "not_found", f"Unrecognized request URL ({method}: {path}).")
                return
            self._serve_search(handler, _SEARCH[path], parse_qs(query, keep_blank_values=True), legacy)
        else:
            self._serve_list(handler, parse_qs(query, keep_blank_values=True), legacy)

    def _authorized(self, handler: StripeHandler) -> bool:
        header = handler.headers.get("Authorization") or ""
        scheme, _, value = header.partition(" ")
        key = ""
        if scheme.lower() == "bearer":
            key = value.strip()
        elif scheme.lower() == "basic":
            import base64
            import binascii

            try:
                key = base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")[0]
            except (binascii.Error, UnicodeDecodeError):
                key = ""
        if not key:
            handler.error(401, "unauthorized", "You did not provide an API key.")
            return False
        if not consteq(key, self._key):
            shown = key[:8] + "*" * max(0, len(key) - 12) + key[-4:] if len(key) > 12 else "***"
            handler.error(401, "unauthorized", f"Invalid API Key provided: {shown}", code="api_key_invalid")
            return False
        return True

    @staticmethod
    def _one(params: dict[str, list[str]], name: str) -> str | None:
        values = params.get(name)
        return values[-1] if values else None

    def _limit(self, handler: StripeHandler, params: dict[str, list[str]]) -> int | None:
        raw = self._one(params, "limit")
        if raw is None:
            return 10
        try:
            limit = int(raw)
        except ValueError:
            limit = -1
        if not 1 <= limit <= MAX_LIMIT:
            handler.error(400, "invalid_limit", f"Invalid integer: {raw[:20]}; limit must be between 1 and {MAX_LIMIT}",
                          code="parameter_invalid_integer", param="limit")
            return None
        return limit

    def _expand(self, handler: StripeHandler, params: dict[str, list[str]]) -> bool | None:
        wanted = [v for name, values in params.items() if _EXPAND_RE.fullmatch(name) for v in values]
        for path in wanted:
            if path != "data.customer":
                handler.error(400, "bad_expand", f"This property cannot be expanded ({path[:40]}).", param="expand")
                return None
        return bool(wanted)

    def _unknown(self, handler: StripeHandler, params: dict[str, list[str]], allowed: set[str]) -> bool:
        unknown = sorted(name for name in set(params) - allowed if not _EXPAND_RE.fullmatch(name))
        if unknown:
            handler.error(400, "unknown_parameter", f"Received unknown parameter: {unknown[0][:40]}",
                          code="parameter_unknown", param=unknown[0][:40])
            return True
        return False

    def _serve_list(self, handler: StripeHandler, params: dict[str, list[str]], legacy: bool) -> None:
        if self._unknown(handler, params, _LIST_PARAMS):
            return
        limit = self._limit(handler, params)
        expand = self._expand(handler, params)
        if limit is None or expand is None:
            return
        status = self._one(params, "status")
        if status is not None and status not in _STATUS_FILTERS:
            handler.error(400, "invalid_status", f"Invalid status: must be one of {', '.join(sorted(_STATUS_FILTERS))}",
                          code="parameter_invalid_string", param="status")
            return
        customer = self._one(params, "customer")
        after = self._one(params, "starting_after")
        with self._lock:
            if customer is not None and customer not in self._customers:
                error = (404, "resource_missing", f"No such customer: '{customer[:60]}'")
            else:
                error = None
            if error is None:
                keys = self._of_customer(customer) if customer is not None else self._ordered()
                start = 0
                if after:
                    at = self._pos.get(after, -1) if customer is None else (keys.index(after) if after in keys else -1)
                    if at < 0 and not self.restart_on_unknown_cursor:
                        error = (400, "resource_missing", f"No such subscription: '{after[:60]}'")
                    start = at + 1 if at >= 0 else 0
            if error is None:
                chosen: list[Subscription] = []
                has_more = False
                for k in keys[start:]:
                    sub = self._subs[k]
                    if not _matches(sub.status, status):
                        continue
                    if len(chosen) == limit:
                        has_more = True
                        break
                    chosen.append(sub)
                data = [self._render(s, expand, legacy) for s in chosen]
        if error is not None:
            handler.error(error[0], "resource_missing", error[2], code=error[1],
                          param="customer" if "customer" in error[2] else "starting_after")
            return
        handler.send(200, orjson.dumps({"object": "list", "data": data, "has_more": has_more, "url": _LIST}))

    def _render(self, sub: Subscription, expand: bool, legacy: bool) -> dict[str, Any]:
        customer: dict[str, Any] | str = sub.customer
        if expand:
            found = self._customers.get(sub.customer)
            customer = render_customer(found) if found is not None else {"id": sub.customer, "object": "customer", "deleted": True}
        return render_subscription(sub, customer, legacy=legacy)

    def _serve_search(self, handler: StripeHandler, kind: str, params: dict[str, list[str]], legacy: bool) -> None:
        if self._unknown(handler, params, _SEARCH_PARAMS):
            return
        limit = self._limit(handler, params)
        expand = self._expand(handler, params)
        if limit is None or expand is None:
            return
        query = self._one(params, "query") or ""
        match = _CLAUSE_RE.fullmatch(query)
        if match is None:
            handler.error(400, "invalid_query", "The search query is not supported by this simulator "
                          "(one metadata['key']:'value' clause).", code="parameter_invalid_string", param="query")
            return
        key, value = _unescape(match["key"]), _unescape(match["value"]).casefold()
        page = self._one(params, "page")
        try:
            offset = int(page) if page else 0
        except ValueError:
            handler.error(400, "invalid_page", "Invalid page.", param="page")
            return
        now = time.monotonic()
        with self._lock:
            pool: Iterable[Customer | Subscription]
            pool = self._customers.values() if kind == "customers" else (self._subs[k] for k in self._ordered())
            hits = [
                obj for obj in pool
                if obj.indexed_at <= now and isinstance(obj.metadata.get(key), str) and obj.metadata[key].casefold() == value
                and not (isinstance(obj, Customer) and obj.deleted)
            ]
            chosen = hits[offset:offset + limit]
            data = [
                render_customer(obj) if isinstance(obj, Customer) else self._render(obj, bool(expand), legacy)
                for obj in chosen
            ]
        more = offset + limit < len(hits)
        handler.send(200, orjson.dumps({
            "object": "search_result", "data": data, "has_more": more,
            "next_page": str(offset + limit) if more else None, "url": f"/v1/{kind}/search",
        }))

    # -- admin ----------------------------------------------------------------------------

    def admin(self, handler: Handler, method: str, path: str, body: bytes) -> bool:
        return admin_request(self, handler, method, path, body)


def _matches(status: str, wanted: str | None) -> bool:
    if wanted == "all":
        return True
    if wanted is None:
        return status != "canceled"
    if wanted == "ended":
        return status in ("canceled", "incomplete_expired")
    return status == wanted
