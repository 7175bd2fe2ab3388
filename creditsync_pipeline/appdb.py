"""App database access: schema, reads, bulk compare-and-set corrections and audit.

SQLAlchemy Core only. Works on PostgreSQL (production) and SQLite (embedded
default). Every error that leaves this module is an :class:`AppDatabaseError`
with a one-line message that never contains a password.
"""

from __future__ import annotations

import io
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Engine,
    Identity,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    create_engine,
    delete,
    event,
    func,
    insert,
    literal,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.types import TypeDecorator

# The corrections frame is the rules' output; one definition of its columns.
from .rules import CORRECTION_COLUMNS

__all__ = [
    "AppDatabaseError",
    "ApplyResult",
    "CORRECTION_COLUMNS",
    "UTCDateTime",
    "apply_corrections",
    "billing_webhook_events",
    "check_connection",
    "count_instances",
    "create_engine_from_url",
    "credit_sync_audit",
    "init_db",
    "insert_instances",
    "instances",
    "load_plans",
    "metadata",
    "plans",
    "read_audit",
    "read_instances",
    "redact_url",
    "shares_data_across_connections",
    "upsert_plans",
]

#: Rows per batch inside the single apply transaction (read at call time).
APPLY_BATCH_SIZE = 50_000
#: Maximum number of ids bound into one ``IN (...)`` list.
READ_CHUNK_SIZE = 500
#: Ids per ``COPY ... WHERE instance_id = ANY(...)`` on PostgreSQL.
COPY_READ_CHUNK_SIZE = 100_000
#: Rows per executemany in the insert helpers.
INSERT_CHUNK_SIZE = 10_000


_SQL_DIR_ENV = "CREDITSYNC_SQL_DIR"
_DIALECT_DIRS = {"postgresql": "postgresql", "sqlite": "sqlite"}
_SQLITE_BEGIN_OPTION = "creditsync_sqlite_begin"
_PG_INIT_LOCK_KEY = 0x6372_6564_7379_6E63  # "credsync": serialises concurrent init_db
_MAX_MESSAGE = 400


class AppDatabaseError(Exception):
    """An app-database operation failed; the message is one line and password-free."""


# --------------------------------------------------------------------------- types


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
        value = _to_utc_datetime(value)
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


def _to_utc_datetime(value: Any) -> datetime | None:
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


# -------------------------------------------------------------------------- tables

metadata = MetaData()

_ID_TYPE = BigInteger().with_variant(Integer(), "sqlite")

plans = Table(
    "plans",
    metadata,
    Column("plan_id", Text, primary_key=True),
    Column("credits", Integer, nullable=False),
    Column("is_free", Boolean, nullable=False),
    CheckConstraint("credits >= 0"),
)
Index(
    "ux_plans_single_free",
    plans.c.is_free,
    unique=True,
    postgresql_where=plans.c.is_free,
    sqlite_where=plans.c.is_free == True,  # noqa: E712 - SQL expression
)

instances = Table(
    "instances",
    metadata,
    Column("instance_id", Text, primary_key=True),
    Column("plan_id", Text, nullable=False),
    Column("credits_total", Integer, nullable=False),
    Column("credits_used", Integer, nullable=False, server_default=text("0")),
    Column("created_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    Column("updated_at", UTCDateTime(), nullable=True, server_default=func.current_timestamp()),
)
Index("ix_instances_created_at", instances.c.created_at)

billing_webhook_events = Table(
    "billing_webhook_events",
    metadata,
    Column("id", _ID_TYPE, Identity(), primary_key=True),
    Column("event_id", Text, nullable=False, unique=True),
    Column("instance_id", Text, nullable=True),
    Column("event_type", Text, nullable=False),
    Column("payload", Text, nullable=True),
    Column("received_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    Column("processed_at", UTCDateTime(), nullable=True),
    Column("outcome", Text, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    sqlite_autoincrement=True,
)
Index(
    "ix_billing_webhook_events_unprocessed",
    billing_webhook_events.c.id,
    postgresql_where=billing_webhook_events.c.processed_at.is_(None),
    sqlite_where=billing_webhook_events.c.processed_at.is_(None),
)

credit_sync_audit = Table(
    "credit_sync_audit",
    metadata,
    Column("id", _ID_TYPE, Identity(), primary_key=True),
    Column("run_id", Text, nullable=False),
    Column("trigger", Text, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("old_plan_id", Text, nullable=True),
    Column("new_plan_id", Text, nullable=False),
    Column("old_credits_total", Integer, nullable=True),
    Column("new_credits_total", Integer, nullable=False),
    Column("reason", Text, nullable=True),
    Column("applied_at", UTCDateTime(), nullable=False, server_default=func.current_timestamp()),
    sqlite_autoincrement=True,
)
Index("ix_credit_sync_audit_instance_id", credit_sync_audit.c.instance_id)
Index("ix_credit_sync_audit_run_id", credit_sync_audit.c.run_id)

# Per-connection scratch tables used by apply_corrections (never in `metadata`). No
# indexes: ids are unique by validation, every join probes the indexed ``instances`` or
# hashes the scratch side, and an index would double the cost of each bulk load.
_scratch = MetaData()
_tmp_corrections = Table(
    "creditsync_tmp_corrections",
    _scratch,
    Column("seq", Integer, nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("old_plan_id", Text),
    Column("new_plan_id", Text, nullable=False),
    Column("old_credits_total", Integer),
    Column("new_credits_total", Integer, nullable=False),
    Column("reason", Text),
    Column("basis_at", UTCDateTime()),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
_tmp_applied = Table(
    "creditsync_tmp_applied",
    _scratch,
    Column("instance_id", Text, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
_TEMP_SCHEMA = {"postgresql": "pg_temp", "sqlite": "temp"}


# -------------------------------------------------------------------- errors, urls


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    url = str(url)
    try:
        rendered = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable as an SQLAlchemy URL: redact textually
        rendered = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", url)
    # Passwords given as query parameters (e.g. ?password=...) are hidden too.
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", rendered)


def _engine_label(engine: Engine) -> str:
    return redact_url(engine.url.render_as_string(hide_password=False))


def _one_line(message: str, secret: str | None = None) -> str:
    """Squash a message to one trimmed line, with ``secret`` masked."""
    if secret:
        message = message.replace(secret, "***")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 3] + "..."
    return line


def _reason(exc: BaseException) -> str:
    """A short human reason for ``exc`` (driver message first, no SQL, no parameters)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text_ = str(exc.orig)
    elif isinstance(exc, SQLAlchemyError):
        text_ = str(exc)
    else:
        text_ = str(exc)
        text_ = f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__
    return text_ or type(exc).__name__


def _is_connect_failure(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or exc.statement is None)


def _wrap(engine: Engine, action: str, exc: BaseException, note: str = "") -> AppDatabaseError:
    """Turn any failure into a one-line, password-free :class:`AppDatabaseError`."""
    label = _engine_label(engine)
    password = engine.url.password
    reason = _one_line(_reason(exc), password)
    if _is_connect_failure(exc):
        message = f"app database unreachable ({label}){note}: {reason}"
    else:
        message = f"{action} failed{note} ({label}): {reason}"
    return AppDatabaseError(_one_line(message, password))


@contextmanager
def _errors(engine: Engine, action: str) -> Iterator[None]:
    try:
        yield
    except AppDatabaseError:
        raise
    except Exception as exc:
        raise _wrap(engine, action, exc) from exc


# -------------------------------------------------------------------------- engine


def create_engine_from_url(url: str) -> Engine:
    """Create an engine for ``url`` (SQLite: WAL, busy timeout, foreign keys)."""
    try:
        parsed = make_url(url)
    except Exception:
        raise AppDatabaseError(f"invalid database URL ({redact_url(url)})") from None
    if parsed.drivername in ("postgres", "postgresql"):
        # psycopg2 is what we ship; SQLAlchemy 2.1 would pick psycopg 3 for a
        # bare postgresql:// URL (and "postgres://" is a common Heroku-style alias).
        parsed = parsed.set(drivername="postgresql+psycopg2")
    try:
        if parsed.get_backend_name() == "sqlite":
            engine = create_engine(parsed)
            _install_sqlite_hooks(engine)
        else:
            engine = create_engine(parsed, pool_pre_ping=True)
    except Exception as exc:
        reason = _one_line(_reason(exc), parsed.password)
        raise AppDatabaseError(
            f"cannot create engine for {redact_url(url)}: {reason}"
        ) from None
    return engine


def shares_data_across_connections(engine: Engine) -> bool:
    """Whether two connections of ``engine`` see the same data (not so for in-memory SQLite)."""
    if engine.dialect.name != "sqlite":
        return True
    database = engine.url.database or ""
    return database not in ("", ":memory:") and engine.url.query.get("mode") != "memory"


def _install_sqlite_hooks(engine: Engine) -> None:
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
        mode = options.get(_SQLITE_BEGIN_OPTION, "DEFERRED")
        if mode not in ("DEFERRED", "IMMEDIATE", "EXCLUSIVE"):
            mode = "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


@contextmanager
def _write_transaction(engine: Engine) -> Iterator[Connection]:
    """A read-write transaction; on SQLite it takes the write lock up front."""
    with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn.execution_options(**{_SQLITE_BEGIN_OPTION: "IMMEDIATE"})
        with conn.begin():
            yield conn


def check_connection(engine: Engine) -> None:
    """Run ``SELECT 1``; raise :class:`AppDatabaseError` when the database is unreachable."""
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
    except Exception as exc:
        label = _engine_label(engine)
        reason = _one_line(_reason(exc), engine.url.password)
        raise AppDatabaseError(
            _one_line(f"app database unreachable ({label}): {reason}", engine.url.password)
        ) from exc


# ------------------------------------------------------------------------- schema


def _sql_root() -> Path:
    override = os.environ.get(_SQL_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[1] / "sql"


def _split_statements(script: str) -> list[str]:
    """Split a script on ``;`` at line end; drop comment-only fragments."""
    statements = []
    for chunk in re.split(r";[ \t]*$", script, flags=re.MULTILINE):
        lines = (line.strip() for line in chunk.splitlines())
        if any(line and not line.startswith("--") for line in lines):
            statements.append(chunk.strip())
    return statements


def init_db(engine: Engine) -> list[str]:
    """Apply ``sql/<dialect>/*.sql`` in name order in one transaction; return the file names."""
    dialect = engine.dialect.name
    subdir = _DIALECT_DIRS.get(dialect)
    if subdir is None:
        raise AppDatabaseError(f"unsupported app database dialect: {dialect}")
    directory = _sql_root() / subdir
    files = sorted(directory.glob("*.sql")) if directory.is_dir() else []
    if not files:
        raise AppDatabaseError(f"no schema files found in {directory}")
    scripts = [(path.name, _split_statements(path.read_text(encoding="utf-8"))) for path in files]
    with _errors(engine, "init-db"), _write_transaction(engine) as conn:
        if dialect == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_INIT_LOCK_KEY})
        # A plain DBAPI cursor without parameters: '%' and ':' in the SQL stay literal.
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            for name, statements in scripts:
                for statement in statements:
                    try:
                        cursor.execute(statement)
                    except Exception as exc:
                        raise _wrap(engine, f"init-db ({name})", exc) from exc
        finally:
            cursor.close()
    return [name for name, _ in scripts]


# -------------------------------------------------------------------------- reads


def _str_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="str")


def _int_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="int64")


def _nullable_int_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="Int64")


def _utc_series(values: Sequence[Any]) -> pd.Series:
    if not len(values):
        return pd.Series([], dtype="datetime64[ns, UTC]")
    return pd.to_datetime(pd.Series(list(values), dtype=object), utc=True).astype(
        "datetime64[ns, UTC]"
    )


_ColumnMaker = Callable[[Sequence[Any]], pd.Series]


def _bool_series(values: Sequence[Any]) -> pd.Series:
    return pd.Series(list(values), dtype="bool")


def _frame(rows: Sequence[Sequence[Any]], spec: Mapping[str, _ColumnMaker]) -> pd.DataFrame:
    """Build a DataFrame with explicit dtypes from result rows (empty-safe)."""
    columns = list(zip(*rows)) if rows else [() for _ in spec]
    return pd.DataFrame(
        {name: make(values) for (name, make), values in zip(spec.items(), columns)}
    )


_PLAN_SPEC = {"plan_id": _str_series, "credits": _int_series, "is_free": _bool_series}
_INSTANCE_SPEC = {
    "instance_id": _str_series,
    "plan_id": _str_series,
    "credits_total": _int_series,
    "credits_used": _int_series,
    "updated_at": _utc_series,
}
_AUDIT_SPEC = {
    "id": _int_series,
    "run_id": _str_series,
    "trigger": _str_series,
    "instance_id": _str_series,
    "old_plan_id": _str_series,
    "new_plan_id": _str_series,
    "old_credits_total": _nullable_int_series,
    "new_credits_total": _int_series,
    "reason": _str_series,
    "applied_at": _utc_series,
}


def load_plans(engine: Engine) -> pd.DataFrame:
    """All plans: ``plan_id`` (str), ``credits`` (int64), ``is_free`` (bool)."""
    stmt = select(plans.c.plan_id, plans.c.credits, plans.c.is_free).order_by(plans.c.plan_id)
    with _errors(engine, "loading plans"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return _frame(rows, _PLAN_SPEC)


def read_instances(
    engine: Engine, instance_ids: Iterable[str] | None = None, *, ordered: bool = True
) -> pd.DataFrame:
    """Instances (all, or the named ones; unknown ids are absent from the result).

    Columns: ``instance_id``, ``plan_id`` (str), ``credits_total``, ``credits_used``
    (int64), ``updated_at`` (datetime64[ns, UTC], NaT when null); ordered by
    ``instance_id`` unless ``ordered=False`` (the database's own order: a full
    read then needs no sort).

    On PostgreSQL (psycopg2) the rows are streamed with ``COPY ... TO STDOUT`` as
    CSV and parsed by pandas' C reader (no Python object per row); named ids go
    in ``= ANY(array)`` chunks of ``COPY_READ_CHUNK_SIZE``. Elsewhere named ids
    are read with bound parameters in chunks of at most ``READ_CHUNK_SIZE``.
    """
    if isinstance(instance_ids, (str, bytes)):
        raise TypeError("instance_ids must be an iterable of ids, not a single string")
    wanted = (
        None if instance_ids is None
        else sorted({
            i if type(i) is str else str(i)
            for i in instance_ids
            if type(i) is str or (i is not None and not _isna(i))
        })
    )
    columns = [instances.c[name] for name in _INSTANCE_SPEC]
    base = select(*columns)
    if ordered:
        base = base.order_by(instances.c.instance_id)
    rows: list[Any] = []
    with _errors(engine, "reading instances"), engine.connect() as conn:
        if _copy_capable(conn):
            return _copy_instances_out(conn, wanted, ordered=ordered)
        if wanted is None:
            rows = list(conn.execute(base))
        else:
            for chunk in _chunks(wanted, READ_CHUNK_SIZE):
                rows.extend(conn.execute(base.where(instances.c.instance_id.in_(chunk))))
    return _frame(rows, _INSTANCE_SPEC)


def _copy_capable(conn: Connection) -> bool:
    """Whether ``conn`` can stream COPY (PostgreSQL through psycopg2)."""
    return conn.dialect.name == "postgresql" and conn.dialect.driver == "psycopg2"


_COPY_INSTANCES_SQL = (
    "COPY (SELECT instance_id, plan_id, credits_total, credits_used, updated_at "
    "FROM instances{where}{order}) TO STDOUT WITH (FORMAT csv)"
)


def _copy_instances_out(conn: Connection, wanted: list[str] | None, *, ordered: bool) -> pd.DataFrame:
    """``read_instances`` on PostgreSQL: COPY the rows out as CSV, parse them in C."""
    if wanted is not None and not wanted:
        return _frame([], _INSTANCE_SPEC)
    # ISO timestamps in UTC whatever the session's settings; LOCAL ends with the transaction.
    conn.exec_driver_sql("SET LOCAL TIME ZONE 'UTC'")
    conn.exec_driver_sql("SET LOCAL DateStyle = 'ISO, YMD'")
    dbapi = conn.connection.dbapi_connection
    from psycopg2.extensions import encodings as pg_encodings

    encoding = pg_encodings.get(dbapi.encoding, "utf_8")
    order = " ORDER BY instance_id" if ordered else ""
    sink = io.BytesIO()  # psycopg2 writes one row per call; a BytesIO keeps no object per row
    cursor = dbapi.cursor()
    try:
        if wanted is None:
            cursor.copy_expert(_COPY_INSTANCES_SQL.format(where="", order=order), sink)
        else:
            for chunk in _chunks(wanted, COPY_READ_CHUNK_SIZE):
                # mogrify quotes every id into an ARRAY[...] literal (COPY takes no parameters).
                where = cursor.mogrify(" WHERE instance_id = ANY(%s)", (chunk,)).decode(encoding)
                cursor.copy_expert(_COPY_INSTANCES_SQL.format(where=where, order=order), sink)
    finally:
        cursor.close()
    if not sink.tell():
        return _frame([], _INSTANCE_SPEC)
    sink.seek(0)
    frame = pd.read_csv(
        sink,
        header=None,
        names=list(_INSTANCE_SPEC),
        dtype={"instance_id": "str", "plan_id": "str", "credits_total": "int64",
               "credits_used": "int64", "updated_at": "str"},
        # Only an unquoted empty field (NULL) of updated_at is missing; ids stay verbatim.
        keep_default_na=False,
        na_values={"updated_at": [""]},
        encoding=encoding,
        engine="c",
    )
    sink.close()
    frame["updated_at"] = pd.to_datetime(frame["updated_at"], format="ISO8601", utc=True).astype(
        "datetime64[ns, UTC]"
    )
    return frame


def count_instances(engine: Engine) -> int:
    """Number of rows in ``instances``."""
    with _errors(engine, "counting instances"), engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(instances)).scalar_one())


def read_audit(engine: Engine, run_id: str | None = None) -> pd.DataFrame:
    """Audit rows (all, or one run's) ordered by ``id``."""
    columns = [credit_sync_audit.c[name] for name in _AUDIT_SPEC]
    stmt = select(*columns).order_by(credit_sync_audit.c.id)
    if run_id is not None:
        stmt = stmt.where(credit_sync_audit.c.run_id == run_id)
    with _errors(engine, "reading audit"), engine.connect() as conn:
        rows = conn.execute(stmt).all()
    return _frame(rows, _AUDIT_SPEC)


# ------------------------------------------------------------------ simple writes


def insert_instances(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> int:
    """Insert instance rows in one transaction; return how many were inserted.

    Each row needs ``instance_id``, ``plan_id``, ``credits_total``; ``credits_used``
    defaults to 0 and ``created_at`` / ``updated_at`` to the database's clock.
    """
    optional = ("created_at", "updated_at")
    total = 0
    with _errors(engine, "inserting instances"), _write_transaction(engine) as conn:
        for batch in _chunks(rows, INSERT_CHUNK_SIZE):
            groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
            for row in batch:
                record = {
                    "instance_id": row["instance_id"],
                    "plan_id": row["plan_id"],
                    "credits_total": int(row["credits_total"]),
                    "credits_used": int(row.get("credits_used", 0) or 0),
                }
                record.update({key: row[key] for key in optional if key in row})
                groups.setdefault(tuple(record), []).append(record)
            for records in groups.values():
                conn.execute(insert(instances), records)
                total += len(records)
    return total


def upsert_plans(engine: Engine, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert or update plans by ``plan_id`` in one transaction."""
    records = [
        {"plan_id": str(r["plan_id"]), "credits": int(r["credits"]), "is_free": bool(r["is_free"])}
        for r in rows
    ]
    if not records:
        return
    # Demote before promoting so moving the free flag never trips the one-free index.
    records.sort(key=lambda r: r["is_free"])
    dialect = engine.dialect.name
    with _errors(engine, "upserting plans"), _write_transaction(engine) as conn:
        if dialect in ("postgresql", "sqlite"):
            if dialect == "postgresql":
                from sqlalchemy.dialects.postgresql import insert as dialect_insert
            else:
                from sqlalchemy.dialects.sqlite import insert as dialect_insert
            for record in records:
                stmt = dialect_insert(plans).values(record)
                stmt = stmt.on_conflict_do_update(
                    index_elements=[plans.c.plan_id],
                    set_={"credits": stmt.excluded.credits, "is_free": stmt.excluded.is_free},
                )
                conn.execute(stmt)
        else:  # portable fallback
            for record in records:
                changed = conn.execute(
                    update(plans)
                    .where(plans.c.plan_id == record["plan_id"])
                    .values(credits=record["credits"], is_free=record["is_free"])
                ).rowcount
                if not changed:
                    conn.execute(insert(plans).values(record))


# -------------------------------------------------------------- apply corrections


def land_webhook_event(
    engine: Engine,
    *,
    event_id: str,
    event_type: str,
    instance_id: str | None,
    payload: str | None,
) -> bool:
    """Land one billing webhook as a ``billing_webhook_events`` row, idempotently.

    Returns ``True`` when the row was inserted and committed, ``False`` when a
    row with that ``event_id`` already existed (nothing changed).
    """
    values = {
        "event_id": event_id,
        "event_type": event_type,
        "instance_id": instance_id,
        "payload": payload,
    }
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    stmt = dialect_insert(billing_webhook_events).values(values).on_conflict_do_nothing(index_elements=["event_id"])
    with _errors(engine, "landing a webhook event"), _write_transaction(engine) as conn:
        return conn.execute(stmt).rowcount == 1


# ------------------------------------------- real-time nets: webhook rows, new instances


@dataclass(frozen=True)
class WebhookEvent:
    """One ``billing_webhook_events`` row as the real-time nets read it."""

    id: int
    event_id: str
    instance_id: str | None
    event_type: str
    payload: str | None
    attempts: int
    processed_at: datetime | None
    outcome: str | None
    #: an earlier row (smaller ``id``) carries the same ``event_id``
    duplicate: bool


def _webhook_select() -> Any:
    e = billing_webhook_events
    earlier = e.alias("earlier")
    duplicate = select(earlier.c.id).where(earlier.c.event_id == e.c.event_id, earlier.c.id < e.c.id).exists()
    return select(
        e.c.id, e.c.event_id, e.c.instance_id, e.c.event_type, e.c.payload,
        e.c.attempts, e.c.processed_at, e.c.outcome, duplicate.label("duplicate"),
    )


def _webhook_event(row: Any) -> WebhookEvent:
    return WebhookEvent(
        id=int(row.id),
        event_id=row.event_id,
        instance_id=row.instance_id,
        event_type=row.event_type,
        payload=row.payload,
        attempts=int(row.attempts or 0),
        processed_at=row.processed_at,
        outcome=row.outcome,
        duplicate=bool(row.duplicate),
    )


def unprocessed_webhook_events(
    engine: Engine,
    *,
    after_id: int | None = None,
    upto_id: int | None = None,
    max_attempts: int | None = None,
    skip_outcomes: Sequence[str] = (),
    limit: int = 1000,
) -> list[WebhookEvent]:
    """Rows with ``processed_at`` null, lowest ``id`` first.

    Optionally only ``after_id < id <= upto_id``, rows with fewer than
    ``max_attempts`` attempts and rows whose outcome is not one of
    ``skip_outcomes``; at most ``limit`` rows.
    """
    e = billing_webhook_events
    stmt = _webhook_select().where(e.c.processed_at.is_(None))
    if after_id is not None:
        stmt = stmt.where(e.c.id > int(after_id))
    if upto_id is not None:
        stmt = stmt.where(e.c.id <= int(upto_id))
    if max_attempts is not None:
        stmt = stmt.where(e.c.attempts < int(max_attempts))
    if skip_outcomes:
        stmt = stmt.where(or_(e.c.outcome.is_(None), e.c.outcome.not_in(list(skip_outcomes))))
    stmt = stmt.order_by(e.c.id).limit(max(0, int(limit)))
    with _errors(engine, "reading webhook events"), engine.connect() as conn:
        return [_webhook_event(row) for row in conn.execute(stmt)]


def webhook_events_by_id(engine: Engine, ids: Iterable[int]) -> list[WebhookEvent]:
    """The named ``billing_webhook_events`` rows (processed or not), by ``id``."""
    e = billing_webhook_events
    wanted = sorted({int(i) for i in ids})
    rows: list[Any] = []
    with _errors(engine, "reading webhook events"), engine.connect() as conn:
        for chunk in _chunks(wanted, READ_CHUNK_SIZE):
            rows.extend(conn.execute(_webhook_select().where(e.c.id.in_(chunk)).order_by(e.c.id)))
    return [_webhook_event(row) for row in rows]


def claim_webhook_events(engine: Engine, ids: Iterable[int]) -> list[WebhookEvent]:
    """Count one attempt on each named row that is still unprocessed; return those rows.

    The returned rows carry ``attempts`` after the increment. Rows already
    processed (or absent) are left alone and not returned.
    """
    e = billing_webhook_events
    wanted = sorted({int(i) for i in ids})
    claimed: list[int] = []
    rows: list[Any] = []
    with _errors(engine, "claiming webhook events"), _write_transaction(engine) as conn:
        for chunk in _chunks(wanted, READ_CHUNK_SIZE):
            stmt = (
                update(e)
                .where(e.c.id.in_(chunk), e.c.processed_at.is_(None))
                .values(attempts=e.c.attempts + 1)
                .returning(e.c.id)
            )
            claimed.extend(int(i) for i in conn.execute(stmt).scalars())
        for chunk in _chunks(sorted(claimed), READ_CHUNK_SIZE):
            rows.extend(conn.execute(_webhook_select().where(e.c.id.in_(chunk)).order_by(e.c.id)))
    return [_webhook_event(row) for row in rows]


def mark_webhook_events(
    engine: Engine,
    outcomes: Mapping[int, str],
    *,
    processed: bool = True,
    now: datetime | None = None,
) -> int:
    """Record an ``outcome`` on rows still unprocessed; return how many rows changed.

    With ``processed`` (the default) ``processed_at`` is set too (``now``, or the
    current time); without it only ``outcome`` is written (a failed attempt).
    """
    e = billing_webhook_events
    by_outcome: dict[str, list[int]] = {}
    for row_id, outcome in outcomes.items():
        by_outcome.setdefault(str(outcome), []).append(int(row_id))
    stamp = _to_utc_datetime(now) or datetime.now(timezone.utc)
    changed = 0
    with _errors(engine, "marking webhook events"), _write_transaction(engine) as conn:
        for outcome, row_ids in by_outcome.items():
            values: dict[str, Any] = {"outcome": outcome}
            if processed:
                values["processed_at"] = stamp
            for chunk in _chunks(sorted(row_ids), READ_CHUNK_SIZE):
                stmt = update(e).where(e.c.id.in_(chunk), e.c.processed_at.is_(None)).values(**values)
                changed += int(conn.execute(stmt).rowcount or 0)
    return changed


def instances_created_since(
    engine: Engine, since: datetime, *, limit: int | None = None
) -> list[tuple[str, datetime]]:
    """``(instance_id, created_at)`` of the rows created at or after ``since``, oldest first."""
    stmt = (
        select(instances.c.instance_id, instances.c.created_at)
        .where(instances.c.created_at >= _to_utc_datetime(since))
        .order_by(instances.c.created_at, instances.c.instance_id)
    )
    if limit is not None:
        stmt = stmt.limit(max(0, int(limit)))
    with _errors(engine, "reading new instances"), engine.connect() as conn:
        return [(str(row.instance_id), row.created_at) for row in conn.execute(stmt)]


@dataclass(frozen=True)
class ApplyResult:
    """Outcome of :func:`apply_corrections`: the rows written and the rows skipped."""

    applied: pd.DataFrame
    skipped: pd.DataFrame


def apply_corrections(
    engine: Engine,
    corrections: pd.DataFrame,
    *,
    run_id: str,
    trigger: str,
    now: datetime,
) -> ApplyResult:
    """Apply corrections with compare-and-set and audit them, all in one transaction.

    A row is updated (``plan_id``, ``credits_total``, ``updated_at = now``; never
    ``credits_used``) only if it still holds ``old_plan_id`` / ``old_credits_total``
    and was not updated after ``basis_at``; a null ``basis_at`` only matches rows
    whose ``updated_at`` is null. Every applied row gets one ``credit_sync_audit``
    row. Any failure rolls everything back and raises :class:`AppDatabaseError`.
    """
    missing = [c for c in CORRECTION_COLUMNS if c not in corrections.columns]
    if missing:
        raise AppDatabaseError(f"corrections are missing columns: {', '.join(missing)}")
    if corrections.empty:
        empty = corrections.iloc[0:0].reset_index(drop=True)
        return ApplyResult(applied=empty, skipped=empty.copy())
    now_utc = _to_utc_datetime(now) if isinstance(now, datetime) else None
    if now_utc is None:
        raise AppDatabaseError("apply_corrections needs a datetime for `now`")
    columns = _correction_columns(corrections)
    ids = columns["instance_id"]

    batch_size = max(1, int(APPLY_BATCH_SIZE))
    applied_ids: set[str] = set()
    try:
        with _write_transaction(engine) as conn:
            _create_scratch_tables(conn)
            for start in range(0, len(ids), batch_size):
                batch = {name: values[start : start + batch_size] for name, values in columns.items()}
                applied = _apply_batch(conn, batch, run_id=run_id, trigger=trigger, now=now_utc)
                applied_ids.update(applied)
            _drop_scratch_tables(conn)
    except Exception as exc:
        raise _wrap(engine, "applying corrections", exc, note=", nothing written") from exc

    mask = np.fromiter((i in applied_ids for i in ids), dtype=bool, count=len(ids))
    return ApplyResult(
        applied=corrections.loc[mask].reset_index(drop=True),
        skipped=corrections.loc[~mask].reset_index(drop=True),
    )


def _correction_columns(corrections: pd.DataFrame) -> dict[str, list[Any]]:
    """Validate the corrections frame and turn it into bind-ready columns (one list each)."""
    ids = _object_list(corrections["instance_id"])
    if any(i is None for i in ids):
        raise AppDatabaseError("corrections contain a row without instance_id")
    ids = [str(i) for i in ids]
    if len(set(ids)) != len(ids):
        dupes = sorted(i for i, n in Counter(ids).items() if n > 1)[:5]
        listed = ", ".join(map(repr, dupes))
        raise AppDatabaseError(f"corrections name an instance more than once: {listed}")
    new_plans = _object_list(corrections["new_plan_id"])
    new_credits = _int_list(corrections["new_credits_total"])
    if any(p is None for p in new_plans) or any(c is None for c in new_credits):
        raise AppDatabaseError("corrections contain a row without new_plan_id or new_credits_total")
    old_plans = _object_list(corrections["old_plan_id"])
    old_credits = _int_list(corrections["old_credits_total"])
    reasons = _object_list(corrections["reason"])
    basis = _datetime_list(corrections["basis_at"])
    return {
        "seq": list(range(len(ids))),
        "instance_id": ids,
        "old_plan_id": [None if p is None else str(p) for p in old_plans],
        "new_plan_id": [str(p) for p in new_plans],
        "old_credits_total": old_credits,
        "new_credits_total": new_credits,
        "reason": [None if r is None else str(r) for r in reasons],
        "basis_at": basis,
    }


def _create_scratch_tables(conn: Connection) -> None:
    if conn.dialect.name == "postgresql":
        # SET LOCAL: this transaction only. A batch's hashes and sorts stay in memory, and
        # the planner prices index probes as on SSD/cached storage, so a batch that is a
        # small share of the table is joined through the primary key (one probe per
        # correction) instead of hashing a scan of every instance.
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        conn.exec_driver_sql("SET LOCAL random_page_cost = 1.1")
    _drop_scratch_tables(conn)
    _tmp_corrections.create(conn)
    _tmp_applied.create(conn)


def _drop_scratch_tables(conn: Connection) -> None:
    schema = _TEMP_SCHEMA.get(conn.dialect.name)
    for table in (_tmp_applied, _tmp_corrections):
        name = f"{schema}.{table.name}" if schema else table.name
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def _load_rows(
    conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]]
) -> None:
    """Bulk-load rows into a scratch table: a list of row dicts, or a mapping of columns.

    Values go through the columns' own bind processing (e.g. UTCDateTime), then
    straight to the driver: ``COPY ... FROM STDIN`` on PostgreSQL (psycopg2), a plain
    DBAPI ``executemany`` on SQLite, SQLAlchemy's executemany elsewhere.
    """
    if isinstance(rows, Mapping):
        columns = {name: list(values) for name, values in rows.items()}
    else:
        columns = {name: [row[name] for row in rows] for name in rows[0]} if rows else {}
    names = list(columns)
    if not names or not columns[names[0]]:
        return
    dialect = conn.dialect
    if dialect.name not in ("postgresql", "sqlite") or (
        dialect.name == "postgresql" and dialect.driver != "psycopg2"
    ):
        conn.execute(insert(table), [dict(zip(names, values)) for values in zip(*columns.values())])
        return
    processed = []
    for name in names:
        process = table.c[name].type.dialect_impl(dialect).bind_processor(dialect)
        processed.append(_processed(process, columns[name]) if process else columns[name])
    quote = dialect.identifier_preparer.quote
    target = f"{quote(table.name)} ({', '.join(quote(n) for n in names)})"
    if dialect.name == "sqlite":
        placeholders = ", ".join("?" for _ in names)
        conn.exec_driver_sql(f"INSERT INTO {target} VALUES ({placeholders})", list(zip(*processed)))
        return
    # COPY text format: tab-separated, \N for NULL, backslash escapes.
    fields = [_copy_text_column(values) for values in processed]
    body = io.StringIO("\n".join(map("\t".join, zip(*fields))) + "\n")
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        cursor.copy_expert(f"COPY {target} FROM STDIN", body, size=1 << 20)
    finally:
        cursor.close()


def _processed(process: Callable[[Any], Any], values: list[Any]) -> list[Any]:
    """``[process(v) for v in values]``, once per distinct object (bind processors are pure)."""
    done: dict[int, Any] = {}
    out = []
    for v in values:
        key = id(v)
        if key not in done:
            done[key] = process(v)
        out.append(done[key])
    return out


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text_column(values: Sequence[Any]) -> list[str]:
    """One column's values as COPY text fields (``\\N`` for NULL, escaped strings)."""
    kinds = set(map(type, values))
    if kinds == {str}:
        texts: list[Any] = list(values)
    elif kinds == {int}:
        texts = list(map(str, values))
    elif kinds == {datetime}:  # a run's timestamps repeat (one per billing page): format each once
        texts = _processed(datetime.isoformat, values)
    else:
        texts = [
            v if type(v) is str
            else None if v is None
            else ("t" if v else "f") if isinstance(v, bool)
            else v.isoformat() if isinstance(v, datetime)
            else str(v)
            for v in values
        ]
    present = [t for t in texts if t is not None]
    joined = "".join(present)
    if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
        texts = [None if t is None else t.translate(_COPY_ESCAPES) for t in texts]
    if len(present) != len(texts):
        texts = ["\\N" if t is None else t for t in texts]
    return texts  # type: ignore[return-value]


def _apply_batch(
    conn: Connection, batch: Mapping[str, list[Any]], *, run_id: str, trigger: str, now: datetime
) -> list[str]:
    """Load one batch (columns), compare-and-set update ``instances``, audit; return applied ids."""
    conn.execute(delete(_tmp_applied))
    conn.execute(delete(_tmp_corrections))
    _load_rows(conn, _tmp_corrections, batch)
    t = _tmp_corrections
    cas_update = (
        update(instances)
        .where(
            instances.c.instance_id == t.c.instance_id,
            instances.c.plan_id == t.c.old_plan_id,
            instances.c.credits_total == t.c.old_credits_total,
            or_(instances.c.updated_at.is_(None), instances.c.updated_at <= t.c.basis_at),
        )
        .values(plan_id=t.c.new_plan_id, credits_total=t.c.new_credits_total, updated_at=now)
        .returning(instances.c.instance_id)
    )
    applied = list(conn.execute(cas_update).scalars())
    if applied:
        _load_rows(conn, _tmp_applied, {"instance_id": applied})
        _insert_audit(conn, run_id=run_id, trigger=trigger, now=now)
    return applied


def _insert_audit(conn: Connection, *, run_id: str, trigger: str, now: datetime) -> None:
    """Audit every correction of the current batch that was applied."""
    t = _tmp_corrections
    source = (
        select(
            literal(run_id, Text),
            literal(trigger, Text),
            t.c.instance_id,
            t.c.old_plan_id,
            t.c.new_plan_id,
            t.c.old_credits_total,
            t.c.new_credits_total,
            t.c.reason,
            literal(now, UTCDateTime()),
        )
        .where(t.c.instance_id.in_(select(_tmp_applied.c.instance_id)))
        .order_by(t.c.seq)
    )
    target = [
        "run_id",
        "trigger",
        "instance_id",
        "old_plan_id",
        "new_plan_id",
        "old_credits_total",
        "new_credits_total",
        "reason",
        "applied_at",
    ]
    conn.execute(insert(credit_sync_audit).from_select(target, source))


# -------------------------------------------------------------------------- helpers


def _isna(value: Any) -> bool:
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def _object_list(series: pd.Series) -> list[Any]:
    """Column values as Python objects with every kind of missing value as None."""
    missing = series.isna().tolist()
    if not any(missing):
        return series.astype(object).tolist()
    return [None if na else v for v, na in zip(series.astype(object).tolist(), missing)]


def _int_list(series: pd.Series) -> list[int | None]:
    if isinstance(series.dtype, np.dtype) and series.dtype.kind in "iu":
        return series.tolist()  # a NumPy integer column: exact Python ints, no missing values
    out: list[int | None] = []
    for value in _object_list(series):
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


def _datetime_list(series: pd.Series) -> list[datetime | None]:
    try:
        converted = pd.to_datetime(series, utc=True).dt.floor("us")
    except (TypeError, ValueError) as exc:
        raise AppDatabaseError(
            f"corrections contain an unreadable basis_at: {_one_line(str(exc))}"
        ) from None
    missing = converted.isna().tolist()
    if not any(missing):  # one datetime object per distinct instant (a run has few)
        codes, uniques = pd.factorize(converted)
        return np.array(uniques.to_pydatetime(), dtype=object)[codes].tolist()
    values = converted.dt.to_pydatetime().tolist()
    return [None if na else v for v, na in zip(values, missing)]


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
