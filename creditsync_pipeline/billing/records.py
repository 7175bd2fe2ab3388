"""Billing records: their columns and the validation every provider's records go through.

A provider turns its own wire format into *records* of the SPEC shape (``instance_id``,
``plan_id``, ``status``, ``current_period_end``, ``updated_at``); this module checks them
in bulk and splits them into a ``RECORD_COLUMNS`` frame (usable records, plus
``observed_at``: when the request that returned each record was sent) and an
``INVALID_COLUMNS`` frame (records with a usable ``instance_id`` that fail validation: SPEC
mismatch kind ``invalid_record``). A record without a usable ``instance_id`` raises
:class:`BadRecord`: the provider fails the whole fetch (an incomplete list must never be
read as "these instances have no subscription").

Vectorised: the same code validates ten records or a million (distinct values are judged
once, repeated timestamps parsed once).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from ..ids import MAX_INSTANCE_ID_LENGTH, instance_id_problem, lookalike_mask, lookalike_problem, unusable_problem

__all__ = [
    "INVALID_COLUMNS",
    "MAX_INSTANCE_ID_LENGTH",
    "RECORD_COLUMNS",
    "STATUSES",
    "BadRecord",
    "concat_frames",
    "empty_invalid",
    "empty_records",
    "instance_id_problem",
    "record_fields",
    "record_ids",
    "short_repr",
    "validate_fields",
    "validate_records",
]

RECORD_COLUMNS = ["instance_id", "plan_id", "status", "current_period_end", "updated_at", "observed_at"]
INVALID_COLUMNS = ["instance_id", "reason"]
STATUSES = ("active", "trialing", "past_due", "canceled", "expired")
_STATUS_SET = frozenset(STATUSES)
_TS_DTYPE = "datetime64[ns, UTC]"
_TS_MIN = pd.Timestamp.min.tz_localize("UTC").ceil("us")
_TS_MAX = pd.Timestamp.max.tz_localize("UTC").floor("us")
_TS_MIN_PY = _TS_MIN.to_pydatetime()
_TS_MAX_PY = _TS_MAX.to_pydatetime()


class BadRecord(Exception):
    """A record without a usable ``instance_id`` (the provider fails the whole fetch)."""


# -- frames ----------------------------------------------------------------------------------

def empty_records() -> pd.DataFrame:
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


def empty_invalid() -> pd.DataFrame:
    return pd.DataFrame({"instance_id": pd.Series([], dtype=object), "reason": pd.Series([], dtype=object)})


def concat_frames(frames: list[pd.DataFrame], empty: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    frames = [f for f in frames if len(f)]
    if not frames:
        return empty()
    if len(frames) == 1:
        return frames[0].reset_index(drop=True)
    return pd.concat(frames, ignore_index=True)



# -- validation ------------------------------------------------------------------------------


def short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


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


def record_ids(data: Sequence[Any]) -> list[str]:
    """The ``instance_id`` of every record; ``BadRecord`` when one cannot be an id at all.

    A look-alike id (whitespace at an end, not NFC, control/format characters) is usable
    here: :func:`validate_fields` makes its record an ``invalid_record``.
    """
    if set(map(type, data)) - {dict}:
        i, record = next((i, r) for i, r in enumerate(data) if type(r) is not dict)
        raise BadRecord(f"record #{i + 1} is not a JSON object ({type(record).__name__})")
    ids = _field(data, "instance_id")
    # Fast path with C-level scans; fall back to a per-record search to name the culprit.
    if ids and not (
        set(map(type, ids)) == {str}
        and 0 < min(map(len, ids))
        and max(map(len, ids)) <= MAX_INSTANCE_ID_LENGTH
    ):
        for i, value in enumerate(ids):
            problem = unusable_problem(value)
            if problem is not None:
                raise BadRecord(f"record #{i + 1}: {problem}")
    return ids


def validate_records(
    data: Sequence[dict[str, Any]], ids: Sequence[str], observed: Sequence[tuple[datetime, int]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split records (ids already checked) into (``RECORD_COLUMNS`` frame, ``INVALID_COLUMNS`` frame).

    ``observed`` gives (request sent at, number of records) per page, in order.
    """
    if not data:
        return empty_records(), empty_invalid()
    return validate_fields(ids, *record_fields(data), observed)


def record_fields(data: Sequence[dict[str, Any]]) -> tuple[list[Any], list[Any], list[Any], list[Any]]:
    """(plan_id, status, updated_at, current_period_end) of every record, as four lists."""
    return (
        _field(data, "plan_id"),
        _field(data, "status"),
        _field(data, "updated_at"),
        _field(data, "current_period_end"),
    )


def validate_fields(
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
        return empty_records(), empty_invalid()

    plan_bad = _bad_strings(plans)
    status_bad = _bad_strings(statuses, _STATUS_SET)
    updated, up_null, up_bad, up_oob = _parse_timestamps(updated_raw)
    period, _pe_null, pe_bad, pe_oob = _parse_timestamps(period_raw)
    # A period end beyond the representable range is still a valid far past/future date.
    if pe_oob.any():
        period = period.mask(pe_oob < 0, _TS_MIN).mask(pe_oob > 0, _TS_MAX)

    id_bad = lookalike_mask(ids)
    invalid_mask = id_bad | plan_bad | status_bad | up_null | up_bad | (up_oob != 0) | pe_bad
    invalid_rows: list[tuple[str, str]] = []
    for i in np.flatnonzero(invalid_mask):
        reasons: list[str] = []
        if id_bad[i]:
            reasons.append(str(lookalike_problem(ids[i])))
        if plan_bad[i]:
            p = plans[i]
            reasons.append(
                "missing plan_id" if p is None
                else f"plan_id is not a string ({type(p).__name__})" if not isinstance(p, str)
                else "empty plan_id"
            )
        if status_bad[i]:
            status = statuses[i]
            reasons.append("missing status" if status is None else f"unknown status {short_repr(status)}")
        if up_null[i]:
            reasons.append("missing updated_at")
        elif up_bad[i]:
            reasons.append(f"updated_at is not ISO-8601: {short_repr(updated_raw[i])}")
        elif up_oob[i] != 0:
            reasons.append(f"updated_at out of range: {short_repr(updated_raw[i])}")
        if pe_bad[i]:
            reasons.append(f"current_period_end is not ISO-8601: {short_repr(period_raw[i])}")
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
        else empty_invalid()
    )
    return records, invalid


def _observed_column(
    observed: Sequence[tuple[datetime, int]], take: np.ndarray, all_valid: bool
) -> pd.Series:
    """One request-sent timestamp per record (pages repeat their own)."""
    stamps = pd.DatetimeIndex([pd.Timestamp(t) for t, _ in observed]).tz_convert("UTC").as_unit("ns")
    column = stamps.repeat([c for _, c in observed])
    return pd.Series(column if all_valid else column[take], dtype=_TS_DTYPE)

