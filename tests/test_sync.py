"""The sync service's own orchestration: a full run reads the app database while it fetches."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb, sync
from creditsync_pipeline.billing import BillingClient, BillingUnavailableError
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded


@pytest.fixture
def sim() -> Any:
    with BillingSimulator(token=TOKEN) as s:
        yield s


def _demo_world(db_url: str, sim: BillingSimulator):
    data = seeded(db_url)
    sim.set_records(data.records)
    return data


def test_a_full_run_reads_the_app_database_while_billing_is_fetched(db_url: str, sim, monkeypatch) -> None:
    """The fetch only finishes once the read has started: a serial run would fail here."""
    data = _demo_world(db_url, sim)
    read_started = threading.Event()
    real_read, real_fetch = sync.read_state, sync.fetch_billing

    def read(engine: Engine, instance_ids: Any = None, **kwargs: Any) -> sync.AppState:
        read_started.set()
        return real_read(engine, instance_ids, **kwargs)

    def fetch(billing: BillingClient, engine: Engine, **kwargs: Any):
        snapshot = real_fetch(billing, engine, **kwargs)
        assert read_started.wait(10), "the read did not start while billing was being fetched"
        return snapshot

    monkeypatch.setattr(sync.runs, "read_state", read)
    monkeypatch.setattr(sync.runs, "fetch_billing", fetch)
    engine = appdb.create_engine_from_url(db_url)
    try:
        with BillingClient(sim.base_url, TOKEN) as billing:
            report = sync.run_full_sync(engine, billing, trigger="manual")
    finally:
        engine.dispose()
    assert report.applied_count > 0 and report.applied_count == len(audit_rows(db_url))
    after = end_state(db_url)
    assert {i: after[i][:2] for i in data.expected} == data.expected
    timings = report.timings
    assert set(timings) == {"fetch", "read", "diff", "write", "verify", "total"}
    assert timings["total"] >= timings["fetch"] + timings["read"] + timings["diff"]


def test_a_failed_fetch_with_a_read_in_flight_writes_nothing(db_url: str, sim) -> None:
    _demo_world(db_url, sim)
    sim.add_fault("error", endpoint="list", after=1, count=None)
    before = dump_tables(db_url)
    engine = appdb.create_engine_from_url(db_url)
    try:
        with BillingClient(sim.base_url, TOKEN, page_size=50, max_attempts=2, backoff_initial=0, backoff_max=0) as billing:
            with pytest.raises(BillingUnavailableError):
                sync.run_full_sync(engine, billing, trigger="manual")
    finally:
        engine.dispose()
    assert dump_tables(db_url) == before
    assert not [t for t in threading.enumerate() if t.name.startswith("creditsync-read")]


def test_a_failed_read_fails_the_run_after_the_fetch(db_url: str, sim, caplog) -> None:
    _demo_world(db_url, sim)
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.text("DROP TABLE credit_sync_audit"))
            conn.execute(sa.text("ALTER TABLE instances RENAME TO instances_gone"))
        caplog.set_level("ERROR", logger="creditsync")
        with BillingClient(sim.base_url, TOKEN) as billing:
            with pytest.raises(appdb.AppDatabaseError, match="reading instances"):
                sync.run_full_sync(engine, billing, trigger="manual")
    finally:
        engine.dispose()
    assert "[CreditSync] Error running credit sync task: " in caplog.text


@pytest.mark.parametrize(
    ("url", "shared"),
    [
        ("sqlite://", False),
        ("sqlite:///:memory:", False),
        ("sqlite:///file:mem1?mode=memory&cache=shared&uri=true", False),
        ("sqlite:////tmp/creditsync-app.db", True),
        ("postgresql+psycopg2://u@127.0.0.1/db", True),
    ],
)
def test_which_engines_may_read_on_another_connection(url: str, shared: bool) -> None:
    engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
    try:
        assert appdb.shares_data_across_connections(engine) is shared
    finally:
        engine.dispose()
