"""Engines and transactions: creation from a URL, write transactions, health check."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine, text
from sqlalchemy.engine import make_url

from . import dialects
from .errors import AppDatabaseError, engine_label, one_line, reason, redact_url


def create_engine_from_url(url: str) -> Engine:
    """Create an engine for ``url`` (SQLite: WAL, busy timeout, foreign keys)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise AppDatabaseError(f"invalid database URL ({redact_url(url)})") from None
    try:
        dialect = dialects.for_name(parsed.get_backend_name())
        engine = dialect.create_engine(dialect.normalize_url(parsed))
    except Exception as exc:
        why = one_line(reason(exc), parsed.password)
        raise AppDatabaseError(f"cannot create engine for {redact_url(url)}: {why}") from None
    return engine


def shares_data_across_connections(engine: Engine) -> bool:
    """Whether two connections of ``engine`` see the same data (not so for in-memory SQLite)."""
    if engine.dialect.name != "sqlite":
        return True
    database = engine.url.database or ""
    return database not in ("", ":memory:") and engine.url.query.get("mode") != "memory"


@contextmanager
def write_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-write transaction, committed when the block ends without an error."""
    with engine.connect() as conn:
        dialects.of(engine).begin_write(conn)
        with conn.begin():
            yield conn


def check_connection(engine: Engine) -> None:
    """Run ``SELECT 1``; raise :class:`AppDatabaseError` when the database is unreachable."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as exc:
        label = engine_label(engine)
        why = one_line(reason(exc), engine.url.password)
        raise AppDatabaseError(
            one_line(f"app database unreachable ({label}): {why}", engine.url.password)
        ) from exc
