"""PostgreSQL: COPY in and out through psycopg2, advisory lock for init-db."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy import Connection, Table, text
from sqlalchemy.engine import URL

from .. import frames, limits
from ..values import chunks
from .base import OnConflict, bind_processed, memoized, quoted_target

_INIT_LOCK_KEY = 0x6372_6564_7379_6E63  # "credsync": serialises concurrent init_db

# Timestamps travel as integer microseconds since the epoch (whatever the session's time
# zone or DateStyle; a NULL is an empty field): pandas parses an integer column in C with no
# Python object per row, ~10x faster than ISO text -- which pays for the second timestamp.
_EPOCH_US = "(EXTRACT(EPOCH FROM {0}) * 1000000)::bigint"
_TIMESTAMPS = frames.EPOCH_TIMESTAMPS
_COPY_INSTANCES_SQL = (
    "COPY (SELECT instance_id, plan_id, credits_total, credits_used, "
    + ", ".join(_EPOCH_US.format(name) for name in _TIMESTAMPS)
    + " FROM instances{where}{order}) TO STDOUT WITH (FORMAT csv)"
)


class PostgreSQL(OnConflict):
    name = "postgresql"
    sql_dir = "postgresql"
    temp_schema = "pg_temp"

    def _insert(self) -> Any:
        from sqlalchemy.dialects.postgresql import insert

        return insert

    def normalize_url(self, url: URL) -> URL:
        if url.drivername in ("postgres", "postgresql"):
            # psycopg2 is what we ship; SQLAlchemy 2.1 would pick psycopg 3 for a
            # bare postgresql:// URL (and "postgres://" is a common Heroku-style alias).
            return url.set(drivername="postgresql+psycopg2")
        return url

    def lock_schema(self, conn: Connection) -> None:
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _INIT_LOCK_KEY})

    def tune_bulk(self, conn: Connection) -> None:
        # SET LOCAL: this transaction only. A batch's hashes and sorts stay in memory, and
        # the planner prices index probes as on SSD/cached storage, so a batch that is a
        # small share of the table is joined through the primary key (one probe per
        # correction) instead of hashing a scan of every instance.
        conn.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        conn.exec_driver_sql("SET LOCAL random_page_cost = 1.1")

    def load_rows(self, conn: Connection, table: Table, columns: Mapping[str, list[Any]]) -> None:
        """``COPY ... FROM STDIN`` (text format) through psycopg2; portable SQL elsewhere."""
        if not _copy_capable(conn):
            super().load_rows(conn, table, columns)
            return
        fields = [_copy_text_column(values) for values in bind_processed(conn, table, columns)]
        body = io.StringIO("\n".join(map("\t".join, zip(*fields))) + "\n")
        cursor = conn.connection.dbapi_connection.cursor()
        try:
            cursor.copy_expert(f"COPY {quoted_target(conn, table, list(columns))} FROM STDIN", body, size=1 << 20)
        finally:
            cursor.close()

    def read_instances(
        self, conn: Connection, wanted: list[str] | None, *, ordered: bool
    ) -> pd.DataFrame | None:
        """Stream the rows with ``COPY ... TO STDOUT`` as CSV, parse them with pandas' C reader.

        No Python object per row; named ids go in ``= ANY(array)`` chunks of
        ``limits.COPY_READ_CHUNK_SIZE``.
        """
        if not _copy_capable(conn):
            return None
        if wanted is not None and not wanted:
            return frames.frame([], frames.INSTANCE_SPEC)
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
                for chunk in chunks(wanted, limits.COPY_READ_CHUNK_SIZE):
                    # mogrify quotes every id into an ARRAY[...] literal (COPY takes no parameters).
                    where = cursor.mogrify(" WHERE instance_id = ANY(%s)", (chunk,)).decode(encoding)
                    cursor.copy_expert(_COPY_INSTANCES_SQL.format(where=where, order=order), sink)
        finally:
            cursor.close()
        if not sink.tell():
            return frames.frame([], frames.INSTANCE_SPEC)
        sink.seek(0)
        frame = frames.instances_from_csv(sink, encoding=encoding)
        sink.close()
        return frame


def _copy_capable(conn: Connection) -> bool:
    """Whether ``conn`` can stream COPY (PostgreSQL through psycopg2)."""
    return conn.dialect.driver == "psycopg2"


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_text_column(values: Sequence[Any]) -> list[str]:
    """One column's values as COPY text fields (``\\N`` for NULL, escaped strings)."""
    kinds = set(map(type, values))
    if kinds == {str}:
        texts: list[Any] = list(values)
    elif kinds == {int}:
        texts = list(map(str, values))
    elif kinds == {datetime}:  # a run's timestamps repeat (one per billing page): format each once
        texts = memoized(datetime.isoformat, list(values))
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
