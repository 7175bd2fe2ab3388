"""Stripe's list API over HTTP: pages, the pipelined walk, search, Stripe's errors.

The I/O half of the Stripe provider (:mod:`.provider` decides what to ask and what the
answers mean). Every request goes through :class:`..http.HttpApi` (retries, masking).
"""

from __future__ import annotations

import queue
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import closing
from datetime import datetime
from typing import Any, TypeVar

import httpx

from ..errors import BillingAuthError, BillingError
from ..http import HttpApi, json_type

__all__ = [
    "CUSTOMER_SEARCH_PATH",
    "LIST_PATH",
    "MAX_PAGE_SIZE",
    "SUBSCRIPTION_SEARCH_PATH",
    "UNKNOWN",
    "NoSuchCustomer",
    "StripeLists",
    "guess_next",
    "search_query",
    "stripe_error",
]

LIST_PATH = "/v1/subscriptions"
CUSTOMER_SEARCH_PATH = "/v1/customers/search"
SUBSCRIPTION_SEARCH_PATH = "/v1/subscriptions/search"
#: Stripe's largest ``limit``
MAX_PAGE_SIZE = 100
#: pages the fetcher thread may hold ahead of the mapper (a page of 100 expanded subscriptions: ~0.4 MB)
_PREFETCH_PAGES = 4
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


class NoSuchCustomer(Exception):
    """A remembered customer Stripe no longer knows (404 on its list)."""


class StripeLists:
    """Stripe's list endpoints for one provider: pages, search, errors in Stripe's words."""

    def __init__(self, api: HttpApi, page_size: int = MAX_PAGE_SIZE) -> None:
        self.api = api
        self.page_size = page_size

    def search(self, path: str, query: str, what: str, sent: list[datetime]) -> Iterator[dict[str, Any]]:
        """Every hit of a search (``page`` = ``next_page``), noting when each request was sent in
        ``sent``; a server without search (404) has none."""
        page: str | None = None
        pages: set[str] = set()
        while True:
            params: dict[str, Any] = {"query": query, "limit": MAX_PAGE_SIZE}
            if page is not None:
                params["page"] = page
            response, sent_at = self.api.request("GET", path, what, params=params)
            sent.append(sent_at)
            if response.status_code == 404:
                return  # no search on this server (test servers): nothing found
            if response.status_code != 200:
                raise self.refuse(response, what)
            body = self.api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
            data, has_more = self.list_shape(body, what)
            yield from data
            next_page = body.get("next_page")
            if not has_more or not isinstance(next_page, str) or not next_page or next_page in pages:
                return
            pages.add(next_page)
            page = next_page

    def walk(
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

        ``missing_ok``: a 404 (a customer Stripe does not know) raises :class:`NoSuchCustomer`.
        """
        cursor = start
        page = first_page - 1
        while True:
            page += 1
            page_what = f"{what} (page {page})"
            response, sent_at = self.get_page(path, params, cursor, page_what, missing_ok=missing_ok)
            body = self.api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), page_what)
            del response
            data, has_more = self.list_shape(body, page_what)
            yield data, sent_at, page_what
            if not has_more or (pages is not None and page >= pages):
                return
            cursor = data[-1]["id"]

    def get_page(
        self, path: str, params: Mapping[str, Any], cursor: str | None, what: str, *,
        cancel: threading.Event | None = None, missing_ok: bool = False,
    ) -> tuple[httpx.Response, datetime]:
        """One list page's 200 response (retried by the HTTP layer), else the error."""
        query = dict(params)
        if cursor is not None:
            query["starting_after"] = cursor
        response, sent_at = self.api.request("GET", path, what, params=query, cancel=cancel)
        status = response.status_code
        if status != 200:
            if missing_ok and (status == 404 or (status == 400 and stripe_error(response)[1] == "resource_missing")):
                raise NoSuchCustomer()
            raise self.refuse(response, what)
        return response, sent_at

    def pipelined(
        self, path: str, params: Mapping[str, Any], what: str
    ) -> Iterator[tuple[list[dict[str, Any]], datetime, str]]:
        """:meth:`walk`, with the next page on its way while this thread parses and maps the
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
                response, sent_at = self.get_page(path, params, cursor, f"{what} (page {page})", cancel=stop)
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
                body = self.api.parse_json(content, content_type, page_what)
                del content
                data, has_more = self.list_shape(body, page_what)
                del body
                yield data, sent_at, page_what
                if not has_more:
                    return
                expected = data[-1]["id"]
                if guess != expected:
                    break
        if expected is not None:
            yield from self.walk(path, params, what, start=expected, first_page=page + 1)

    def list_shape(self, body: Any, what: str) -> tuple[list[dict[str, Any]], bool]:
        if not isinstance(body, dict):
            raise self.api.malformed(what, f"expected a list object, got {json_type(body)}")
        data = body.get("data")
        if not isinstance(data, list):
            raise self.api.malformed(what, "list has no 'data' array")
        has_more = body.get("has_more")
        if not isinstance(has_more, bool):
            raise self.api.malformed(what, "list has no boolean 'has_more'")
        for n, obj in enumerate(data):
            if not isinstance(obj, dict) or not isinstance(obj.get("id"), str) or not obj["id"]:
                raise self.api.malformed(what, f"object #{n + 1} is not an object with an id")
        if has_more and not data:
            raise self.api.malformed(what, "an empty page says has_more: cannot page on")
        return data, has_more

    def refuse(self, response: httpx.Response, what: str) -> BillingError:
        """The error for a non-2xx answer, with Stripe's error type, code and message."""
        status = response.status_code
        kind, code, message = stripe_error(response)
        detail = "/".join(p for p in (kind, code) if p)
        if status == 401:
            return self.api.error(BillingAuthError, f"Stripe API rejected the API key (HTTP 401{f', {detail}' if detail else ''})")
        if status == 403:
            return self.api.error(
                BillingAuthError,
                f"Stripe API refused the API key for {what} (HTTP 403{f', {detail}' if detail else ''}): "
                "a restricted key needs read access to Subscriptions and Customers",
            )
        if 400 <= status < 500 and status != 404 and (detail or message):
            text = f"Stripe API refused {what}: HTTP {status}" + (f" ({detail})" if detail else "") + (f": {message}" if message else "")
            return self.api.error(BillingError, text)
        return self.api.refuse(response, what)
