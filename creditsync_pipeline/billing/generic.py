"""The generic provider: the SPEC "Billing API" (``BILLING_PROVIDER=generic``, the default).

``GET /v1/subscriptions?limit=L&cursor=C`` lists every record (pipelined: the next page is on
its way while this thread parses the current one); ``GET /v1/subscriptions/{id}`` answers
one instance, or 404 ``{"error": "subscription_not_found"}`` when it has no subscription at
all. Any other 404 (an HTML page, ``{"detail": "Not Found"}``, a gateway's
``{"message": "no Route matched"}``) is an error, never "no subscription".

Failure policy (SPEC "Reconciliation rules"): anything that could make the full list
incomplete or untrustworthy raises a :class:`BillingError`, so the run writes nothing --
transient faults are retried first (:class:`.http.HttpApi`). A per-instance look-up that
fails leaves that instance alone (``snapshot.unresolved``). The bearer token never appears
in an exception message, a repr or a log line.
"""

from __future__ import annotations

import logging
import queue
import re
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import closing
from datetime import datetime
from typing import Any

import httpx
import pandas as pd

from ..settings import Settings
from .base import BillingSnapshot, Budget, CustomerLinks, HttpProvider, Lookup, check_requested_ids, look_up_each, map_plans, snapshot_from_lookups
from .http import HttpApi, json_type, quote_id, utcnow
from .records import BadRecord, concat_frames, empty_invalid, empty_records, record_fields, record_ids, short_repr, validate_fields

__all__ = ["GenericBillingClient", "NOT_FOUND_CODE", "tail_cursor"]

logger = logging.getLogger("creditsync.billing")

#: the one 404 body that means "this instance has no subscription at all"
NOT_FOUND_CODE = "subscription_not_found"
_LIST_PATH = "/v1/subscriptions"
_VALIDATE_BATCH = 20_000
#: raw pages the fetcher thread may queue ahead of the parser (~170 KB each at 1000 records)
_PREFETCH_PAGES = 4
_NO_GUESS: Any = object()
#: ``"next_cursor": null | "..."`` as the last member of the page object (no escapes inside)
_TAIL_CURSOR_RE = re.compile(rb'"next_cursor"\s*:\s*(?:(null)|"([^"\\]*)")\s*\}\s*\Z')
#: one list page as ``GenericBillingClient._pages`` yields it: (instance ids, records, request sent at)
_Page = tuple[list[str], list[Any], datetime]


def tail_cursor(content: bytes) -> str | None | Any:
    """The page's ``next_cursor`` read off the end of its body without parsing it.

    ``NO_GUESS`` when the body does not end with that member (or the cursor holds an
    escape); the parsed page is always checked against the guess.
    """
    match = _TAIL_CURSOR_RE.search(content, max(0, len(content) - 4096))
    if match is None:
        return _NO_GUESS
    if match.group(1) is not None:
        return None
    try:
        return match.group(2).decode("utf-8") or _NO_GUESS
    except UnicodeDecodeError:
        return _NO_GUESS


NO_GUESS = _NO_GUESS


class GenericBillingClient(HttpProvider):
    """The SPEC Billing API over one pooled ``httpx.Client``: list pages, per-instance look-ups."""

    name = "generic"
    lists_all = True

    def __init__(
        self,
        base_url: str,
        token: str,
        *,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        page_size: int = 1000,
        transport: httpx.BaseTransport | None = None,
        concurrency: int = 4,
        plan_map: Mapping[str, str] | None = None,
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ValueError("billing API token is empty")
        token = token.strip()
        if not (token.isascii() and token.isprintable()):
            raise ValueError("billing API token contains characters not allowed in an HTTP header")
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._api = HttpApi(
            base_url,
            headers={"Authorization": f"Bearer {token}"},
            secrets=[token],
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            max_connections=concurrency + 1,
            transport=transport,
        )
        self._page_size = page_size
        self._concurrency = concurrency
        self._plan_map = dict(plan_map or {})

    @classmethod
    def from_settings(
        cls, cfg: Settings, *, budget: Budget, links: CustomerLinks | None = None
    ) -> GenericBillingClient:
        return cls(
            cfg.billing_api_url,
            cfg.require_billing_token(),
            **budget.http_options(),
            page_size=cfg.billing_page_size,
            plan_map=cfg.plan_map,
        )

    def __repr__(self) -> str:
        return f"GenericBillingClient(base_url={self.base_url!r}, page_size={self._page_size})"

    # -- the contract ---------------------------------------------------------------------

    def check_access(self, instance_ids: Sequence[str] = ()) -> str:
        """One list page of one record: reachable, token accepted, the page of the SPEC shape."""
        what = f"GET {_LIST_PATH} (access check)"
        response, _ = self._api.request("GET", _LIST_PATH, what, params={"limit": 1})
        if response.status_code != 200:
            raise self._api.refuse(response, what)
        self._page_shape(self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what), what)
        return f"billing API at {self.base_url} answered a list page with the token accepted"

    def fetch_all(self, instance_ids: Sequence[str] | None = None, *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Fetch every page of ``GET /v1/subscriptions``, following ``next_cursor``.

        The pages are pipelined (see :meth:`_pages`): the next page is already on its way
        while this thread parses and validates the current one.
        """
        started_at = utcnow()
        frames: list[pd.DataFrame] = []
        invalid_frames: list[pd.DataFrame] = []
        # Pages are validated in batches: pandas' per-call overhead dominates at 1000 rows.
        # Each page's fields are taken out as it arrives; the record dicts are not kept.
        batch_ids: list[str] = []
        batch_fields: tuple[list[Any], ...] = ([], [], [], [])
        batch_pages: list[tuple[datetime, int]] = []

        def flush() -> None:
            plans, *rest = batch_fields
            valid, invalid = validate_fields(batch_ids, map_plans(plans, self._plan_map), *rest, batch_pages)
            frames.append(valid)
            invalid_frames.append(invalid)
            batch_ids.clear()
            for column in batch_fields:
                column.clear()
            batch_pages.clear()

        pages = 0
        with closing(self._pages()) as walk:  # closed at once on any failure here
            for ids, data, sent_at in walk:
                pages += 1
                for column, values in zip(batch_fields, record_fields(data)):
                    column.extend(values)
                batch_ids.extend(ids)
                batch_pages.append((sent_at, len(data)))
                del data
                if len(batch_ids) >= _VALIDATE_BATCH:
                    flush()
        flush()
        snapshot = BillingSnapshot(
            records=concat_frames(frames, empty_records),
            invalid=concat_frames(invalid_frames, empty_invalid),
            started_at=started_at,
            finished_at=utcnow(),
            pages=pages,
            requested_ids=None,
            provider=self.name,
        )
        logger.info(
            "billing API: fetched %d record(s) (%d invalid) in %d page(s)",
            len(snapshot.records), len(snapshot.invalid), snapshot.pages,
        )
        return snapshot

    def fetch_instances(self, instance_ids: Iterable[str], *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """``GET /v1/subscriptions/{id}`` for each distinct id (404 ``subscription_not_found`` -> none)."""
        ids = check_requested_ids(instance_ids)
        started_at = utcnow()
        answers, failures = look_up_each(
            ids, self._look_up, concurrency=self._concurrency, label=self._api.label
        )
        return snapshot_from_lookups(
            ids, answers, failures, started_at=started_at, finished_at=utcnow(),
            provider=self.name, full=False, malformed=self._api.malformed,
        )

    # -- per instance ---------------------------------------------------------------------

    def _look_up(self, instance_id: str) -> Lookup:
        """One instance's record (none when billing has no subscription for it)."""
        path = f"{_LIST_PATH}/{quote_id(instance_id)}"
        what = f"GET {_LIST_PATH}/{{id}} (instance {short_repr(instance_id)})"
        response, sent_at = self._api.request("GET", path, what)
        status = response.status_code
        if status == 404:
            if self._api.error_code(response) == f" ({NOT_FOUND_CODE})":
                return Lookup(sent_at=sent_at)
            raise self._api.malformed(
                what, f"HTTP 404 without {{\"error\": \"{NOT_FOUND_CODE}\"}}; {self._api.url_hint()}"
            )
        if status != 200:
            raise self._api.refuse(response, what)
        body = self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
        if not isinstance(body, dict):
            raise self._api.malformed(what, f"expected a record object, got {json_type(body)}")
        if self._plan_map and isinstance(body.get("plan_id"), str):
            body = {**body, "plan_id": self._plan_map.get(body["plan_id"], body["plan_id"])}
        return Lookup(sent_at=sent_at, records=(body,))

    # -- the list -------------------------------------------------------------------------

    def _pages(self) -> Iterator[_Page]:
        """Every list page in order as (ids, records, request sent at); raises on a bad page.

        Two threads share the work. A fetcher thread (:meth:`_fetch_pages`) does only
        HTTP: as soon as a page's bytes are in, it reads ``next_cursor`` off the end of
        the body and asks for the next page, while this thread parses the page, checks
        its shape, its cursor (it must equal the one read off the end) and every record's
        ``instance_id``. The fetcher waits for this thread's cursor instead when the end
        of the body does not show one (other key order, escapes) or shows a cursor seen
        before. At most ``_PREFETCH_PAGES`` raw pages wait between the threads, so at most
        ``_PREFETCH_PAGES + 1`` pages past a malformed page are requested, and none of
        them is used: the first failure of either thread stops both and is raised here.
        """
        handoff: queue.Queue[Any] = queue.Queue(maxsize=_PREFETCH_PAGES)
        cursors: queue.Queue[Any] = queue.Queue()
        stop = threading.Event()

        def fetch() -> None:
            try:
                self._fetch_pages(handoff, cursors, stop)
            except BaseException as exc:  # noqa: BLE001 - handed over, raised by the consumer
                handoff.put(exc)

        fetcher = threading.Thread(target=fetch, name="billing-pages", daemon=True)
        fetcher.start()
        seen_cursors: set[str] = set()
        try:
            while True:
                item = handoff.get()
                if isinstance(item, BaseException):
                    raise item
                page, content, content_type, sent_at, guess = item
                what = f"GET {_LIST_PATH} (page {page})"
                body = self._api.parse_json(content, content_type, what)
                del content
                data, next_cursor = self._page_shape(body, what)
                try:
                    ids = record_ids(data)
                except BadRecord as exc:
                    raise self._api.malformed(what, f"unusable record: {exc}") from None
                if next_cursor is not None:
                    if next_cursor in seen_cursors:
                        raise self._api.malformed(
                            what, "next_cursor repeats an earlier cursor; refusing to loop over the same pages"
                        )
                    seen_cursors.add(next_cursor)
                if guess is _NO_GUESS:
                    cursors.put(next_cursor)
                elif guess != next_cursor:  # only a body that is not valid JSON could do this
                    raise self._api.malformed(what, "next_cursor differs from the end of the body")
                yield ids, data, sent_at
                if next_cursor is None:
                    return
        finally:
            stop.set()
            cursors.put(None)  # a fetcher waiting for a cursor stops
            while fetcher.is_alive():  # unblock a pending put, then let the fetcher finish
                try:
                    handoff.get(timeout=0.05)
                except queue.Empty:
                    pass
            fetcher.join()

    def _fetch_pages(self, handoff: queue.Queue[Any], cursors: queue.Queue[Any], stop: threading.Event) -> None:
        """The fetcher thread of :meth:`_pages`: request pages, hand over their raw bytes."""
        seen: set[str] = set()
        cursor: str | None = None
        page = 0
        while not stop.is_set():
            page += 1
            what = f"GET {_LIST_PATH} (page {page})"
            params: dict[str, Any] = {"limit": self._page_size}
            if cursor is not None:
                params["cursor"] = cursor
            response, sent_at = self._api.request("GET", _LIST_PATH, what, params=params, cancel=stop)
            if stop.is_set():
                return
            if response.status_code != 200:
                raise self._api.refuse(response, what)
            content = response.content
            content_type = response.headers.get("Content-Type", "unknown")
            del response
            guess = tail_cursor(content)
            if isinstance(guess, str) and guess in seen:
                guess = _NO_GUESS  # let the consumer name the loop
            while True:
                if stop.is_set():
                    return
                try:
                    handoff.put((page, content, content_type, sent_at, guess), timeout=0.05)
                    break
                except queue.Full:
                    continue
            if guess is _NO_GUESS:
                guess = cursors.get()  # the consumer's parsed cursor (None: last page or stop)
            if guess is None:
                return
            seen.add(guess)
            cursor = guess

    def _page_shape(self, body: Any, what: str) -> tuple[list[Any], str | None]:
        if not isinstance(body, dict):
            raise self._api.malformed(what, f"expected a page object, got {json_type(body)}")
        data = body.get("data")
        if not isinstance(data, list):
            raise self._api.malformed(what, "page has no 'data' list")
        if "next_cursor" not in body:
            raise self._api.malformed(what, "page has no 'next_cursor'")
        next_cursor = body["next_cursor"]
        if next_cursor is not None and (not isinstance(next_cursor, str) or not next_cursor):
            raise self._api.malformed(what, "page has an invalid 'next_cursor' (expected a non-empty string or null)")
        return data, next_cursor

