"""Result rows -> DataFrames with explicit dtypes (empty-safe), and the read specs."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import numpy as np
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


_NAT = np.iinfo(np.int64).min  # NaT's bit pattern in a datetime64 array


def utc_from_epoch_micros(micros: pd.Series) -> pd.Series:
    """A nullable integer column of microseconds since the epoch as datetime64[ns, UTC]."""
    values = micros.to_numpy(dtype="int64", na_value=_NAT)
    return (
        pd.Series(values.view("datetime64[us]"), index=micros.index)
        .dt.tz_localize("UTC")
        .astype("datetime64[ns, UTC]")
    )


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


#: the ``instances`` timestamps the bulk reads send as microseconds since the epoch
EPOCH_TIMESTAMPS = ("created_at", "updated_at")


def instances_from_csv(source: IO[bytes], *, encoding: str = "utf-8") -> pd.DataFrame:
    """The bulk reads' CSV of ``instances`` (the columns of ``INSTANCE_SPEC``, timestamps as
    epoch microseconds, an empty timestamp field = NULL) as the ``read_instances`` frame."""
    frame = pd.read_csv(
        source,
        header=None,
        names=list(INSTANCE_SPEC),
        dtype={"instance_id": "str", "plan_id": "str", "credits_total": "int64",
               "credits_used": "int64", **{name: "Int64" for name in EPOCH_TIMESTAMPS}},
        # Only an empty field (NULL) of a timestamp is missing; ids stay verbatim.
        keep_default_na=False,
        na_values={name: [""] for name in EPOCH_TIMESTAMPS},
        encoding=encoding,
        engine="c",
    )
    for name in EPOCH_TIMESTAMPS:
        frame[name] = utc_from_epoch_micros(frame[name])
    return frame
