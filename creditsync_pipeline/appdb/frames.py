"""Result rows -> DataFrames with explicit dtypes (empty-safe), and the read specs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd


def str_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="str")


def int_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="int64")


def nullable_int_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="Int64")


def utc_series(values: Sequence[Any]) -> pd.Series:
    if not len(values):
        return pd.Series([], dtype="datetime64[ns, UTC]")
    return pd.to_datetime(pd.Series(list(values), dtype=object), utc=True).astype(
        "datetime64[ns, UTC]"
    )


def bool_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="bool")


ColumnMaker = Callable[[Sequence[Any]], pd.Series]


def frame(rows: Sequence[Sequence[Any]], spec: Mapping[str, ColumnMaker]) -> pd.DataFrame:
    """Build a DataFrame with explicit dtypes from result rows (empty-safe)."""
    columns = list(zip(*rows)) if rows else [() for _ in spec]
    return pd.DataFrame(
        {name: make(values) for (name, make), values in zip(spec.items(), columns)}
    )


PLAN_SPEC: dict[str, ColumnMaker] = {
    "plan_id": str_series, "credits": int_series, "is_free": bool_series,
}
INSTANCE_SPEC: dict[str, ColumnMaker] = {
    "instance_id": str_series,
    "plan_id": str_series,
    "credits_total": int_series,
    "credits_used": int_series,
    "created_at": utc_series,
    "updated_at": utc_series,
}
AUDIT_SPEC: dict[str, ColumnMaker] = {
    "id": int_series,
    "run_id": str_series,
    "trigger": str_series,
    "instance_id": str_series,
    "old_plan_id": str_series,
    "new_plan_id": str_series,
    "old_credits_total": nullable_int_series,
    "new_credits_total": int_series,
    "reason": str_series,
    "applied_at": utc_series,
}
