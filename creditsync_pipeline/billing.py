"""Client for the billing API (SPEC "Billing API"): the authoritative side of the sync.

``BillingClient.fetch_all`` walks every page of ``GET /v1/subscriptions``;
``BillingClient.fetch_instances`` fetches chosen instances one by one. Both return a
``BillingSnapshot`` whose ``records`` frame holds the validated subscription records
and whose ``invalid`` frame holds records that carry a usable ``instance_id`` but fail
validation (SPEC mismatch kind ``invalid_record``).

Failure policy (SPEC "Reconciliation rules"): anything that could make the snapshot
incomplete or untrustworthy raises a ``BillingError`` so the run writes nothing --
transient faults are retried first (tenacity), 429 honours ``Retry-After``.
The bearer token never appears in an exception message, a repr or a log line.
"""

from __future__ import annotations

import json
import logging
import math
import queue
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Any
from urllib.parse import quote

import httpx
import numpy as np
import orjson
import pandas as pd
from tenacity import RetryCallState, Retrying, retry_if_exception_type, stop_after_attempt, stop_when_event_set
from tenacity.wait import wait_exponential, wait_random

__all__ = [
    "INVALID_COLUMNS",
    "MAX_INSTANCE_ID_LENGTH",
    "RECORD_COLUMNS",
    "STATUSES",
    "BillingAuthError",
    "BillingClient",
    "BillingError",
    "BillingMalformedError",
    "BillingSnapshot",
    "BillingUnavailableError",
    "instance_id_problem",
]

logger = logging.getLogger("creditsync.billing")

RECORD_COLUMNS = ["instance_id", "plan_id", "status", "current_period_end", "updated_at", "observed_at"]
INVALID_COLUMNS = ["instance_id", "reason"]
STATUSES = ("active", "trialing", "past_due", "canceled", "expired")
MAX_INSTANCE_ID_LENGTH = 256
_STATUS_SET = frozenset(STATUSES)
_VALIDATE_BATCH = 20_000
#: raw pages the fetcher thread may queue ahead of the parser (~170 KB each at 1000 records)
_PREFETCH_PAGES = 4
_NO_GUESS: Any = object()
#: ``"next_cursor": null | "..."`` as the last member of the page object (no escapes inside)
_TAIL_CURSOR_RE = re.compile(rb'"next_cursor"\s*:\s*(?:(null)|"([^"\\]*)")\s*\}\s*\Z')
#: one list page as ``BillingClient._pages`` yields it: (instance ids, records, request sent at)
_Page = tuple[list[str], list[Any], datetime]

_LIST_PATH = "/v1/subscriptions"
_TS_DTYPE = "datetime64[ns, UTC]"
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_TS_MIN = pd.Timestamp.min.tz_localize("UTC").ceil("us")
_TS_MAX = pd.Timestamp.max.tz_localize("UTC").floor("us")
_TS_MIN_PY = _TS_MIN.to_pydatetime()
_TS_MAX_PY = _TS_MAX.to_pydatetime()
_SAFE_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")


# -- errors ----------------------------------------------------------------------------------


class BillingError(Exception):
    """Base class; ``str()`` is one line and never contains the token."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BillingAuthError(BillingError):
    """The billing API rejected the token (HTTP 401/403); never retried."""


class BillingUnavailableError(BillingError):
    """5xx, timeouts, dropped connections or 429s that persisted after every attempt."""


class BillingMalformedError(BillingError):
    """A response that is not of the SPEC shape (incl. a record without a usable id)."""


class _Transient(Exception):
    """Internal: a retryable failure of one attempt."""

    def __init__(self, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.retry_after = retry_after


class _BadRecord(Exception):
    """Internal: a record without a usable ``instance_id`` (fails the whole fetch)."""


# -- snapshot --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class BillingSnapshot:
    """What billing said, when it said it, and which records could not be used."""

    records: pd.DataFrame
    invalid: pd.DataFrame
    started_at: datetime
    finished_at: datetime
    pages: int
    requested_ids: tuple[str, ...] | None

    def __repr__(self) -> str:
        scope = "full" if self.requested_ids is None else f"{len(self.requested_ids)} requested"
        return (
            f"BillingSnapshot({scope}, records={len(self.records)}, invalid={len(self.invalid)}, "
            f"pages={self.pages}, started_at={self.started_at.isoformat()})"
        )


def _empty_records() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "instance_id": pd.Series([], dtype=object),
            "plan_id": pd.Series([], dtype=object),
            "status": pd.Series([], dtype=object),
            "current_period_end": pd.Series([], dtype=_TS_DTYPE),
            "updated_at": pd.Series([], dtype=_TS_DTYPE),
            "observed_at": pd.Series([], dtype=_TS_DTYPE),
        }
    )


def _empty_invalid() -> pd.DataFrame:
    return pd.DataFrame({"instance_id": pd.Series([], dtype=object), "reason": pd.Series([], dtype=object)})


def _concat(frames: list[pd.DataFrame], empty: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty()
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    return pd.concat(frames, ignore_index=True)


# -- validation ------------------------------------------------------------------------------


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def instance_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable instance id (None when it is)."""
    if value is None:
        return "missing instance_id"
    if not isinstance(value, str):
        return f"instance_id is not a string ({type(value).__name__})"
    if not value:
        return "empty instance_id"
    if len(value) > MAX_INSTANCE_ID_LENGTH:
        return f"instance_id longer than {MAX_INSTANCE_ID_LENGTH} characters"
    if _CONTROL_RE.search(value):
        return f"instance_id contains control characters: {_short(value)}"
    return None


def _parse_timestamps(values: list[Any]) -> tuple[pd.Series, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ISO-8601 values (no offset = UTC), vectorised.

    Returns (timestamps as datetime64[ns, UTC] with NaT for anything unusable,
    null mask, "not ISO-8601" mask, range flags: -1 before / +1 after the ns range).
    Values that repeat a lot (period ends cluster on a few days) are parsed once each.
    """
    n = len(values)
    if n >= 512 and _few_distinct(values[:512]):
        try:
            codes, uniques = pd.factorize(pd.Series(values, dtype=object), use_na_sentinel=True)
        except TypeError:  # an unhashable value: parse one by one
            codes = None
        if codes is not None:
            parsed_u, null_u, bad_u, oor_u = _parse_timestamps_each(list(uniques))
            # None and NaN share the missing code: None is a missing value, NaN a bad one.
            missing = codes < 0
            take = np.where(missing, 0, codes)
            if len(uniques):
                parsed = parsed_u.take(take).reset_index(drop=True)
                null, bad, out_of_range = null_u.take(take), bad_u.take(take), oor_u.take(take)
            else:
                parsed = pd.Series(pd.NaT, index=range(n), dtype=_TS_DTYPE)
                null, bad, out_of_range = (np.zeros(n, dtype=bool), np.zeros(n, dtype=bool),
                                           np.zeros(n, dtype=np.int8))
            if missing.any():
                at = np.flatnonzero(missing)
                none = np.fromiter((values[i] is None for i in at), dtype=bool, count=len(at))
                parsed.iloc[at] = pd.NaT
                null[at], bad[at], out_of_range[at] = none, ~none, 0
            return parsed, null, bad, out_of_range
    return _parse_timestamps_each(values)


def _few_distinct(sample: list[Any]) -> bool:
    """Whether ``sample`` repeats a handful of values (False for unhashable values)."""
    try:
        return len(set(sample)) <= 64
    except TypeError:
        return False


def _parse_timestamps_each(values: list[Any]) -> tuple[pd.Series, np.ndarray, np.ndarray, np.ndarray]:
    """:func:`_parse_timestamps` without the deduplication."""
    n = len(values)
    null = (
        np.zeros(n, dtype=bool) if values.count(None) == 0
        else np.fromiter((v is None for v in values), dtype=bool, count=n)
    )
    # Cheap pre-filter ("YYYY-..."): keeps pandas' special strings ("now", "today") out;
    # format="ISO8601" is strict about the rest.
    shaped = _iso_shaped(values)
    candidates = values if shaped.all() else [v if ok else None for v, ok in zip(values, shaped.tolist())]
    parsed = pd.Series(
        pd.to_datetime(pd.Series(candidates, dtype=object), utc=True, errors="coerce", format="ISO8601")
    )
    out_of_range = np.zeros(n, dtype=np.int8)
    out_of_range[(parsed < _TS_MIN).to_numpy(dtype=bool)] = -1
    out_of_range[(parsed > _TS_MAX).to_numpy(dtype=bool)] = 1
    if out_of_range.any():
        parsed = parsed.where(out_of_range == 0)
    parsed = parsed.astype(_TS_DTYPE).reset_index(drop=True)
    # Shaped like ISO-8601 yet unparsed: pandas gives up on some dates beyond its range.
    retry = np.flatnonzero(shaped & parsed.isna().to_numpy(dtype=bool) & (out_of_range == 0))
    for i in retry:
        try:
            dt = datetime.fromisoformat(values[i])
        except ValueError:
            continue
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        if dt < _TS_MIN_PY:
            out_of_range[i] = -1
        elif dt > _TS_MAX_PY:
            out_of_range[i] = 1
        else:
            parsed.iloc[i] = pd.Timestamp(dt).tz_convert("UTC")
    bad = ~null & (out_of_range == 0) & parsed.isna().to_numpy(dtype=bool)
    return parsed, null, bad, out_of_range


def _iso_shaped(values: list[Any]) -> np.ndarray:
    """``type(v) is str and v[4:5] == "-" and v[:4].isdigit()`` for every value, vectorised.

    The vectorised form runs when every value is an ASCII string or None (the normal
    case): it looks at the bytes where each value starts in one joined buffer. Anything
    else takes the per-value test.
    """
    kinds = set(map(type, values))
    if str in kinds and kinds <= {str, type(None)}:
        texts = values if len(kinds) == 1 else [v if v is not None else "" for v in values]
        joined = "".join(texts)
        if joined.isascii():
            n = len(texts)
            lengths = np.fromiter(map(len, texts), dtype=np.int64, count=n)
            starts = np.zeros(n, dtype=np.int64)
            np.cumsum(lengths[:-1], out=starts[1:])
            raw = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
            long_enough = lengths >= 5
            at = starts[long_enough]
            shaped = raw[at + 4] == ord("-")
            for k in range(4):
                shaped &= (raw[at + k] - ord("0")) < 10  # uint8 wraps: below "0" is large
            out = np.zeros(n, dtype=bool)
            out[long_enough] = shaped
            return out
    return np.array([type(v) is str and v[4:5] == "-" and v[:4].isdigit() for v in values], dtype=bool)


def _field(data: Sequence[dict[str, Any]], key: str) -> list[Any]:
    """``record.get(key)`` of every record (subscripting first: most records have every key)."""
    try:
        return [r[key] for r in data]
    except KeyError:
        return [r.get(key) for r in data]


def _bad_strings(values: list[Any], allowed: frozenset[str] | None = None) -> np.ndarray:
    """Mask of values that are not a non-blank string (or not one of ``allowed``).

    Real data repeats a handful of values: judge the distinct ones, then spread.
    """
    try:
        distinct = set(values)
    except TypeError:  # an unhashable value (a JSON object or list): judge one by one
        distinct = None
    if distinct is not None:
        bad = {
            v for v in distinct
            if type(v) is not str or (v not in allowed if allowed is not None else not v.strip())
        }
        if not bad:
            return np.zeros(len(values), dtype=bool)
        return np.array([v in bad for v in values], dtype=bool)
    if allowed is not None:
        return np.array([type(v) is not str or v not in allowed for v in values], dtype=bool)
    return np.array([type(v) is not str or not v.strip() for v in values], dtype=bool)


def _record_ids(data: Sequence[Any]) -> list[str]:
    """The ``instance_id`` of every record; ``_BadRecord`` when one is not usable."""
    if set(map(type, data)) - {dict}:
        i, record = next((i, r) for i, r in enumerate(data) if type(r) is not dict)
        raise _BadRecord(f"record #{i + 1} is not a JSON object ({type(record).__name__})")
    ids = _field(data, "instance_id")
    # Fast path with C-level scans; fall back to a per-record search to name the culprit.
    if ids and not (
        set(map(type, ids)) == {str}
        and 0 < min(map(len, ids))
        and max(map(len, ids)) <= MAX_INSTANCE_ID_LENGTH
        and not _CONTROL_RE.search("".join(ids))
    ):
        for i, value in enumerate(ids):
            problem = instance_id_problem(value)
            if problem is not None:
                raise _BadRecord(f"record #{i + 1}: {problem}")
    return ids


def _validate_records(
    data: Sequence[dict[str, Any]], ids: Sequence[str], observed: Sequence[tuple[datetime, int]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split records (ids already checked) into (``RECORD_COLUMNS`` frame, ``INVALID_COLUMNS`` frame).

    ``observed`` gives (request sent at, number of records) per page, in order.
    """
    if not data:
        return _empty_records(), _empty_invalid()
    return _validate_fields(ids, *_fields(data), observed)


def _fields(data: Sequence[dict[str, Any]]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """(plan_id, status, updated_at, current_period_end) of every record, as four lists."""
    return (
        _field(data, "plan_id"),
        _field(data, "status"),
        _field(data, "updated_at"),
        _field(data, "current_period_end"),
    )


def _validate_fields(
    ids: Sequence[str],
    plans: list[Any],
    statuses: list[Any],
    updated_raw: list[Any],
    period_raw: list[Any],
    observed: Sequence[tuple[datetime, int]],
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """:func:`_validate_records` on the records' fields, already taken out of the records."""
    n = len(ids)
    if n == 0:
        return _empty_records(), _empty_invalid()

    plan_bad = _bad_strings(plans)
    status_bad = _bad_strings(statuses, _STATUS_SET)
    updated, up_null, up_bad, up_oob = _parse_timestamps(updated_raw)
    period, _pe_null, pe_bad, pe_oob = _parse_timestamps(period_raw)
    # A period end beyond the representable range is still a valid far past/future date.
    if pe_oob.any():
        period = period.mask(pe_oob < 0, _TS_MIN).mask(pe_oob > 0, _TS_MAX)

    invalid_mask = plan_bad | status_bad | up_null | up_bad | (up_oob != 0) | pe_bad
    invalid_rows: list[tuple[str, str]] = []
    for i in np.flatnonzero(invalid_mask):
        reasons: list[str] = []
        if plan_bad[i]:
            p = plans[i]
            reasons.append(
                "missing plan_id" if p is None
                else f"plan_id is not a string ({type(p).__name__})" if not isinstance(p, str)
                else "empty plan_id"
            )
        if status_bad[i]:
            status = statuses[i]
            reasons.append("missing status" if status is None else f"unknown status {_short(status)}")
        if up_null[i]:
            reasons.append("missing updated_at")
        elif up_bad[i]:
            reasons.append(f"updated_at is not ISO-8601: {_short(updated_raw[i])}")
        elif up_oob[i] != 0:
            reasons.append(f"updated_at out of range: {_short(updated_raw[i])}")
        if pe_bad[i]:
            reasons.append(f"current_period_end is not ISO-8601: {_short(period_raw[i])}")
        invalid_rows.append((ids[i], "; ".join(reasons)))

    valid = ~invalid_mask
    take = np.flatnonzero(valid)
    count = len(take)
    all_valid = count == n

    def obj(values: list[Any]) -> pd.Series:
        return pd.Series(values if all_valid else [values[i] for i in take], dtype=object)

    records = pd.DataFrame(
        {
            "instance_id": obj(ids),
            "plan_id": obj(plans),
            "status": obj(statuses),
            "current_period_end": period.iloc[take].reset_index(drop=True),
            "updated_at": updated.iloc[take].reset_index(drop=True),
            "observed_at": _observed_column(observed, take, all_valid),
        }
    )
    invalid = (
        pd.DataFrame(
            {
                "instance_id": pd.Series([r[0] for r in invalid_rows], dtype=object),
                "reason": pd.Series([r[1] for r in invalid_rows], dtype=object),
            }
        )
        if invalid_rows
        else _empty_invalid()
    )
    return records, invalid


def _observed_column(
    observed: Sequence[tuple[datetime, int]], take: np.ndarray, all_valid: bool
) -> pd.Series:
    """One request-sent timestamp per record (pages repeat their own)."""
    stamps = pd.DatetimeIndex([pd.Timestamp(t) for t, _ in observed]).tz_convert("UTC").as_unit("ns")
    column = stamps.repeat([c for _, c in observed])
    return pd.Series(column if all_valid else column[take], dtype=_TS_DTYPE)


def _tail_cursor(content: bytes) -> str | None | Any:
    """The page's ``next_cursor`` read off the end of its body without parsing it.

    ``_NO_GUESS`` when the body does not end with that member (or the cursor holds an
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


def _loads(content: bytes) -> Any:
    """``json.loads`` semantics at orjson speed.

    orjson refuses a few things the stdlib accepts (integers beyond 64 bits, NaN,
    lone surrogates); such a body is re-read by the stdlib, so every page means
    exactly what ``json.loads`` says it means.
    """
    try:
        return orjson.loads(content)
    except orjson.JSONDecodeError:
        return json.loads(content)


def _json_type(value: Any) -> str:
    """JSON name of a decoded value's type (for messages)."""
    if value is None:
        return "null"
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(type(value), "number")


# -- HTTP helpers ----------------------------------------------------------------------------


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _parse_retry_after(value: str | None) -> float | None:
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
    return max(0.0, (when - _utcnow()).total_seconds())


def _quote_id(instance_id: str) -> str:
    """Percent-encode an id as one path segment (dot segments too, so nothing normalises them)."""
    quoted = quote(instance_id, safe="")
    if quoted in (".", ".."):
        quoted = quoted.replace(".", "%2E")
    return quoted


def _safe_base_url(base_url: str) -> httpx.URL:
    url = httpx.URL(base_url)
    if url.scheme not in ("http", "https") or not url.host:
        raise ValueError("billing API URL must be an absolute http(s) URL")
    if url.userinfo:
        url = url.copy_with(username=None, password=None)
    return url


class BillingClient:
    """Billing API client: one pooled ``httpx.Client``, tenacity retries, strict validation."""

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
    ) -> None:
        if not isinstance(token, str) or not token.strip():
            raise ValueError("billing API token is empty")
        token = token.strip()
        if not (token.isascii() and token.isprintable()):
            raise ValueError("billing API token contains characters not allowed in an HTTP header")
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not 1 <= page_size <= 1000:
            raise ValueError("page_size must be between 1 and 1000")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if timeout <= 0 or connect_timeout <= 0:
            raise ValueError("timeouts must be > 0")
        if backoff_initial < 0 or backoff_max < 0 or max_retry_after < 0:
            raise ValueError("backoff and retry-after limits must be >= 0")
        url = _safe_base_url(base_url)
        self._base_url = str(url).rstrip("/")
        self._token = token
        self._max_attempts = max_attempts
        self._backoff_max = backoff_max
        self._backoff = wait_exponential(multiplier=backoff_initial, max=backoff_max) + wait_random(
            0, backoff_initial
        )
        self._max_retry_after = max_retry_after
        self._page_size = page_size
        self._concurrency = concurrency
        self._sleep: Callable[[float], None] = time.sleep  # swapped by tests
        self._closed = False
        self._client = httpx.Client(
            base_url=self._base_url,
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/json",
                "User-Agent": "creditsync-billing/1",
            },
            timeout=httpx.Timeout(timeout, connect=connect_timeout),
            limits=httpx.Limits(max_connections=concurrency + 1, max_keepalive_connections=concurrency + 1),
            transport=transport,
            follow_redirects=False,
        )

    def __repr__(self) -> str:
        return f"BillingClient(base_url={self._base_url!r}, page_size={self._page_size})"

    @property
    def base_url(self) -> str:
        """The API base URL (without any userinfo)."""
        return self._base_url

    def close(self) -> None:
        """Close the connection pool."""
        if not self._closed:
            self._closed = True
            self._client.close()

    def __enter__(self) -> BillingClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- public fetches ----------------------------------------------------------------------

    def fetch_all(self) -> BillingSnapshot:
        """Fetch every page of ``GET /v1/subscriptions``, following ``next_cursor``.

        The pages are pipelined (see :meth:`_pages`): the next page is already on its way
        while this thread parses and validates the current one.
        """
        started_at = _utcnow()
        frames: list[pd.DataFrame] = []
        invalid_frames: list[pd.DataFrame] = []
        # Pages are validated in batches: pandas' per-call overhead dominates at 1000 rows.
        # Each page's fields are taken out as it arrives; the record dicts are not kept.
        batch_ids: list[str] = []
        batch_fields: tuple[list[Any], ...] = ([], [], [], [])
        batch_pages: list[tuple[datetime, int]] = []

        def flush() -> None:
            valid, invalid = _validate_fields(batch_ids, *batch_fields, batch_pages)
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
                for column, values in zip(batch_fields, _fields(data)):
                    column.extend(values)
                batch_ids.extend(ids)
                batch_pages.append((sent_at, len(data)))
                del data
                if len(batch_ids) >= _VALIDATE_BATCH:
                    flush()
        flush()
        snapshot = BillingSnapshot(
            records=_concat(frames, _empty_records),
            invalid=_concat(invalid_frames, _empty_invalid),
            started_at=started_at,
            finished_at=_utcnow(),
            pages=pages,
            requested_ids=None,
        )
        logger.info(
            "billing API: fetched %d record(s) (%d invalid) in %d page(s)",
            len(snapshot.records), len(snapshot.invalid), snapshot.pages,
        )
        return snapshot

    def fetch_instances(self, instance_ids: Iterable[str]) -> BillingSnapshot:
        """Fetch ``GET /v1/subscriptions/{id}`` for each distinct id (404 JSON -> absent).

        Raises ValueError for an id that is not a usable instance id (never sent).
        """
        if isinstance(instance_ids, str):
            raise TypeError("instance_ids must be an iterable of ids, not a single string")
        ids = tuple(dict.fromkeys(instance_ids))
        for value in ids:
            problem = instance_id_problem(value)
            if problem is not None:
                raise ValueError(f"cannot fetch instance {_short(value)}: {problem}")
        started_at = _utcnow()
        results: dict[str, tuple[dict[str, Any] | None, datetime]] = {}
        if len(ids) == 1 or self._concurrency == 1:
            for instance_id in ids:
                results[instance_id] = self._fetch_one(instance_id)
        elif ids:
            self._fetch_concurrently(ids, results)

        bodies: list[dict[str, Any]] = []
        observed: list[tuple[datetime, int]] = []
        mismatched: list[tuple[str, str]] = []
        for instance_id in ids:
            body, sent_at = results[instance_id]
            if body is None:
                continue
            if body["instance_id"] != instance_id:
                other = _short(body["instance_id"])
                mismatched.append((instance_id, f"billing returned a record for another instance ({other})"))
                continue
            bodies.append(body)
            observed.append((sent_at, 1))
        records, invalid = _validate_records(bodies, [b["instance_id"] for b in bodies], observed)
        if mismatched:
            extra = pd.DataFrame(
                {
                    "instance_id": pd.Series([m[0] for m in mismatched], dtype=object),
                    "reason": pd.Series([m[1] for m in mismatched], dtype=object),
                }
            )
            invalid = _concat([invalid, extra], _empty_invalid)
        return BillingSnapshot(
            records=records,
            invalid=invalid,
            started_at=started_at,
            finished_at=_utcnow(),
            pages=sum(1 for body, _ in results.values() if body is not None),
            requested_ids=ids,
        )

    # -- internals ---------------------------------------------------------------------------

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
                body = self._parse_json(content, content_type, what)
                del content
                data, next_cursor = self._page_shape(body, what)
                try:
                    ids = _record_ids(data)
                except _BadRecord as exc:
                    raise self._malformed(what, f"unusable record: {exc}") from None
                if next_cursor is not None:
                    if next_cursor in seen_cursors:
                        raise self._malformed(
                            what, "next_cursor repeats an earlier cursor; refusing to loop over the same pages"
                        )
                    seen_cursors.add(next_cursor)
                if guess is _NO_GUESS:
                    cursors.put(next_cursor)
                elif guess != next_cursor:  # only a body that is not valid JSON could do this
                    raise self._malformed(what, "next_cursor differs from the end of the body")
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
            response, sent_at = self._send(_LIST_PATH, what, params=params, cancel=stop)
            if stop.is_set():
                return
            if response.status_code != 200:
                self._json_body(response, what, single=False)  # raises the right error
            content = response.content
            content_type = response.headers.get("Content-Type", "unknown")
            del response
            guess = _tail_cursor(content)
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

    def _fetch_concurrently(
        self, ids: tuple[str, ...], results: dict[str, tuple[dict[str, Any] | None, datetime]]
    ) -> None:
        """Fetch ids with up to ``concurrency`` requests in flight; the first failure wins."""
        with ThreadPoolExecutor(
            max_workers=min(self._concurrency, len(ids)), thread_name_prefix="billing-fetch"
        ) as pool:
            futures: dict[Future[Any], str] = {pool.submit(self._fetch_one, i): i for i in ids}
            done, pending = wait(futures, return_when=FIRST_EXCEPTION)
            failed = next((f for f in futures if f in done and f.exception() is not None), None)
            if failed is not None:
                for future in pending:
                    future.cancel()
                raise failed.exception()  # type: ignore[misc]
            for future, instance_id in futures.items():
                results[instance_id] = future.result()

    def _fetch_one(self, instance_id: str) -> tuple[dict[str, Any] | None, datetime]:
        """(record or None when billing has none, when the request was sent) for one id."""
        path = f"{_LIST_PATH}/{_quote_id(instance_id)}"
        what = f"GET {_LIST_PATH}/{{id}} (instance {_short(instance_id)})"
        response, sent_at = self._send(path, what)
        body = self._json_body(response, what, single=True)
        if body is _ABSENT:
            return None, sent_at
        if not isinstance(body, dict):
            raise self._malformed(what, f"expected a record object, got {_json_type(body)}")
        try:
            _record_ids([body])
        except _BadRecord as exc:
            raise self._malformed(what, f"unusable record: {exc}") from None
        return body, sent_at

    def _check_url_hint(self) -> str:
        return f"is BILLING_API_URL right? ({self._base_url})"

    def _malformed(self, what: str, detail: str) -> BillingError:
        return self._error(BillingMalformedError, f"billing API response malformed: {what}: {detail}")

    def _error(self, cls: type[BillingError], message: str) -> BillingError:
        """Build an exception whose message is guaranteed not to contain the token."""
        if self._token:
            message = message.replace(self._token, "***")
        return cls(message)

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
            f"billing API {detail} on {what}; retrying in {delay:.1f}s "
            f"(attempt {retry_state.attempt_number + 1}/{self._max_attempts})"
        )
        logger.warning("%s", message.replace(self._token, "***"))

    def _attempt(self, path: str, params: dict[str, Any] | None) -> tuple[httpx.Response, datetime]:
        """One HTTP attempt; raises _Transient for anything worth retrying."""
        sent_at = _utcnow()
        try:
            response = self._client.get(path, params=params)
        except httpx.UnsupportedProtocol:
            raise self._error(BillingError, f"billing API URL is not usable ({self._base_url})") from None
        except httpx.LocalProtocolError:
            # Our own request could not be sent (e.g. an illegal header); retrying cannot help.
            message = "billing API request could not be built (local protocol error)"
            raise self._error(BillingError, message) from None
        except httpx.TimeoutException as exc:
            raise _Transient(f"timed out ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise _Transient(f"connection failed ({type(exc).__name__})") from exc
        except httpx.DecodingError:
            message = "billing API response malformed: body could not be decoded"
            raise self._error(BillingMalformedError, message) from None
        status = response.status_code
        if status == 429:
            retry_after = _parse_retry_after(response.headers.get("Retry-After"))
            raise _Transient("returned HTTP 429", retry_after=retry_after)
        if status >= 500:
            raise _Transient(f"returned HTTP {status}")
        return response, sent_at

    def _send(
        self,
        path: str,
        what: str,
        params: dict[str, Any] | None = None,
        *,
        cancel: threading.Event | None = None,
    ) -> tuple[httpx.Response, datetime]:
        """GET with retries; returns (response, when the successful attempt was sent).

        ``cancel`` (the page fetcher's stop signal) cuts a pause between attempts short
        and ends the retries, so a stopped fetch never waits out a long ``Retry-After``.
        """
        if self._closed:
            raise BillingError("billing client is closed")
        stop = stop_after_attempt(self._max_attempts)
        retrying = Retrying(
            stop=stop if cancel is None else stop | stop_when_event_set(cancel),
            wait=self._wait,
            retry=retry_if_exception_type(_Transient),
            before_sleep=lambda state: self._log_retry(what, state),
            sleep=lambda seconds: self._pause(seconds, cancel),
            reraise=True,
        )
        try:
            return retrying(self._attempt, path, params)
        except _Transient as exc:
            detail = exc.detail.removeprefix("returned ")
            raise self._error(
                BillingUnavailableError,
                f"billing API unavailable: {what} failed after {self._max_attempts} attempts: {detail}"
                + (f" ({self._base_url})" if "connection failed" in detail else ""),
            ) from exc.__cause__

    def _pause(self, seconds: float, cancel: threading.Event | None) -> None:
        """Wait between attempts; a set ``cancel`` ends a real wait at once."""
        if cancel is not None and self._sleep is time.sleep:
            cancel.wait(seconds)
        else:
            self._sleep(seconds)  # tests swap ``_sleep`` to record the waits

    def _json_body(self, response: httpx.Response, what: str, *, single: bool) -> Any:
        """Interpret a non-retryable response: the parsed JSON body, _ABSENT, or an error."""
        status = response.status_code
        if status in (401, 403):
            raise self._error(BillingAuthError, f"billing API rejected the token (HTTP {status})")
        if status == 200:
            return self._parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
        if status == 404:
            if single:
                try:
                    body = json.loads(response.content)
                except (ValueError, RecursionError):
                    body = None
                if isinstance(body, dict):
                    return _ABSENT
                raise self._malformed(what, f"non-JSON HTTP 404; {self._check_url_hint()}")
            raise self._malformed(what, f"HTTP 404; {self._check_url_hint()}")
        if 300 <= status < 400:
            raise self._malformed(what, f"unexpected redirect (HTTP {status}); {self._check_url_hint()}")
        if 400 <= status < 500:
            code = self._error_code(response)
            raise self._error(BillingError, f"billing API refused {what}: HTTP {status}{code}")
        raise self._malformed(what, f"unexpected HTTP {status}")

    def _parse_json(self, content: bytes, content_type: str, what: str) -> Any:
        """The JSON of an HTTP 200 body, or a one-line malformed error naming its content type."""
        try:
            return _loads(content)
        except (ValueError, RecursionError):
            kind = content_type.split(";")[0].strip()[:60]
            raise self._malformed(what, f"non-JSON body (HTTP 200, content-type {kind})") from None

    @staticmethod
    def _error_code(response: httpx.Response) -> str:
        """A short, sanitised ``error`` code from a JSON error body (or '')."""
        try:
            body = json.loads(response.content)
        except (ValueError, RecursionError):
            return ""
        code = body.get("error") if isinstance(body, dict) else None
        if isinstance(code, str) and _SAFE_CODE_RE.fullmatch(code):
            return f" ({code})"
        return ""

    def _page_shape(self, body: Any, what: str) -> tuple[list[Any], str | None]:
        if not isinstance(body, dict):
            raise self._malformed(what, f"expected a page object, got {_json_type(body)}")
        data = body.get("data")
        if not isinstance(data, list):
            raise self._malformed(what, "page has no 'data' list")
        if "next_cursor" not in body:
            raise self._malformed(what, "page has no 'next_cursor'")
        next_cursor = body["next_cursor"]
        if next_cursor is not None and (not isinstance(next_cursor, str) or not next_cursor):
            raise self._malformed(
                what, "page has an invalid 'next_cursor' (expected a non-empty string or null)"
            )
        return data, next_cursor


_ABSENT: Any = object()
