"""The HTTP layer every billing provider shares: one pooled client, explicit timeouts, retries.

:class:`HttpApi` wraps one ``httpx.Client`` (explicit connect/read timeouts, a bounded pool,
no redirects). :meth:`HttpApi.request` retries what is worth retrying (tenacity): 5xx,
timeouts and dropped connections with exponential backoff plus jitter, and 429 after the
``Retry-After`` the server asked for (capped). Anything else is handed back to the provider,
which knows what its status codes mean; :meth:`HttpApi.refuse` turns the common ones
(401/403, redirects, other 4xx and 5xx) into the :mod:`.errors` hierarchy.

Every message it builds passes :meth:`HttpApi.error`, which masks each secret the client
was given (tokens, API keys, app secrets), so no exception, log line or report can hold one.
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
import orjson
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set
from tenacity.wait import wait_exponential, wait_random

from .errors import BillingAuthError, BillingError, BillingMalformedError, BillingUnavailableError

__all__ = ["HttpApi", "json_type", "loads", "parse_retry_after", "quote_id", "safe_base_url", "utcnow"]

logger = logging.getLogger("creditsync.billing")

_SAFE_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


class _Transient(Exception):
    """Internal: a retryable failure of one attempt."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP-date); None if unusable."""
    if value is None:
        return None
    value = value.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", value):
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - utcnow()).total_seconds())


def quote_id(instance_id: str) -> str:
    """Percent-encode an id as one path segment (dot segments too, so nothing normalises them)."""
    quoted = quote(instance_id, safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return quoted


def safe_base_url(base_url: str, label: str = "billing API") -> httpx.URL:
    """``base_url`` as an absolute http(s) URL without userinfo; ValueError otherwise."""
    try:
        url = httpx.URL(base_url)
    except (httpx.InvalidURL, TypeError):
        raise ValueError(f"{label} URL must be an absolute http(s) URL") from None
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError(f"{label} URL must be an absolute http(s) URL")
    if url.userinfo:
        url = url.copy_with(username=None, password=None)
    return url


def loads(content: bytes) -> Any:
    """``json.loads`` semantics at orjson speed.

    orjson refuses a few things the stdlib accepts (integers beyond 64 bits, NaN,
    lone surrogates); such a body is re-read by the stdlib, so every body means
    exactly what ``json.loads`` says it means.
    """
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def json_type(value: Any) -> str:
    """JSON name of a decoded value's type (for messages)."""
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


class HttpApi:
    """One provider API: a pooled ``httpx.Client`` plus the retry policy and error building.

    ``label`` names the API in messages ("billing API", "Wix API", ...), ``url_setting`` the
    setting an operator checks when the URL looks wrong, ``credentials`` what a 401 refused
    ("the token", "the API key"). ``secrets`` are masked in every
    message. Tests swap :attr:`sleep` to record the pauses between attempts.
    """

    def __init__(
        self,
        base_url: str,
        *,
        label: str = "billing API",
        url_setting: str = "BILLING_API_URL",
        credentials: str = "the token",
        headers: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        max_connections: int = 5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if backoff_initial < 0 or backoff_max < 0 or max_retry_after < 0:
            raise ValueError("backoff and retry-after limits must be >= 0")
        url = safe_base_url(base_url, label)
        self.label = label
        self.url_setting = url_setting
        self.credentials = credentials
        self.base_url = str(url).rstrip("/")
        self.max_attempts = max_attempts
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)
        self._backoff_max = backoff_max
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + wait_random(0, backoff_initial)
        self._max_retry_after = max_retry_after
        self.sleep: Callable[[float], None] = time.sleep  # swapped by tests
        self._closed = False
        self._client = httpx.Client(
            base_url=self.base_url,
            headers={"Accept": "application/json", "User-Agent": "creditsync-billing/1", **dict(headers or {})},
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"HttpApi({self.label}, base_url={self.base_url!r})"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Close the connection pool."""
        if not self._closed:
            self._closed = True
            self._client.close()

    # -- messages -----------------------------------------------------------------------------

    def mask(self, text: str) -> str:
        """``text`` with every secret of this client replaced by ``***``."""
        for secret in self._secrets:
            text = text.replace(secret, "***")
        return text

    def error(self, cls: type[BillingError], message: str) -> BillingError:
        """An exception whose message is guaranteed not to contain a secret."""
        return cls(self.mask(message))

    def malformed(self, what: str, detail: str) -> BillingError:
        return self.error(BillingMalformedError, f"{self.label} response malformed: {what}: {detail}")

    def url_hint(self) -> str:
        return f"is {self.url_setting} right? ({self.base_url})"

    # -- requests -----------------------------------------------------------------------------

    def request(
        self,
        method: str,
        path: str,
        what: str,
        *,
        params: Mapping[str, Any] | None = None,
        json_body: Any = None,
        headers: Mapping[str, str] | None = None,
        cancel: threading.Event | None = None,
    ) -> tuple[httpx.Response, datetime]:
        """Send with retries; return (response, when the successful attempt was sent).

        The response is anything but a 429 or a 5xx (those are retried, then raised as
        :class:`BillingUnavailableError`). ``cancel`` (a page fetcher's stop signal) cuts
        a pause between attempts short and ends the retries, so a stopped fetch never
        waits out a long ``Retry-After``.
        """
        if self._closed:
            raise BillingError(f"{self.label} client is closed")
        stop = stop_after_attempt(self.max_attempts)
        retrying = Retrying(
            stop=stop if cancel is None else stop | stop_when_event_set(cancel),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=lambda state: self._log_retry(what, state),
            sleep=lambda seconds: self._pause(seconds, cancel),
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, params, json_body, headers)
        except _Transient as exc:
            detail = exc.detail.removeprefix("returned ")
            raise self.error(
                BillingUnavailableError,
                f"{self.label} unavailable: {what} failed after {self.max_attempts} attempts: {detail}"
                + (f" ({self.base_url})" if "connection failed" in detail else ""),
            ) from exc.__cause__

    def _attempt(
        self,
        method: str,
        path: str,
        params: Mapping[str, Any] | None,
        json_body: Any,
        headers: Mapping[str, str] | None,
    ) -> tuple[httpx.Response, datetime]:
        """One HTTP attempt; raises _Transient for anything worth retrying."""
        sent_at = utcnow()
        try:
            response = self._client.request(method, path, params=params, json=json_body, headers=headers)
        except httpx.UnsupportedProtocol:
            raise self.error(BillingError, f"{self.label} URL is not usable ({self.base_url})") from None
        except httpx.LocalProtocolError:
            # Our own request could not be sent (e.g. an illegal header); retrying cannot help.
            raise self.error(BillingError, f"{self.label} request could not be built (local protocol error)") from None
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from exc
        except httpx.DecodingError:
            raise self.error(BillingMalformedError, f"{self.label} response malformed: body could not be decoded") from None
        status = response.status_code
        if status == 429:
            raise _Transient("returned HTTP 429", retry_after=parse_retry_after(response.headers.get("Retry-After")))
        if status >= 500:
            raise _Transient(f"returned HTTP {status}")
        return response, sent_at

    def _wait(self, retry_state: RetryCallState) -> float:
        """tenacity wait: honour Retry-After on 429 (capped), else exponential backoff + jitter."""
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        if isinstance(exc, _Transient) and exc.retry_after is not None:
            return min(exc.retry_after, self._max_retry_after)
        return min(float(self._backoff(retry_state)), self._backoff_max)

    def _log_retry(self, what: str, retry_state: RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome is not None else None
        detail = exc.detail if isinstance(exc, _Transient) else type(exc).__name__
        delay = retry_state.next_action.sleep if retry_state.next_action is not None else 0.0
        message = (
            f"{self.label} {detail} on {what}; retrying in {delay:.1f}s "
            f"(attempt {retry_state.attempt_number + 1}/{self.max_attempts})"
        )
        logger.warning("%s", self.mask(message))

    def _pause(self, seconds: float, cancel: threading.Event | None) -> None:
        """Wait between attempts; a set ``cancel`` ends a real wait at once."""
        if cancel is not None and self.sleep is time.sleep:
            cancel.wait(seconds)
        else:
            self.sleep(seconds)  # tests swap ``sleep`` to record the waits

    # -- bodies -------------------------------------------------------------------------------

    def parse_json(self, content: bytes, content_type: str, what: str, status: int = 200) -> Any:
        """The JSON of a body, or a one-line malformed error naming its content type."""
        try:
            return loads(content)
        except (ValueError, RecursionError):
            kind = content_type.split(";")[0].strip()[:60]
            raise self.malformed(what, f"non-JSON body (HTTP {status}, content-type {kind})") from None

    @staticmethod
    def error_code(response: httpx.Response, key: str = "error") -> str:
        """A short, sanitised error code from a JSON error body (``{"error": code}`` or
        ``{"error": {"code"|"type": code}}``), as `` (code)``; else ''."""
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):
            return ""
        code = body.get(key) if isinstance(body, dict) else None
        if isinstance(code, dict):
            code = code.get("code") or code.get("type")
        if isinstance(code, str) and _SAFE_CODE_RE.fullmatch(code):
            return f" ({code})"
        return ""

    def refuse(self, response: httpx.Response, what: str) -> BillingError:
        """The error for a response the provider has no special meaning for (never a 2xx)."""
        status = response.status_code
        if status in (401, 403):
            return self.error(BillingAuthError, f"{self.label} rejected {self.credentials} (HTTP {status})")
        if status == 404:
            return self.malformed(what, f"HTTP 404{self.error_code(response)}; {self.url_hint()}")
        if 300 <= status < 400:
            return self.malformed(what, f"unexpected redirect (HTTP {status}); {self.url_hint()}")
        if 400 <= status < 500:
            return self.error(BillingError, f"{self.label} refused {what}: HTTP {status}{self.error_code(response)}")
        return self.malformed(what, f"unexpected HTTP {status}")
