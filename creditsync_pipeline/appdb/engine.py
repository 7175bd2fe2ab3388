"""Engines and transactions: creation from a URL, write transactions, health, clock."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

from sqlalchemy import Connection, Engine, select, text, type_coerce
from sqlalchemy.engine import URL, make_url

from . import dialects
from .errors import AppDatabaseError, engine_label, errors, one_line, reason, redact_url, url_secrets
from .timestamps import UTCDateTime


def create_engine_from_url(url: str) -> Engine:
    """Create an engine for ``url`` (SQLite: WAL, busy timeout, foreign keys).

    A password holding a raw ``@`` (``postgresql://u:p@ss@host/db``) is read as the
    user meant it: SQLAlchemy's parser would end it at the first ``@`` and take
    ``ss@host`` for the host name (which no host name can be).
    """
    try:
        parsed = _at_sign_in_password(make_url(url))
    except Exception:
        raise AppDatabaseError(f"invalid database URL ({redact_url(url)})") from None
    try:
        dialect = dialects.for_name(parsed.get_backend_name())
        engine = dialect.create_engine(dialect.normalize_url(parsed))
    except Exception as exc:
        why = one_line(reason(exc), *url_secrets(parsed))
        raise AppDatabaseError(f"cannot create engine for {redact_url(url)}: {why}") from None
    return engine


def _at_sign_in_password(url: URL) -> URL:
    """Move what the parser put into the host before its last ``@`` back into the password."""
    host = url.host or ""
    if "@" not in host:
        return url
    extra, _, real_host = host.rpartition("@")
    if url.password is None:  # "user@x@host": the user name holds the "@"
        return url.set(username=f"{url.username or ''}@{extra}", host=real_host)
    return url.set(password=f"{url.password}@{extra}", host=real_host)


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
        secrets = url_secrets(engine.url)
        why = one_line(reason(exc), *secrets)
        raise AppDatabaseError(
            one_line(f"app database unreachable ({label}): {why}", *secrets)
        ) from exc


def database_now(engine: Engine) -> datetime:
    """The database server's current time, aware UTC.

    The one clock every process writing to the database shares (an app server's
    own clock may run fast); SQLite's is the local machine's, in milliseconds.
    """
    with errors(engine, "reading the database clock"), engine.connect() as conn:
        return connection_now(conn)


def connection_now(conn: Connection) -> datetime:
    """:func:`database_now` on an open connection (inside its transaction, if any)."""
    value = conn.execute(select(type_coerce(dialects.of(conn).now(), UTCDateTime()))).scalar_one()
    if not isinstance(value, datetime):
        raise AppDatabaseError(f"the database clock returned {type(value).__name__}, not a timestamp")
    return value
