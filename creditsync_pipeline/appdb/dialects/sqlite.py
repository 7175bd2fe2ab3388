"""SQLite: connection pragmas, BEGIN IMMEDIATE for writes, DBAPI executemany loads."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, Engine, Table, create_engine, event
from sqlalchemy.engine import URL
from sqlalchemy.sql import ColumnElement, func

from .base import OnConflict, bind_processed, quoted_target

_BEGIN_OPTION = "creditsync_sqlite_begin"


class SQLite(OnConflict):
    name = "sqlite"
    sql_dir = "sqlite"
    temp_schema = "temp"

    def _insert(self) -> Any:
        from sqlalchemy.dialects.sqlite import insert

        return insert

    def create_engine(self, url: URL) -> Engine:
        engine = create_engine(url)
        _install_hooks(engine)
        return engine

    def begin_write(self, conn: Connection) -> None:
        # Take the write lock up front: no deadlock-prone upgrade from a read lock.
        conn.execution_options(**{_BEGIN_OPTION: "IMMEDIATE"})

    def now(self) -> ColumnElement[Any]:
        # CURRENT_TIMESTAMP has whole seconds only; this is UTC with milliseconds.
        return func.strftime("%Y-%m-%d %H:%M:%f", "now")

    def load_rows(self, conn: Connection, table: Table, columns: Mapping[str, list[Any]]) -> None:
        """One plain DBAPI ``executemany`` (values already bind-processed)."""
        names = list(columns)
        placeholders = ", ".join("?" for _ in names)
        rows = list(zip(*bind_processed(conn, table, columns)))
        conn.exec_driver_sql(f"INSERT INTO {quoted_target(conn, table, names)} VALUES ({placeholders})", rows)


def _install_hooks(engine: Engine) -> None:
    """Pragmas on every new connection; SQLAlchemy, not sqlite3, emits BEGIN."""

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Let SQLAlchemy control transactions so DDL and SELECTs are transactional.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get("isolation_level") == "AUTOCOMMIT":
            return
        mode = options.get(_BEGIN_OPTION, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            mode = "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")
