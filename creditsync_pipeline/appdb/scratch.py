"""Per-transaction scratch tables for the bulk writes (never part of ``metadata``).

A bulk write loads its rows into a TEMPORARY table (``COPY`` on PostgreSQL, one
``executemany`` on SQLite: see :mod:`.dialects`), then changes the real tables
with a few set-based statements joined to it. No indexes: ids are unique by
validation, every join probes the indexed real table or hashes the scratch side,
and an index would double the cost of each bulk load.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, Column, Connection, Integer, MetaData, Table, Text

from . import dialects
from .timestamps import UTCDateTime

_scratch = MetaData()

#: One planned compare-and-set per row: expect ``old_*``, write ``new_*``. ``seq`` orders the
#: audit rows (a frame position, or an audit id: 64-bit). ``new_*`` may be NULL only for a
#: revert's unrestorable target, which its CAS condition refuses.
tmp_corrections = Table(
    "creditsync_tmp_corrections",
    _scratch,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("instance_id", Text, nullable=False),
    Column("old_plan_id", Text),
    Column("new_plan_id", Text),
    Column("old_credits_total", Integer),
    Column("new_credits_total", Integer),
    Column("reason", Text),
    Column("basis_at", UTCDateTime()),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
tmp_applied = Table(
    "creditsync_tmp_applied",
    _scratch,
    Column("instance_id", Text, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)

tmp_links = Table(
    "creditsync_tmp_links",
    _scratch,
    Column("instance_id", Text, nullable=False),
    Column("customer_id", Text, nullable=False),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)


def create(conn: Connection, *tables: Table) -> None:
    """(Re)create ``tables`` empty on ``conn``, inside its transaction."""
    drop(conn, *tables)
    for table in tables:
        table.create(conn)


def drop(conn: Connection, *tables: Table) -> None:
    """Drop ``tables`` if they exist (in reverse order)."""
    schema = dialects.of(conn).temp_schema
    for table in reversed(tables):
        name = f"{schema}.{table.name}" if schema else table.name
        conn.exec_driver_sql(f"DROP TABLE IF EXISTS {name}")


def load(conn: Connection, table: Table, columns: Mapping[str, Sequence[Any]]) -> None:
    """Bulk-load ``columns`` (name -> values, all the same length) into a scratch table.

    Values go through the columns' own bind processing (e.g. UTCDateTime), then
    straight to the driver, the fastest way the dialect has (see :mod:`.dialects`).
    """
    data = {name: list(values) for name, values in columns.items()}
    if not data or not next(iter(data.values())):
        return
    dialects.of(conn).load_rows(conn, table, data)
