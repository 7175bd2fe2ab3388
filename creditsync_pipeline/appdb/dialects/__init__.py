"""The per-dialect seam: what differs between app-database servers lives here only.

Callers inside :mod:`creditsync_pipeline.appdb` ask ``dialects.of(conn)`` (or
``dialects.for_name("postgresql")``) for a :class:`~.base.Dialect` and call its
methods: engine setup, write-transaction start, schema lock, bulk loads, the fast
instance read, conflict-tolerant inserts and upserts, the server clock. A new
server (MySQL/MariaDB) is one more module here plus ``sql/<dialect>/``; nothing
outside this package changes.
"""

from __future__ import annotations

from typing import Any

from .base import Dialect
from .postgresql import PostgreSQL
from .sqlite import SQLite

__all__ = ["Dialect", "for_name", "of"]

_GENERIC = Dialect()
_POSTGRESQL = PostgreSQL()
#: Backend names as SQLAlchemy reports them ("postgres" only in a Heroku-style URL).
_BY_NAME: dict[str, Dialect] = {"postgresql": _POSTGRESQL, "postgres": _POSTGRESQL, "sqlite": SQLite()}


def for_name(name: str) -> Dialect:
    """The dialect for an SQLAlchemy backend name (a generic one when unknown)."""
    return _BY_NAME.get(name, _GENERIC)


def of(bind: Any) -> Dialect:
    """The dialect of an Engine or Connection (anything with ``.dialect.name``)."""
    return for_name(bind.dialect.name)
