"""``billing_webhook_events`` rows: landing, leases, claims, marks (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    LandedEvent,
    billing_webhook_events,
    claim_webhook_events,
    land_webhook_event,
    mark_webhook_events,
    unprocessed_webhook_events,
    webhook_events_by_id,
)

T = datetime(2024, 6, 1, 12, 0, 0, tzinfo=timezone.utc)
E = billing_webhook_events


def _land(engine: Engine, event_id: str, **lease: Any) -> LandedEvent:
    return land_webhook_event(engine, event_id=event_id, event_type="subscription.updated",
                              instance_id=f"site-{event_id}", payload=None, **lease)


def _row(engine: Engine, row_id: int) -> dict[str, Any]:
    with engine.connect() as conn:
        return dict(conn.execute(sa.select(E).where(E.c.id == row_id)).one()._mapping)


def _lease_of(engine: Engine, row_id: int) -> tuple[str | None, datetime | None, int]:
    row = _row(engine, row_id)
    return row["claimed_by"], row["claimed_until"], row["attempts"]


# ------------------------------------------------------------------------ landing


def test_land_webhook_event_is_idempotent_on_event_id(engine: Engine) -> None:
    first = land_webhook_event(engine, event_id="evt_1", event_type="subscription.updated",
                               instance_id="a/b", payload='{"x": 1}')
    again = land_webhook_event(engine, event_id="evt_1", event_type="other", instance_id="zzz", payload=None)
    second = land_webhook_event(engine, event_id="evt_2", event_type="subscription.updated",
                                instance_id=None, payload=None)
    assert (first.inserted, first.leased) == (True, False)
    assert again == LandedEvent(id=first.id, inserted=False, leased=False)  # the existing row's id
    assert second.inserted and second.id != first.id
    with engine.connect() as conn:
        rows = conn.execute(
            sa.select(E.c.id, E.c.event_id, E.c.instance_id, E.c.event_type, E.c.processed_at,
                      E.c.claimed_by, E.c.claimed_until)
            .order_by(E.c.id)
        ).all()
    assert [tuple(r) for r in rows] == [
        (first.id, "evt_1", "a/b", "subscription.updated", None, None, None),
        (second.id, "evt_2", None, "subscription.updated", None, None, None),
    ]


def test_land_with_a_lease_takes_a_free_row_and_respects_a_live_one(engine: Engine) -> None:
    landed = _land(engine, "e1", lease_owner="recv-A", lease_seconds=30, now=T)
    assert landed.inserted and landed.leased
    assert _lease_of(engine, landed.id) == ("recv-A", T + timedelta(seconds=30), 0)  # landing counts no attempt

    # A redelivery to another receiver while A's lease is live: nothing changes.
    other = _land(engine, "e1", lease_owner="recv-B", lease_seconds=30, now=T + timedelta(seconds=10))
    assert other == LandedEvent(id=landed.id, inserted=False, leased=False)
    assert _lease_of(engine, landed.id) == ("recv-A", T + timedelta(seconds=30), 0)

    # The holder itself may renew; once the lease ran out anyone may take it.
    mine = _land(engine, "e1", lease_owner="recv-A", lease_seconds=30, now=T + timedelta(seconds=10))
    assert mine == LandedEvent(id=landed.id, inserted=False, leased=True)
    assert _lease_of(engine, landed.id)[:2] == ("recv-A", T + timedelta(seconds=40))
    expired = _land(engine, "e1", lease_owner="recv-B", lease_seconds=5, now=T + timedelta(seconds=40))
    assert expired.leased and _lease_of(engine, landed.id)[:2] == ("recv-B", T + timedelta(seconds=45))

    # A processed row is never leased again.
    assert mark_webhook_events(engine, {landed.id: "corrected"}, now=T) == 1
    late = _land(engine, "e1", lease_owner="recv-C", lease_seconds=30, now=T + timedelta(hours=1))
    assert late == LandedEvent(id=landed.id, inserted=False, leased=False)
    assert _lease_of(engine, landed.id) == (None, None, 0)


def test_a_lease_without_now_runs_on_the_database_clock(engine: Engine) -> None:
    landed = _land(engine, "e1", lease_owner="recv", lease_seconds=600)
    claimed_until = _lease_of(engine, landed.id)[1]
    assert claimed_until is not None
    remaining = claimed_until - appdb.database_now(engine)
    assert timedelta(minutes=5) < remaining <= timedelta(minutes=10)
    # Live now, so the sensor's view (with `now`) leaves it out.
    assert unprocessed_webhook_events(engine, now=appdb.database_now(engine)) == []


@pytest.mark.parametrize(
    "lease", [{"lease_owner": "x"}, {"lease_seconds": 5}, {"lease_owner": "", "lease_seconds": 5},
              {"lease_owner": "x", "lease_seconds": 0}, {"lease_owner": "x", "lease_seconds": float("nan")}],
)
def test_a_half_lease_request_is_refused_before_writing(engine: Engine, lease: dict) -> None:
    with pytest.raises(ValueError):
        _land(engine, "e1", **lease)
    assert webhook_events_by_id(engine, [1]) == []


@pytest.mark.parametrize(("owner", "seconds"), [("", 5), (None, 5), ("x", 0), ("x", -1), ("x", float("inf"))])
def test_a_claim_needs_an_owner_and_a_positive_lease(engine: Engine, owner: Any, seconds: float) -> None:
    row_id = _land(engine, "e1").id
    with pytest.raises(ValueError):
        claim_webhook_events(engine, [row_id], owner=owner, lease_seconds=seconds)
    assert _lease_of(engine, row_id) == (None, None, 0)


# ----------------------------------------------------------------------- claiming


def test_claim_takes_free_own_and_expired_rows_only(engine: Engine) -> None:
    ids = {name: _land(engine, name).id for name in ("free", "mine", "theirs", "expired", "done")}
    _land(engine, "mine", lease_owner="run-1", lease_seconds=60, now=T)
    _land(engine, "theirs", lease_owner="recv", lease_seconds=60, now=T)
    _land(engine, "expired", lease_owner="recv", lease_seconds=60, now=T - timedelta(minutes=5))
    mark_webhook_events(engine, {ids["done"]: "corrected"}, now=T)
    absent = max(ids.values()) + 100

    claimed = claim_webhook_events(engine, [*ids.values(), absent, ids["free"]], owner="run-1",
                                   lease_seconds=120, now=T + timedelta(seconds=1))

    until = T + timedelta(seconds=121)
    assert [row.event_id for row in claimed] == ["free", "mine", "expired"]
    assert all((row.claimed_by, row.claimed_until, row.attempts) == ("run-1", until, 1) for row in claimed)
    assert _lease_of(engine, ids["theirs"]) == ("recv", T + timedelta(seconds=60), 0)
    assert _lease_of(engine, ids["done"]) == (None, None, 0)

    # The same owner again: its own live leases are renewed and counted once more.
    again = claim_webhook_events(engine, [ids["free"]], owner="run-1", lease_seconds=120, now=T + timedelta(seconds=2))
    assert [(row.id, row.attempts) for row in again] == [(ids["free"], 2)]
    # Another owner while they are live: nothing.
    assert claim_webhook_events(engine, list(ids.values()), owner="run-2", lease_seconds=120,
                                now=T + timedelta(seconds=3)) == []
    # Once run-1's leases ran out, run-2 gets them (and recv's, long expired).
    late = claim_webhook_events(engine, list(ids.values()), owner="run-2", lease_seconds=120,
                                now=T + timedelta(minutes=10))
    assert [row.event_id for row in late] == ["free", "mine", "theirs", "expired"]


def test_concurrent_claims_never_share_a_row(engine: Engine) -> None:
    ids = [_land(engine, f"e{n:03d}").id for n in range(60)]
    results: dict[str, list[int]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def claim(owner: str) -> None:
        try:
            start.wait()
            results[owner] = [row.id for row in claim_webhook_events(engine, ids, owner=owner,
                                                                      lease_seconds=60, now=T)]
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"run-{n}",)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors, errors
    taken = [row_id for owner_rows in results.values() for row_id in owner_rows]
    assert sorted(taken) == sorted(ids)  # every row claimed exactly once
    for owner, owner_rows in results.items():
        assert all(_lease_of(engine, row_id)[0] == owner and _lease_of(engine, row_id)[2] == 1
                   for row_id in owner_rows[:3])


# ------------------------------------------------------------------------ marking


def test_mark_releases_the_lease_and_may_refund_the_attempt(engine: Engine) -> None:
    row_id = _land(engine, "e1").id
    claim_webhook_events(engine, [row_id], owner="run-1", lease_seconds=60, now=T)
    claim_webhook_events(engine, [row_id], owner="run-1", lease_seconds=60, now=T)
    assert _lease_of(engine, row_id)[2] == 2

    # Billing was down: the attempt is given back and the row released at once.
    assert mark_webhook_events(engine, {row_id: "error"}, processed=False, refund_attempt=True) == 1
    assert _lease_of(engine, row_id) == (None, None, 1)
    assert _row(engine, row_id)["outcome"] == "error" and _row(engine, row_id)["processed_at"] is None
    assert [r.id for r in unprocessed_webhook_events(engine, now=T)] == [row_id]

    # Never below zero.
    for _ in range(3):
        mark_webhook_events(engine, {row_id: "error"}, processed=False, refund_attempt=True)
    assert _lease_of(engine, row_id) == (None, None, 0)

    # A plain failed attempt keeps the count; processing releases too.
    claim_webhook_events(engine, [row_id], owner="run-2", lease_seconds=60, now=T)
    mark_webhook_events(engine, {row_id: "error"}, processed=False)
    assert _lease_of(engine, row_id) == (None, None, 1)
    claim_webhook_events(engine, [row_id], owner="run-3", lease_seconds=60, now=T)
    assert mark_webhook_events(engine, {row_id: "corrected"}, now=T) == 1
    row = _row(engine, row_id)
    assert (row["claimed_by"], row["claimed_until"], row["attempts"], row["processed_at"]) == (None, None, 2, T)
    # A processed row is not marked again (nor refunded).
    assert mark_webhook_events(engine, {row_id: "other"}, refund_attempt=True) == 0
    assert _row(engine, row_id)["attempts"] == 2


# ------------------------------------------------------------------------ reading


def test_unprocessed_rows_leave_out_live_leases_only_when_asked(engine: Engine) -> None:
    free = _land(engine, "free").id
    live = _land(engine, "live", lease_owner="recv", lease_seconds=60, now=T).id
    lapsed = _land(engine, "lapsed", lease_owner="recv", lease_seconds=60, now=T - timedelta(minutes=2)).id
    edge = _land(engine, "edge", lease_owner="recv", lease_seconds=60, now=T - timedelta(seconds=60)).id

    assert [r.id for r in unprocessed_webhook_events(engine)] == [free, live, lapsed, edge]
    seen = unprocessed_webhook_events(engine, now=T)
    assert [r.id for r in seen] == [free, lapsed, edge]  # a lease ending exactly now is over
    by_id = {r.id: r for r in webhook_events_by_id(engine, [live, free])}
    assert (by_id[live].claimed_by, by_id[live].claimed_until) == ("recv", T + timedelta(seconds=60))
    assert (by_id[free].claimed_by, by_id[free].claimed_until) == (None, None)
    # Combined with the other filters.
    assert [r.id for r in unprocessed_webhook_events(engine, after_id=free, now=T, limit=1)] == [lapsed]
