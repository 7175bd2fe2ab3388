"""``init_db``: apply the DDL files under ``sql/<dialect>/`` in name order."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import Connection, Engine, inspect
from sqlalchemy.exc import NoSuchTableError

from . import dialects
from .engine import write_transaction
from .errors import AppDatabaseError, errors, wrap

_SQL_DIR_ENV = "CREDITSYNC_SQL_DIR"


def _sql_root() -> Path:
    override = os.environ.get(_SQL_DIR_ENV)
    if override:
        return Path(override).expanduser().resolve()
    return Path(__file__).resolve().parents[2] / "sql"


def _split_statements(script: str) -> list[str]:
    """Split a script on ``;`` at line end; drop comment-only fragments."""
    statements = []
    for chunk in re.split(r";[ \t]*$", script, flags=re.MULTILINE):
        lines = (line.strip() for line in chunk.splitlines())
        if any(line and not line.startswith("--") for line in lines):
            statements.append(chunk.strip())
    return statements


# ALTER TABLE [schema.]table ADD [COLUMN] column ... (identifiers bare or quoted).
_IDENT = r'(?:"[^"]+"|`[^`]+`|\w+)'
_ADD_COLUMN = re.compile(
    rf"^ALTER\s+TABLE\s+(?:(?P<schema>{_IDENT})\.)?(?P<table>{_IDENT})\s+ADD\s+(?:COLUMN\s+)?(?P<column>{_IDENT})",
    re.IGNORECASE,
)


def _unquote(identifier: str | None) -> str | None:
    if identifier and identifier[0] in "\"`" and identifier[-1] == identifier[0]:
        return identifier[1:-1]
    return identifier


def _added_column(statement: str) -> tuple[str | None, str, str] | None:
    """``(schema, table, column)`` when ``statement`` is an ``ALTER TABLE ... ADD COLUMN``."""
    code = "\n".join(line for line in statement.splitlines() if not line.strip().startswith("--"))
    match = _ADD_COLUMN.match(code.strip())
    if match is None or match["column"].upper() in ("IF", "CONSTRAINT"):
        return None  # "ADD COLUMN IF NOT EXISTS" and constraints: the server decides
    return _unquote(match["schema"]), _unquote(match["table"]) or "", _unquote(match["column"]) or ""


def _has_column(conn: Connection, schema: str | None, table: str, column: str) -> bool:
    try:
        columns = inspect(conn).get_columns(table, schema=schema)  # a fresh inspector: no cache
    except NoSuchTableError:
        return False  # let the statement fail with the server's own message
    return any(c["name"].lower() == column.lower() for c in columns)  # no server cares for case here


def init_db(engine: Engine) -> list[str]:
    """Apply ``sql/<dialect>/*.sql`` in name order in one transaction; return the file names.

    Every file is idempotent: ``CREATE ... IF NOT EXISTS`` for new objects, and
    ``ALTER TABLE t ADD COLUMN c ...`` for a column a later version added to an
    existing table -- skipped when ``t`` already has ``c`` (asked of SQLAlchemy's
    inspector inside the same transaction, not by swallowing an error), since
    SQLite and MySQL have no ``ADD COLUMN IF NOT EXISTS``.
    """
    dialect = dialects.of(engine)
    if dialect.sql_dir is None:
        raise AppDatabaseError(f"unsupported app database dialect: {engine.dialect.name}")
    directory = _sql_root() / dialect.sql_dir
    files = sorted(directory.glob("*.sql")) if directory.is_dir() else []
    if not files:
        raise AppDatabaseError(f"no schema files found in {directory}")
    scripts = [(path.name, _split_statements(path.read_text(encoding="utf-8"))) for path in files]
    with errors(engine, "init-db"), write_transaction(engine) as conn:
        dialect.lock_schema(conn)
        # A plain DBAPI cursor without parameters: '%' and ':' in the SQL stay literal.
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            for name, statements in scripts:
                for statement in statements:
                    added = _added_column(statement)
                    if added is not None and _has_column(conn, *added):
                        continue
                    try:
                        cursor.execute(statement)
                    except Exception as exc:
                        raise wrap(engine, f"init-db ({name})", exc) from exc
        finally:
            cursor.close()
    return [name for name, _ in scripts]
