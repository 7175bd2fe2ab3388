"""pandas columns -> bind-ready Python values, and chunking of id lists."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import Any

import numpy as np
import pandas as pd

from .errors import AppDatabaseError, one_line


def isna(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def object_list(series: pd.Series) -> list[Any]:
    """Column values as Python objects with every kind of missing value as None."""
    missing = series.isna().tolist()
    if not any(missing):
        return series.astype(object).tolist()
    return [None if na else v for v, na in zip(series.astype(object).tolist(), missing)]


def int_list(series: pd.Series) -> list[int | None]:
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "iu":
        return series.tolist()  # a NumPy integer column: exact Python ints, no missing values
    out: list[int | None] = []
    for value in object_list(series):
        if value is None:
            out.append(None)
            continue
        try:
            as_int = int(value)
        except (TypeError, ValueError):
            as_int = None
        if as_int is None or as_int != value:
            raise AppDatabaseError(f"corrections contain a non-integer credit value: {value!r}")
        out.append(as_int)
    return out


def datetime_list(series: pd.Series) -> list[datetime | None]:
    try:
        converted = pd.to_datetime(series, utc=True).dt.floor("us")
    except (TypeError, ValueError) as exc:
        raise AppDatabaseError(
            f"corrections contain an unreadable basis_at: {one_line(str(exc))}"
        ) from None
    missing = converted.isna().tolist()
    if not any(missing):  # one datetime object per distinct instant (a run has few)
        codes, uniques = pd.factorize(converted)
        return np.array(uniques.to_pydatetime(), dtype=object)[codes].tolist()
    values = converted.dt.to_pydatetime().tolist()
    return [None if na else v for v, na in zip(values, missing)]


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
