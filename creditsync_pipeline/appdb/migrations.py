"""``init_db``: apply the DDL files under ``sql/<dialect>/`` in name order."""

from __future__ import annotations

import os
import re
from pathlib import Path

from sqlalchemy import Engine

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


def init_db(engine: Engine) -> list[str]:
    """Apply ``sql/<dialect>/*.sql`` in name order in one transaction; return the file names."""
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
                    try:
                        cursor.execute(statement)
                    except Exception as exc:
                        raise wrap(engine, f"init-db ({name})", exc) from exc
        finally:
            cursor.close()
    return [name for name, _ in scripts]
