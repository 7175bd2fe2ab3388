"""``billing_customer_links``: which billing customer belongs to which instance.

creditsync's own memory (SPEC, Stripe, Targeted): full syncs and webhooks teach it,
targeted syncs list an instance's subscriptions by its customer, and a customer's
webhook finds its instances. One row per ``(provider, instance_id)``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from datetime import datetime

from sqlalchemy import Engine, Text, literal, select

from . import dialects, limits, scratch
from .engine import connection_now, write_transaction
from .errors import AppDatabaseError, errors, is_deadlock
from .schema import billing_customer_links
from .scratch import tmp_links
from .timestamps import UTCDateTime, to_utc_datetime
from .values import chunks, isna

_l = billing_customer_links


def remember_customer_links(
    engine: Engine, provider: str, links: Mapping[str, str], *, now: datetime | None = None
) -> int:
    """Upsert ``instance_id -> customer_id`` links of ``provider``; return the rows written.

    Bulk: one load into a scratch table (COPY on PostgreSQL) and one
    ``INSERT ... SELECT ... ON CONFLICT DO UPDATE`` (MySQL: one ``UPDATE ... JOIN`` and
    one ``INSERT ... SELECT``), whatever the number of links
    (a full sync hands over every link it saw). A link that already says the same
    is left alone (not counted, ``updated_at`` kept: when the link last changed);
    a changed one gets the new customer and ``updated_at = now`` (default: the
    database's clock). Nothing is written unless every link is valid.
    """
    _check_provider(provider)
    instance_ids: list[str] = []
    customer_ids: list[str] = []
    # Id order: concurrent writers (a full sync, the receivers) lock rows in the same order.
    for instance_id, customer_id in sorted(links.items(), key=lambda kv: str(kv[0])):
        if not isinstance(instance_id, str) or not isinstance(customer_id, str) or not customer_id:
            raise AppDatabaseError(
                f"a customer link needs a text instance id and a non-empty customer id, not "
                f"{instance_id!r:.60} -> {customer_id!r:.60}"
            )
        instance_ids.append(instance_id)
        customer_ids.append(customer_id)
    if not instance_ids:
        return 0
    stamp = to_utc_datetime(now) if now is not None else None
    for attempt in range(1, _DEADLOCK_ATTEMPTS + 1):
        try:
            return _upsert_links(engine, provider, instance_ids, customer_ids, stamp)
        except AppDatabaseError as exc:
            if attempt == _DEADLOCK_ATTEMPTS or not is_deadlock(exc.__cause__ or exc):
                raise
            time.sleep(0.05 * attempt)  # another writer won the race: the upsert is idempotent, go again
    raise AssertionError("unreachable")


#: a link upsert that meets a deadlock is tried again this many times in all
_DEADLOCK_ATTEMPTS = 3


def _upsert_links(
    engine: Engine, provider: str, instance_ids: list[str], customer_ids: list[str], stamp: datetime | None
) -> int:
    with errors(engine, "remembering customer links"), write_transaction(engine) as conn:
        dialects.of(conn).tune_bulk(conn)
        scratch.create(conn, tmp_links)
        scratch.load(conn, tmp_links, {"instance_id": instance_ids, "customer_id": customer_ids})
        source = select(
            literal(provider, Text),
            tmp_links.c.instance_id,
            tmp_links.c.customer_id,
            literal(stamp or connection_now(conn), UTCDateTime()),
        )
        written = dialects.of(conn).upsert_from_select(
            conn, _l, ["provider", "instance_id", "customer_id", "updated_at"], source,
            key=["provider", "instance_id"], update=["customer_id", "updated_at"], changed=["customer_id"],
        )
        if written is None:
            raise AppDatabaseError(f"customer links are not supported on {engine.dialect.name}")
        scratch.drop(conn, tmp_links)
    return written


def customer_links_for(engine: Engine, provider: str, instance_ids: Iterable[str]) -> dict[str, str]:
    """``instance_id -> customer_id`` for the named instances that have a link."""
    _check_provider(provider)
    wanted = _distinct(instance_ids)
    out: dict[str, str] = {}
    with errors(engine, "reading customer links"), engine.connect() as conn:
        for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
            stmt = select(_l.c.instance_id, _l.c.customer_id).where(
                _l.c.provider == provider, _l.c.instance_id.in_(chunk)
            )
            out.update((str(i), str(c)) for i, c in conn.execute(stmt))
    return out


def instances_for_customers(
    engine: Engine, provider: str, customer_ids: Iterable[str]
) -> dict[str, list[str]]:
    """``customer_id -> [instance_id, ...]`` (sorted) for the named customers that have links."""
    _check_provider(provider)
    wanted = _distinct(customer_ids)
    out: dict[str, list[str]] = {}
    with errors(engine, "reading customer links"), engine.connect() as conn:
        for chunk in chunks(wanted, limits.READ_CHUNK_SIZE):
            stmt = select(_l.c.customer_id, _l.c.instance_id).where(
                _l.c.provider == provider, _l.c.customer_id.in_(chunk)
            )
            for customer_id, instance_id in conn.execute(stmt):
                out.setdefault(str(customer_id), []).append(str(instance_id))
    return {customer: sorted(ids) for customer, ids in sorted(out.items())}


def _check_provider(provider: str) -> None:
    if not isinstance(provider, str) or not provider:
        raise AppDatabaseError(f"a customer link needs a provider name, not {provider!r:.60}")


def _distinct(ids: Iterable[str]) -> list[str]:
    if isinstance(ids, (str, bytes)):
        raise TypeError("ids must be an iterable of ids, not a single string")
    return sorted({i if type(i) is str else str(i) for i in ids if i is not None and not isna(i)})
