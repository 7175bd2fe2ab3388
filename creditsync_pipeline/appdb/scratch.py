"""Per-transaction scratch tables for the bulk writes (never part of ``metadata``).

A bulk write loads its rows into a TEMPORARY table (``COPY`` on PostgreSQL, one
``executemany`` on SQLite, multi-row ``INSERT`` statements on MySQL: see
:mod:`.dialects`), then changes the real tables with a few set-based statements
joined to it. No indexes: ids are unique by validation, every join probes the
indexed real table or hashes the scratch side, and an index would double the cost
of each bulk load.

A text column's ``info["like"]`` names the real column whose values it carries
(``"table.column"``): MySQL creates the scratch column with that column's type,
character set and collation, so joins compare like with like and use the real
table's index (see :mod:`.dialects.mysql`). The other servers ignore it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import BigInteger, Boolean, Column, Connection, Integer, MetaData, Table, Text

from . import dialects
from .timestamps import UTCDateTime

_scratch = MetaData()


def _like(column: str) -> dict[str, str]:
    return {"like": column}


#: One planned compare-and-set per row: expect ``old_*``, write ``new_*``. ``seq`` orders the
#: audit rows (a frame position, or an audit id: 64-bit). ``new_*`` may be NULL only for a
#: revert's unrestorable target, which its CAS condition refuses. ``applied`` is set by the
#: compare-and-set itself where the server has no ``UPDATE ... RETURNING`` (MySQL).
tmp_corrections = Table(
    "creditsync_tmp_corrections",
    _scratch,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), nullable=False),
    Column("instance_id", Text, nullable=False, info=_like("instances.instance_id")),
    Column("old_plan_id", Text, info=_like("instances.plan_id")),
    Column("new_plan_id", Text, info=_like("instances.plan_id")),
    Column("old_credits_total", Integer),
    Column("new_credits_total", Integer),
    Column("reason", Text, info=_like("credit_sync_audit.reason")),
    Column("basis_at", UTCDateTime()),
    Column("applied", Boolean(create_constraint=False)),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)
tmp_applied = Table(
    "creditsync_tmp_applied",
    _scratch,
    Column("instance_id", Text, nullable=False, info=_like("instances.instance_id")),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)

tmp_links = Table(
    "creditsync_tmp_links",
    _scratch,
    Column("instance_id", Text, nullable=False, info=_like("billing_customer_links.instance_id")),
    Column("customer_id", Text, nullable=False, info=_like("billing_customer_links.customer_id")),
    prefixes=["TEMPORARY"],
    postgresql_on_commit="DROP",
)


def create(conn: Connection, *tables: Table) -> None:
    """(Re)create ``tables`` empty on ``conn``, inside its transaction."""
    drop(conn, *tables)
    dialect = dialects.of(conn)
    for table in tables:
        dialect.create_temporary(conn, table)


def drop(conn: Connection, *tables: Table) -> None:
    """Drop ``tables`` if they exist (in reverse order)."""
    dialect = dialects.of(conn)
    for table in reversed(tables):
        dialect.drop_temporary(conn, table)


def load(conn: Connection, table: Table, columns: Mapping[str, Sequence[Any]]) -> None:
    """Bulk-load ``columns`` (name -> values, all the same length) into a scratch table.

    Values go through the columns' own bind processing (e.g. UTCDateTime), then
    straight to the driver, the fastest way the dialect has (see :mod:`.dialects`).
    """
    data = {name: list(values) for name, values in columns.items()}
    if not data or not next(iter(data.values())):
        return
    dialects.of(conn).load_rows(conn, table, data)
