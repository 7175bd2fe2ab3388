"""Column types: timestamps stored in UTC, returned aware."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pandas as pd
from sqlalchemy import DateTime
from sqlalchemy.types import TypeDecorator


class UTCDateTime(TypeDecorator[datetime]):
    """Timestamp stored in UTC and always returned as an aware UTC datetime.

    Binds aware datetimes converted to UTC (naive values are taken as UTC).
    On SQLite the value is stored as naive UTC text ``YYYY-MM-DD HH:MM:SS.ffffff``,
    so string comparison in SQL orders timestamps correctly.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    @property
    def python_type(self) -> type[datetime]:
        return datetime

    def process_bind_param(self, value: Any, dialect: Any) -> datetime | None:
        value = to_utc_datetime(value)
        if value is not None and dialect.name == "sqlite":
            return value.replace(tzinfo=None)
        return value

    def process_result_value(self, value: Any, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # a driver that hands back raw text
            value = datetime.fromisoformat(value)
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


def to_utc_datetime(value: Any) -> datetime | None:
    """Normalise a datetime-like value to an aware UTC ``datetime`` (None for null)."""
    if value is None or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        if value.tzinfo is None:
            value = value.tz_localize("UTC")
        value = value.tz_convert("UTC").floor("us").to_pydatetime()
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        return value.replace(tzinfo=timezone.utc)
    return value.astimezone(timezone.utc)
