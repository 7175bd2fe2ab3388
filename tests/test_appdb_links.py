"""``billing_customer_links``: remembered instance -> customer links (SQLite, PostgreSQL and MySQL)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    AppDatabaseError,
    billing_customer_links,
    customer_links_for,
    instances_for_customers,
    remember_customer_links,
)

from .appdb_support import ODD_IDS, dump_db

T = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
L = billing_customer_links


def _rows(engine: Engine) -> dict[tuple[str, str], tuple[str, datetime]]:
    with engine.connect() as conn:
        return {(r.provider, r.instance_id): (r.customer_id, r.updated_at) for r in conn.execute(sa.select(L))}


def test_remember_inserts_updates_and_keeps_unchanged_links(engine: Engine) -> None:
    assert remember_customer_links(engine, "stripe", {"site-1": "cus_A", "site-2": "cus_A", "site-3": "cus_B"}, now=T) == 3
    later = T + timedelta(hours=1)
    # site-1 unchanged (left alone, not counted), site-3 moved to another customer, site-4 new.
    assert remember_customer_links(engine, "stripe", {"site-1": "cus_A", "site-3": "cus_C", "site-4": "cus_C"}, now=later) == 2
    # Another provider's links are separate, even for the same instance.
    assert remember_customer_links(engine, "other", {"site-1": "acct_9"}, now=later) == 1
    assert _rows(engine) == {
        ("stripe", "site-1"): ("cus_A", T),
        ("stripe", "site-2"): ("cus_A", T),
        ("stripe", "site-3"): ("cus_C", later),
        ("stripe", "site-4"): ("cus_C", later),
        ("other", "site-1"): ("acct_9", later),
    }
    assert customer_links_for(engine, "stripe", ["site-1", "site-3", "unknown"]) == {"site-1": "cus_A", "site-3": "cus_C"}
    assert customer_links_for(engine, "other", ["site-1", "site-2"]) == {"site-1": "acct_9"}
    assert instances_for_customers(engine, "stripe", ["cus_C", "cus_A", "cus_B", "cus_none"]) == {
        "cus_A": ["site-1", "site-2"],
        "cus_C": ["site-3", "site-4"],
    }
    assert instances_for_customers(engine, "other", ["cus_A"]) == {}
    assert customer_links_for(engine, "stripe", []) == {} and instances_for_customers(engine, "stripe", []) == {}


def test_remember_without_now_stamps_the_database_clock(engine: Engine) -> None:
    remember_customer_links(engine, "stripe", {"site-1": "cus_A"})
    [(customer, stamp)] = _rows(engine).values()
    assert customer == "cus_A"
    assert abs(stamp - appdb.database_now(engine)) < timedelta(minutes=5)


def test_odd_ids_and_many_links_in_one_bulk_call(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(appdb.limits, "READ_CHUNK_SIZE", 7)  # the reads go in many chunks
    links = {iid: f"cus\t{n}\\N'" for n, iid in enumerate(ODD_IDS)}
    links.update({f"bulk-{n:05d}": f"cus_{n % 1000:04d}" for n in range(20_000)})
    assert remember_customer_links(engine, "stripe", links, now=T) == len(links)
    assert customer_links_for(engine, "stripe", list(links)) == links
    by_customer = instances_for_customers(engine, "stripe", ["cus_0007", "cus\t3\\N'"])
    assert by_customer["cus_0007"] == sorted(f"bulk-{n:05d}" for n in range(7, 20_000, 1000))
    assert by_customer["cus\t3\\N'"] == [ODD_IDS[3]]
    # The same call again changes nothing.
    assert remember_customer_links(engine, "stripe", links, now=T + timedelta(days=1)) == 0
    assert {stamp for _, stamp in _rows(engine).values()} == {T}


@pytest.mark.parametrize(
    ("provider", "links"),
    [("", {"a": "cus"}), (None, {"a": "cus"}), ("stripe", {"a": ""}), ("stripe", {"a": None}),
     ("stripe", {"good": "cus", 7: "cus"})],
)
def test_a_bad_link_is_refused_and_writes_nothing(engine: Engine, provider: object, links: dict) -> None:
    remember_customer_links(engine, "stripe", {"keep": "cus_K"}, now=T)
    before = dump_db(engine)
    with pytest.raises(AppDatabaseError):
        remember_customer_links(engine, provider, links, now=T)  # type: ignore[arg-type]
    assert dump_db(engine) == before


def test_no_links_touch_nothing() -> None:
    dead = appdb.create_engine_from_url("postgresql+psycopg2://nobody:pw@127.0.0.1:1/none")
    try:
        assert remember_customer_links(dead, "stripe", {}) == 0
    finally:
        dead.dispose()


def test_a_fault_mid_upsert_writes_nothing(engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    remember_customer_links(engine, "stripe", {"keep": "cus_K"}, now=T)
    before = dump_db(engine)
    from creditsync_pipeline.appdb import scratch

    real_drop, calls = scratch.drop, []

    def broken_drop(conn, *tables):  # the second drop: after the upsert ran, before the commit
        calls.append(tables)
        if len(calls) == 2:
            assert conn.execute(sa.select(sa.func.count()).select_from(L)).scalar_one() == 2
            raise RuntimeError("disk on fire\nline two")
        real_drop(conn, *tables)

    monkeypatch.setattr(scratch, "drop", broken_drop)
    with pytest.raises(AppDatabaseError) as caught:
        remember_customer_links(engine, "stripe", {"keep": "cus_X", "new": "cus_N"}, now=T)
    assert len(calls) == 2
    assert "\n" not in str(caught.value) and "disk on fire" in str(caught.value)
    assert dump_db(engine) == before


def test_concurrent_writers_of_overlapping_links_all_succeed(engine) -> None:
    """A full sync and the receivers may remember the same new links at once: no deadlock escapes."""
    import threading

    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def writer(n: int) -> None:
        links = {f"inst-{i:04d}": f"cus_{n}_{i}" for i in range(0, 400, 1 + n % 2)}
        start.wait()
        try:
            for _ in range(3):
                appdb.remember_customer_links(engine, "stripe", links)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert len(appdb.customer_links_for(engine, "stripe", [f"inst-{i:04d}" for i in range(400)])) == 400
