"""The generic dialect: portable SQLAlchemy Core for every step (the fallback)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Engine, Select, Table, create_engine, insert, or_, true
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, func
from sqlalchemy.sql.dml import Insert


class Dialect:
    """Portable behaviour; a server's subclass overrides what it does better."""

    #: SQLAlchemy backend name.
    name = "generic"
    #: Subdirectory of ``sql/`` holding this dialect's DDL (None: ``init_db`` refuses).
    sql_dir: str | None = None
    #: Schema that holds TEMPORARY tables, to drop them unambiguously.
    temp_schema: str | None = None

    # ----------------------------------------------------------------- engine

    def normalize_url(self, url: URL) -> URL:
        """The URL to connect with (e.g. pin the driver we ship)."""
        return url

    def create_engine(self, url: URL) -> Engine:
        return create_engine(url, pool_pre_ping=True)

    def begin_write(self, conn: Connection) -> None:
        """Prepare ``conn`` (not yet in a transaction) for a read-write transaction."""

    def lock_schema(self, conn: Connection) -> None:
        """Serialise concurrent ``init_db`` runs (inside its transaction)."""

    # ------------------------------------------------------------------ bulk

    def tune_bulk(self, conn: Connection) -> None:
        """Session settings for one bulk write transaction."""

    def load_rows(self, conn: Connection, table: Table, columns: Mapping[str, list[Any]]) -> None:
        """Bulk-load non-empty ``columns`` (name -> values) into ``table``."""
        names = list(columns)
        conn.execute(insert(table), [dict(zip(names, values)) for values in zip(*columns.values())])

    def read_instances(
        self, conn: Connection, wanted: list[str] | None, *, ordered: bool
    ) -> pd.DataFrame | None:
        """A faster ``read_instances`` than bound SELECTs, or None when there is none."""
        return None

    # ------------------------------------------------------------ statements

    def insert_ignoring(
        self, table: Table, values: Mapping[str, Any], key: Sequence[str]
    ) -> Insert | None:
        """``INSERT`` of one row that does nothing when ``key`` exists (None: unsupported)."""
        return None

    def upsert(
        self, table: Table, values: Mapping[str, Any], key: Sequence[str], update: Sequence[str]
    ) -> Insert | None:
        """``INSERT`` of one row updating ``update`` when ``key`` exists (None: unsupported)."""
        return None

    def upsert_from_select(
        self,
        table: Table,
        names: Sequence[str],
        source: Select[Any],
        key: Sequence[str],
        update: Sequence[str],
        changed: Sequence[str],
    ) -> Insert | None:
        """``INSERT INTO table (names) <source>``; where ``key`` exists, set the ``update``
        columns on the rows whose ``changed`` columns differ (None: unsupported)."""
        return None

    def now(self) -> ColumnElement[Any]:
        """The server's current time, as an SQL expression."""
        return func.current_timestamp()


class OnConflict(Dialect):
    """``INSERT ... ON CONFLICT`` (PostgreSQL and SQLite share SQLAlchemy's API)."""

    def _insert(self) -> Callable[[Table], Any]:
        raise NotImplementedError

    def insert_ignoring(self, table: Table, values: Mapping[str, Any], key: Sequence[str]) -> Insert:
        return self._insert()(table).values(dict(values)).on_conflict_do_nothing(index_elements=list(key))

    def upsert(
        self, table: Table, values: Mapping[str, Any], key: Sequence[str], update: Sequence[str]
    ) -> Insert:
        stmt = self._insert()(table).values(dict(values))
        return stmt.on_conflict_do_update(
            index_elements=list(key), set_={name: stmt.excluded[name] for name in update}
        )


    def upsert_from_select(
        self,
        table: Table,
        names: Sequence[str],
        source: Select[Any],
        key: Sequence[str],
        update: Sequence[str],
        changed: Sequence[str],
    ) -> Insert:
        # SQLite needs a WHERE in an upsert's SELECT to parse ON CONFLICT as the upsert's.
        stmt = self._insert()(table).from_select(list(names), source.where(true()))
        differs = or_(*(table.c[name].is_distinct_from(stmt.excluded[name]) for name in changed))
        return stmt.on_conflict_do_update(
            index_elements=list(key), set_={name: stmt.excluded[name] for name in update}, where=differs
        )


def bind_processed(conn: Connection, table: Table, columns: Mapping[str, list[Any]]) -> list[list[Any]]:
    """Each column's values through the column type's own bind processing (e.g. UTCDateTime)."""
    dialect = conn.dialect
    processed = []
    for name, values in columns.items():
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        processed.append(memoized(process, values) if process else values)
    return processed


def memoized(process: Callable[[Any], Any], values: list[Any]) -> list[Any]:
    """``[process(v) for v in values]``, once per distinct object (bind processors are pure)."""
    done: dict[int, Any] = {}
    out = []
    for v in values:
        key = id(v)
        if key not in done:
            done[key] = process(v)
        out.append(done[key])
    return out


def quoted_target(conn: Connection, table: Table, names: Sequence[str]) -> str:
    """``"table" ("a", "b")`` quoted for ``conn``'s dialect."""
    quote = conn.dialect.identifier_preparer.quote
    return f"{quote(table.name)} ({', '.join(quote(n) for n in names)})"
