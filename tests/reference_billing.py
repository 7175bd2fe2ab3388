"""Billing record validation as first written (one Python pass per field), frozen as a test oracle.

``creditsync_pipeline.billing`` now validates with vectorised fast paths (distinct values
judged once, repeated timestamps parsed once); ``tests/test_billing_equivalence.py`` checks
that it still returns exactly what this version returned. Do not optimise this file.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import pandas as pd

from creditsync_pipeline.billing.records import (
    _STATUS_SET,
    _TS_DTYPE,
    _TS_MAX,
    _TS_MAX_PY,
    _TS_MIN,
    _TS_MIN_PY,
    _observed_column,
)
from creditsync_pipeline.billing.records import empty_invalid as _empty_invalid
from creditsync_pipeline.billing.records import empty_records as _empty_records
from creditsync_pipeline.billing.records import short_repr as _short


def _parse_timestamps(values: list[Any]) -> tuple[pd.Series, np.ndarray, np.ndarray, np.ndarray]:
    """Parse ISO-8601 values (no offset = UTC), vectorised.

    Returns (timestamps as datetime64[ns, UTC] with NaT for anything unusable,
    null mask, "not ISO-8601" mask, range flags: -1 before / +1 after the ns range).
    """
    n = len(values)
    null = np.array([v is None for v in values], dtype=bool)
    # Cheap pre-filter ("YYYY-..."): keeps pandas' special strings ("now", "today") out;
    # format="ISO8601" is strict about the rest.
    candidates = [v if type(v) is str and v[4:5] == "-" and v[:4].isdigit() else None for v in values]
    shaped = pd.Series(candidates, dtype=object).notna().to_numpy(dtype=bool)
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


def _validate_records(
    data: Sequence[dict[str, Any]], ids: Sequence[str], observed: Sequence[tuple[datetime, int]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split records (ids already checked) into (``RECORD_COLUMNS`` frame, ``INVALID_COLUMNS`` frame).

    ``observed`` gives (request sent at, number of records) per page, in order.
    """
    n = len(data)
    if n == 0:
        return _empty_records(), _empty_invalid()
    plans = [r.get("plan_id") for r in data]
    statuses = [r.get("status") for r in data]
    updated_raw = [r.get("updated_at") for r in data]
    period_raw = [r.get("current_period_end") for r in data]

    plan_bad = np.array([type(p) is not str or not p.strip() for p in plans], dtype=bool)
    status_bad = np.array([type(v) is not str or v not in _STATUS_SET for v in statuses], dtype=bool)
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
