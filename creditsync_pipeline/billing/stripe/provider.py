"""The Stripe provider over raw HTTP: the full list, per-instance look-ups, access check.

See :mod:`creditsync_pipeline.billing.stripe` for the semantics; this module is the I/O.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from datetime import datetime
from typing import Any, TypeVar

import httpx
import pandas as pd

from ...settings import DEFAULT_STRIPE_API_BASE, DEFAULT_STRIPE_METADATA_KEY, Settings
from ..base import (
    UNLINKED,
    BillingProvider,
    BillingSnapshot,
    Budget,
    CustomerLinks,
    Lookup,
    check_requested_ids,
    look_up_each,
    snapshot_from_lookups,
)
from ..errors import BillingAuthError, BillingError
from ..http import HttpApi, json_type, utcnow
from ..records import concat_frames, empty_invalid, empty_records, instance_id_problem, short_repr, validate_fields
from .subscriptions import API_VERSION, PageFields, SubscriptionMapper, entitles_at, instance_of

__all__ = ["MAX_PAGE_SIZE", "UNKNOWN", "StripeProvider", "guess_next", "search_query", "stripe_error"]

logger = logging.getLogger("creditsync.billing")

LIST_PATH = "/v1/subscriptions"
CUSTOMER_SEARCH_PATH = "/v1/customers/search"
SUBSCRIPTION_SEARCH_PATH = "/v1/subscriptions/search"
#: Stripe's largest ``limit``
MAX_PAGE_SIZE = 100
#: pages the fetcher thread may hold ahead of the mapper (a page of 100 expanded subscriptions: ~0.4 MB)
_PREFETCH_PAGES = 4
_VALIDATE_BATCH = 20_000
#: key-like tokens Stripe puts in its messages ("Invalid API Key provided: sk_test_****1234")
_KEYLIKE_RE = re.compile(r"\b(?:sk|rk|pk)_(?:live|test)_[A-Za-z0-9_*]*|\bwhsec_[A-Za-z0-9_*]*")
_SAFE_WORD_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_T = TypeVar("_T")


def search_query(key: str, value: str) -> str:
    """``metadata['key']:'value'`` with quotes and backslashes escaped (never an injection)."""

    def quoted(text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    return f"metadata[{quoted(key)}]:{quoted(value)}"


def stripe_error(response: httpx.Response) -> tuple[str, str, str]:
    """(type, code, message) of Stripe's ``{"error": {...}}`` body, each sanitised ('' if absent).

    The message loses anything that looks like a key, is one line and at most 160 characters.
    """
    try:
        body = response.json()
    except (ValueError, RecursionError):
        return "", "", ""
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return "", "", ""

    def word(value: Any) -> str:
        return value if isinstance(value, str) and _SAFE_WORD_RE.fullmatch(value) else ""

    message = error.get("message")
    text = ""
    if isinstance(message, str):
        text = _KEYLIKE_RE.sub("***", " ".join(message.split()))
        text = "".join(ch for ch in text if ch.isprintable())
        if len(text) > 160:
            text = text[:157] + "..."
    return word(error.get("type")), word(error.get("code")), text


#: a list page's tail: ``"has_more": true|false, "url": "..."}`` (Stripe's key order)
_TAIL_RE = re.compile(rb'"has_more"\s*:\s*(true|false)\s*,\s*"url"\s*:\s*"[^"\\]*"\s*\}\s*\Z')
#: where a subscription object begins: ``{"id": "sub_...", "object": "subscription"``
_SUBSCRIPTION_ID_RE = re.compile(rb'"id"\s*:\s*"(sub_[A-Za-z0-9_]{1,200})"\s*,\s*"object"\s*:\s*"subscription"')
#: how far from the end the last subscription begins, at most, for a guess (else: no guess)
_GUESS_WINDOW = 256 * 1024
#: :func:`guess_next` could not tell
UNKNOWN: Any = object()


def guess_next(content: bytes) -> str | None | Any:
    """The next page's cursor read off a list page's bytes, without parsing them.

    None: the page says ``has_more`` is false. The last subscription's id otherwise, or
    :data:`UNKNOWN` when the bytes do not show it plainly (another key order, a server
    that is not Stripe). Only a guess: the parsed page is always checked against it.
    """
    tail = _TAIL_RE.search(content, max(0, len(content) - 1024))
    if tail is None:
        return UNKNOWN
    if tail.group(1) == b"false":
        return None
    last = None
    for last in _SUBSCRIPTION_ID_RE.finditer(content, max(0, len(content) - _GUESS_WINDOW)):
        pass
    return last.group(1).decode("ascii") if last is not None else UNKNOWN


def _prefetched(source: Callable[[threading.Event], Iterator[_T]], depth: int, name: str) -> Iterator[_T]:
    """Run ``source(stop)`` in a thread, ``depth`` items ahead of the consumer.

    The first failure of either side stops both and is raised here; closing the
    iterator early (a consumer's failure) stops the thread and waits for it.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)
    stop = threading.Event()
    done = object()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def run() -> None:
        try:
            for item in source(stop):
                if not put(item):
                    return
            put(done)
        except BaseException as exc:  # noqa: BLE001 - handed over, raised by the consumer
            put(_Failure(exc))

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is done:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a pending put, then let the thread finish
            try:
                handoff.get(timeout=0.05)
            except queue.Empty:
                pass
        thread.join()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _NoSuchCustomer(Exception):
    """A remembered customer Stripe no longer knows (404 on its list)."""


class StripeProvider(BillingProvider):
    """Stripe's subscriptions as SPEC records (``BILLING_PROVIDER=stripe``)."""

    name = "stripe"
    lists_all = True

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_STRIPE_API_BASE,
        metadata_key: str = DEFAULT_STRIPE_METADATA_KEY,
        plan_map: Mapping[str, str] | None = None,
        links: CustomerLinks | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        page_size: int = MAX_PAGE_SIZE,
        concurrency: int = 4,
        api_version: str = API_VERSION,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("STRIPE_API_KEY is empty")
        api_key = api_key.strip()
        if not (api_key.isascii() and api_key.isprintable()):
            raise ValueError("STRIPE_API_KEY contains characters not allowed in an HTTP header")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not metadata_key or len(metadata_key) > 40:
            raise ValueError("the instance metadata key must be 1 to 40 characters")
        self._api = HttpApi(
            base_url,
            label="Stripe API",
            url_setting="STRIPE_API_BASE",
            credentials="the API key",
            headers={"Authorization": f"Bearer {api_key}", "Stripe-Version": api_version},
            secrets=[api_key],
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            max_connections=concurrency + 1,
            transport=transport,
        )
        self._key = metadata_key
        self._plan_map = dict(plan_map or {})
        self._links = links
        self._page_size = page_size
        self._concurrency = concurrency

    @classmethod
    def from_settings(cls, cfg: Settings, *, budget: Budget, links: CustomerLinks | None = None) -> StripeProvider:
        return cls(
            cfg.stripe.require_api_key(),
            base_url=cfg.stripe.api_base,
            metadata_key=cfg.stripe.instance_metadata_key,
            plan_map=cfg.plan_map,
            links=links,
            timeout=budget.timeout,
            max_attempts=budget.max_attempts,
            backoff_max=budget.backoff_max,
            max_retry_after=budget.max_retry_after,
        )

    def __repr__(self) -> str:
        return f"StripeProvider(base_url={self.base_url!r}, metadata_key={self._key!r})"

    @property
    def base_url(self) -> str:
        return self._api.base_url

    @property
    def api(self) -> HttpApi:
        """The HTTP layer (tests swap its ``sleep``)."""
        return self._api

    def close(self) -> None:
        self._api.close()

    # -- the contract ---------------------------------------------------------------------

    def check_access(self, instance_ids: Sequence[str] = ()) -> str:
        """A one-record list call: Stripe reachable, the API key accepted, a list of the right shape."""
        what = f"GET {LIST_PATH} (access check)"
        for _ in self._walk(LIST_PATH, {"status": "all", "limit": 1}, what, pages=1):
            pass
        return f"Stripe API at {self.base_url} answered a subscription list with the API key accepted"

    def fetch_all(self, instance_ids: Sequence[str] | None = None, *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Every subscription (``status=all``, customers expanded), one record each.

        A subscription listed twice (a server that restarts the list on a cursor it does not
        know) or a page of the wrong shape fails the run. Subscriptions without an instance
        are counted (``unassigned``). The instance -> customer links seen are remembered
        once, after the list completed.
        """
        started_at = utcnow()
        mapper = SubscriptionMapper(self._key, self._plan_map, plan_ids)
        params = {"status": "all", "limit": self._page_size, "expand[]": "data.customer"}
        what = f"GET {LIST_PATH}"
        seen: set[str] = set()
        frames: list[pd.DataFrame] = []
        invalid_frames: list[pd.DataFrame] = []
        links: dict[str, tuple[int, str]] = {}
        unassigned = 0
        pages = 0
        batch = PageFields.empty()
        observed: list[tuple[datetime, int]] = []

        def flush() -> None:
            nonlocal batch, unassigned
            valid, invalid = validate_fields(*batch.columns(), observed)
            frames.append(valid)
            invalid_frames.append(invalid)
            for instance_id, link in batch.links.items():
                known = links.get(instance_id)
                if known is None or link[0] >= known[0]:
                    links[instance_id] = link
            unassigned += batch.unassigned
            batch = PageFields.empty()
            observed.clear()

        walk = self._pipelined(LIST_PATH, params, what)
        with closing(walk):
            for data, sent_at, page_what in walk:
                pages += 1
                before = len(batch.ids)
                for subscription in data:
                    self._add_listed(subscription, page_what, seen, mapper, batch)
                if len(batch.ids) > before:
                    observed.append((sent_at, len(batch.ids) - before))
                if len(batch.ids) >= _VALIDATE_BATCH:
                    flush()
        flush()
        snapshot = BillingSnapshot(
            records=concat_frames(frames, empty_records),
            invalid=concat_frames(invalid_frames, empty_invalid),
            started_at=started_at,
            finished_at=utcnow(),
            pages=pages,
            requested_ids=None,
            unassigned=unassigned,
            provider=self.name,
        )
        logger.info(
            "Stripe API: fetched %d subscription record(s) (%d invalid, %d without an instance) in %d page(s)",
            len(snapshot.records), len(snapshot.invalid), unassigned, pages,
        )
        self._remember({i: c for i, (_, c) in links.items()})
        return snapshot

    def fetch_instances(self, instance_ids: Iterable[str], *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Each instance's subscriptions, listed by its customer.

        The customer is the remembered link, else found with Stripe's search. An instance
        none of whose subscriptions can be found is ``UNLINKED`` (left alone, reported):
        only a full list may send a paid instance to free for lack of a subscription.
        """
        ids = check_requested_ids(instance_ids)
        started_at = utcnow()
        known = self._known_links(ids)
        mapper = SubscriptionMapper(self._key, self._plan_map, plan_ids)
        found: dict[str, str] = {}
        lock = threading.Lock()

        def look_up(instance_id: str) -> Lookup:
            lookup, customer = self._look_up(instance_id, known.get(instance_id), mapper)
            if customer is not None and customer != known.get(instance_id):
                with lock:
                    found[instance_id] = customer
            return lookup

        answers, failures = look_up_each(ids, look_up, concurrency=self._concurrency, label=self._api.label)
        self._remember(found)
        return snapshot_from_lookups(
            ids, answers, failures, started_at=started_at, finished_at=utcnow(),
            provider=self.name, full=False, malformed=self._api.malformed,
        )

    # -- the full list --------------------------------------------------------------------

    def _add_listed(
        self, subscription: dict[str, Any], what: str, seen: set[str], mapper: SubscriptionMapper, out: PageFields
    ) -> None:
        sub_id = subscription["id"]
        if sub_id in seen:
            raise self._api.malformed(
                what,
                f"subscription {short_repr(sub_id)} was listed before: the list restarted "
                "(a server that ignores an unknown starting_after?); refusing to loop",
            )
        seen.add(sub_id)
        instance_id = instance_of(subscription, self._key)
        if instance_id is None and isinstance(subscription.get("customer"), str):
            raise self._api.malformed(
                what, f"subscription {short_repr(sub_id)}: its customer is not expanded (expand[]=data.customer ignored?)"
            )
        if instance_id is not None:
            problem = instance_id_problem(instance_id)
            if problem is not None:
                raise self._api.malformed(
                    what, f"subscription {short_repr(sub_id)}: metadata[{self._key!r}] is not a usable instance id: {problem}"
                )
        mapper.add(subscription, out, instance_id)

    # -- per instance ---------------------------------------------------------------------

    def _look_up(self, instance_id: str, customer: str | None, mapper: SubscriptionMapper) -> tuple[Lookup, str | None]:
        """(the instance's look-up, the customer of its newest subscription)."""
        now = int(time.time())
        sent: list[datetime] = []
        mine: dict[str, dict[str, Any]] = {}
        listed: set[str] = set()
        notes: list[str] = []

        def list_customer(customer_id: str) -> None:
            listed.add(customer_id)
            try:
                self._list_customer(customer_id, instance_id, mine, sent)
            except _NoSuchCustomer:
                notes.append(f"remembered customer {short_repr(customer_id)} is unknown to Stripe")

        if customer is not None:
            list_customer(customer)
        if not self._entitled(mine, mapper, instance_id, now):
            # No link, a stale one, or nothing entitling under it: the instance may have a
            # newer customer. Search is eventually consistent: finding none proves nothing.
            for candidate in self._search_customers(instance_id, sent):
                if candidate not in listed:
                    list_customer(candidate)
        sent_at = min(sent) if sent else utcnow()
        if not mine:
            where = notes[0] if notes else (
                "no remembered customer" if customer is None else f"customer {short_repr(customer)} has none"
            )
            reason = (
                f"no Stripe subscription found for this instance ({where}; search found none, and search "
                "lags or may be unavailable): left alone until a full sync"
            )
            return Lookup(sent_at=sent_at, status=UNLINKED, reason=reason), None
        fields = PageFields.empty()
        for subscription in sorted(mine.values(), key=_created_order):
            mapper.add(subscription, fields, instance_id)
        link = fields.links.get(instance_id)
        return Lookup(sent_at=sent_at, records=tuple(fields.records())), (link[1] if link else None)

    def _entitled(self, subscriptions: dict[str, dict[str, Any]], mapper: SubscriptionMapper, instance_id: str, now: int) -> bool:
        fields = PageFields.empty()
        for subscription in subscriptions.values():
            mapper.add(subscription, fields, instance_id)
        return any(
            entitles_at(status, end, now) for status, end in zip(fields.statuses, fields.periods)
        )

    def _list_customer(self, customer_id: str, instance_id: str, mine: dict[str, dict[str, Any]], sent: list[datetime]) -> None:
        """Add the customer's subscriptions that belong to ``instance_id`` to ``mine``."""
        params = {"customer": customer_id, "status": "all", "limit": self._page_size, "expand[]": "data.customer"}
        what = f"GET {LIST_PATH}?customer=... (instance {short_repr(instance_id)})"
        seen: set[str] = set()
        for data, sent_at, page_what in self._walk(LIST_PATH, params, what, missing_ok=True):
            sent.append(sent_at)
            for subscription in data:
                if subscription["id"] in seen:
                    raise self._api.malformed(page_what, "a subscription was listed twice: the list restarted; refusing to loop")
                seen.add(subscription["id"])
                if instance_of(subscription, self._key) == instance_id:
                    mine[subscription["id"]] = subscription

    def _search_customers(self, instance_id: str, sent: list[datetime]) -> list[str]:
        """Customers Stripe's search associates with the instance (theirs or their subscriptions'
        metadata, compared exactly: search matches case-insensitively). A server without
        search (404) finds none."""
        query = search_query(self._key, instance_id)
        found: dict[str, None] = {}
        for path, kind in ((CUSTOMER_SEARCH_PATH, "customer"), (SUBSCRIPTION_SEARCH_PATH, "subscription")):
            what = f"GET {path} (instance {short_repr(instance_id)})"
            for obj in self._search(path, query, what, sent):
                if kind == "customer":
                    if not obj.get("deleted") and _metadata(obj, self._key) == instance_id:
                        found[obj["id"]] = None
                elif _metadata(obj, self._key) == instance_id:
                    customer = obj.get("customer")
                    customer = customer.get("id") if isinstance(customer, dict) else customer
                    if isinstance(customer, str) and customer:
                        found[customer] = None
        return list(found)

    def _search(self, path: str, query: str, what: str, sent: list[datetime]) -> Iterator[dict[str, Any]]:
        page: str | None = None
        pages: set[str] = set()
        while True:
            params: dict[str, Any] = {"query": query, "limit": MAX_PAGE_SIZE}
            if page is not None:
                params["page"] = page
            response, sent_at = self._api.request("GET", path, what, params=params)
            sent.append(sent_at)
            if response.status_code == 404:
                return  # no search on this server (test servers): nothing found
            if response.status_code != 200:
                raise self._refuse(response, what)
            body = self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
            data, has_more = self._list_shape(body, what)
            yield from data
            next_page = body.get("next_page")
            if not has_more or not isinstance(next_page, str) or not next_page or next_page in pages:
                return
            pages.add(next_page)
            page = next_page

    # -- lists ----------------------------------------------------------------------------

    def _walk(
        self,
        path: str,
        params: Mapping[str, Any],
        what: str,
        *,
        pages: int | None = None,
        missing_ok: bool = False,
        start: str | None = None,
        first_page: int = 1,
    ) -> Iterator[tuple[list[dict[str, Any]], datetime, str]]:
        """Every page of a list, one after the other (``starting_after`` = the last id, until
        ``has_more`` is false) as (objects, request sent at, what); raises on a page of the
        wrong shape. ``start``: the cursor of the first page requested (``first_page``).

        ``missing_ok``: a 404 (a customer Stripe does not know) raises :class:`_NoSuchCustomer`.
        """
        cursor = start
        page = first_page - 1
        while True:
            page += 1
            page_what = f"{what} (page {page})"
            response, sent_at = self._get_page(path, params, cursor, page_what, missing_ok=missing_ok)
            body = self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), page_what)
            del response
            data, has_more = self._list_shape(body, page_what)
            yield data, sent_at, page_what
            if not has_more or (pages is not None and page >= pages):
                return
            cursor = data[-1]["id"]

    def _get_page(
        self, path: str, params: Mapping[str, Any], cursor: str | None, what: str, *,
        cancel: threading.Event | None = None, missing_ok: bool = False,
    ) -> tuple[httpx.Response, datetime]:
        """One list page's 200 response (retried by the HTTP layer), else the error."""
        query = dict(params)
        if cursor is not None:
            query["starting_after"] = cursor
        response, sent_at = self._api.request("GET", path, what, params=query, cancel=cancel)
        status = response.status_code
        if status != 200:
            if missing_ok and (status == 404 or (status == 400 and stripe_error(response)[1] == "resource_missing")):
                raise _NoSuchCustomer()
            raise self._refuse(response, what)
        return response, sent_at

    def _pipelined(
        self, path: str, params: Mapping[str, Any], what: str
    ) -> Iterator[tuple[list[dict[str, Any]], datetime, str]]:
        """:meth:`_walk`, with the next page on its way while this thread parses and maps the
        current one.

        A fetcher thread does only HTTP: it reads the next cursor (the last subscription's
        id) and ``has_more`` off the page's bytes (:func:`guess_next`) and asks for the next
        page at once. This thread parses every page and checks the guess against it: each
        page must have been asked for with the true cursor of the page before. When the
        bytes do not show the cursor plainly, or a guess was wrong, the pages fetched on it
        are dropped unused and the rest of the list is walked one page after the other
        from the true cursor. At most ``_PREFETCH_PAGES + 1`` pages are requested ahead.
        """

        def fetch(stop: threading.Event) -> Iterator[tuple[int, bytes, str, datetime, str | None, Any]]:
            cursor: str | None = None
            page = 0
            while not stop.is_set():
                page += 1
                response, sent_at = self._get_page(path, params, cursor, f"{what} (page {page})", cancel=stop)
                if stop.is_set():
                    return
                content, content_type = response.content, response.headers.get("Content-Type", "unknown")
                del response
                guess = guess_next(content)
                yield page, content, content_type, sent_at, cursor, guess
                if not isinstance(guess, str):
                    return
                cursor = guess

        expected: str | None = None
        page = 0
        with closing(_prefetched(fetch, _PREFETCH_PAGES, "stripe-pages")) as walk:
            for page_no, content, content_type, sent_at, used, guess in walk:
                if used != expected:
                    break  # asked for with a wrong guess: drop it, walk on from the true cursor
                page = page_no
                page_what = f"{what} (page {page})"
                body = self._api.parse_json(content, content_type, page_what)
                del content
                data, has_more = self._list_shape(body, page_what)
                del body
                yield data, sent_at, page_what
                if not has_more:
                    return
                expected = data[-1]["id"]
                if guess != expected:
                    break
        if expected is not None:
            yield from self._walk(path, params, what, start=expected, first_page=page + 1)

    def _list_shape(self, body: Any, what: str) -> tuple[list[dict[str, Any]], bool]:
        if not isinstance(body, dict):
            raise self._api.malformed(what, f"expected a list object, got {json_type(body)}")
        data = body.get("data")
        if not isinstance(data, list):
            raise self._api.malformed(what, "list has no 'data' array")
        has_more = body.get("has_more")
        if not isinstance(has_more, bool):
            raise self._api.malformed(what, "list has no boolean 'has_more'")
        for n, obj in enumerate(data):
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                raise self._api.malformed(what, f"object #{n + 1} is not an object with an id")
        if has_more and not data:
            raise self._api.malformed(what, "an empty page says has_more: cannot page on")
        return data, has_more

    def _refuse(self, response: httpx.Response, what: str) -> BillingError:
        """The error for a non-2xx answer, with Stripe's error type, code and message."""
        status = response.status_code
        kind, code, message = stripe_error(response)
        detail = "/".join(p for p in (kind, code) if p)
        if status == 401:
            return self._api.error(BillingAuthError, f"Stripe API rejected the API key (HTTP 401{f', {detail}' if detail else ''})")
        if status == 403:
            return self._api.error(
                BillingAuthError,
                f"Stripe API refused the API key for {what} (HTTP 403{f', {detail}' if detail else ''}): "
                "a restricted key needs read access to Subscriptions and Customers",
            )
        if 400 <= status < 500 and status != 404 and (detail or message):
            text = f"Stripe API refused {what}: HTTP {status}" + (f" ({detail})" if detail else "") + (f": {message}" if message else "")
            return self._api.error(BillingError, text)
        return self._api.refuse(response, what)

    # -- remembered links -----------------------------------------------------------------

    def _known_links(self, ids: Sequence[str]) -> dict[str, str]:
        if self._links is None or not ids:
            return {}
        try:
            return dict(self._links.customers_of(ids))
        except Exception as exc:  # noqa: BLE001 - a cache: without it, search is asked instead
            logger.warning(
                "Stripe: remembered customer links could not be read (%s); searching instead", self._api.mask(_one_line(exc))
            )
            return {}

    def _remember(self, links: Mapping[str, str]) -> None:
        if self._links is None or not links:
            return
        try:
            self._links.remember(dict(links))
        except Exception as exc:  # noqa: BLE001 - the links are a cache: the run's answer stands
            logger.warning(
                "Stripe: %d customer link(s) could not be remembered (%s)", len(links), self._api.mask(_one_line(exc))
            )


def _created_order(subscription: Mapping[str, Any]) -> tuple[int, str]:
    created = subscription.get("created")
    return (created if type(created) is int else -1, str(subscription.get("id")))


def _metadata(obj: Mapping[str, Any], key: str) -> Any:
    metadata = obj.get("metadata")
    return metadata.get(key) if isinstance(metadata, dict) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
