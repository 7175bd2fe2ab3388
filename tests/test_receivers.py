"""Receivers sync at once (SPEC "Real-time nets"), and the webhook sensor stays the backstop.

A signed delivery to ``creditsync serve`` is landed, committed, answered, and then synced in
the receiving process -- no Dagster daemon involved. With the receiver's background syncs
off, or for a row whose lease ran out (a receiver that died), the webhook sensor settles
it. No row is ever synced twice for one event, and a burst never starts a thread per
request.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from dagster import build_sensor_context, instance_for_test

from creditsync_pipeline import appdb
from creditsync_pipeline.billing import BillingClient
from creditsync_pipeline.defs.jobs import instance_credit_sync_job
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.defs.sensors import billing_webhook_sensor
from creditsync_pipeline.server import create_app
from creditsync_pipeline.server.receiver import ReceiverSync
from creditsync_pipeline.server.webhooks import SIGNATURE_HEADER, sign_webhook
from creditsync_pipeline.settings import Secret, Settings
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, end_state, seeded

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from starlette.testclient import TestClient

APP_SECRET = "app-SECRET-receiver-3c1d"
WEBHOOK_SECRET = "whsec-SECRET-receiver-90ab"
WEBHOOK = "/api/billing/webhook"


@pytest.fixture
def world(db_url) -> Iterator[tuple]:
    data = seeded(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim:
        yield data, sim


def settings_for(db_url: str, sim: BillingSimulator, workers: int) -> Settings:
    return Settings(database_url=db_url, billing_api_url=sim.base_url, billing_api_token=Secret(TOKEN),
                    app_secret=Secret(APP_SECRET), webhook_secret=Secret(WEBHOOK_SECRET), receiver_workers=workers)


def deliver(client: TestClient, event_id: str, instance_id: str) -> dict:
    body = f'{{"event_id": "{event_id}", "type": "subscription.updated", "instance_id": "{instance_id}"}}'.encode()
    response = client.post(WEBHOOK, content=body, headers={SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body)})
    assert response.status_code == 200, response.text
    return response.json()


def rows(db_url: str) -> dict[str, dict]:
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            return {r.event_id: dict(r._mapping) for r in conn.execute(sa.select(appdb.billing_webhook_events))}
    finally:
        engine.dispose()


def wait_for(predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("timed out waiting for the receiver")


def test_a_delivery_is_synced_by_the_receiver_without_the_sensor(world, db_url):
    data, sim = world
    with TestClient(create_app(settings_for(db_url, sim, workers=2))) as client:
        assert deliver(client, "evt_1", "abc123")["duplicate"] is False
        wait_for(lambda: rows(db_url)["evt_1"]["processed_at"] is not None)
    row = rows(db_url)["evt_1"]
    assert row["outcome"] == "corrected" and row["attempts"] == 1 and row["claimed_by"] is None
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)
    audit = audit_rows(db_url)
    assert list(zip(audit["instance_id"], audit["trigger"])) == [("abc123", "webhook")]
    assert sim.request_count("one") == 1 and sim.request_count("list") == 0


def test_with_the_receiver_off_the_sensor_settles_the_row(world, db_url):
    data, sim = world
    with TestClient(create_app(settings_for(db_url, sim, workers=0))) as client:
        deliver(client, "evt_2", "abc123")
    row = rows(db_url)["evt_2"]
    assert row["processed_at"] is None and row["claimed_by"] is None  # landed, not held, not synced
    resources = {"app_db": AppDatabaseResource(database_url=db_url),
                 "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN)}
    with instance_for_test() as instance:
        context = build_sensor_context(instance=instance, resources=resources, sensor_name="billing_webhook_sensor")
        (request,) = billing_webhook_sensor(context).run_requests
        result = instance_credit_sync_job.execute_in_process(
            run_config=request.run_config, tags=request.tags, instance=instance, resources=resources)
    assert result.success
    assert rows(db_url)["evt_2"]["outcome"] == "corrected"
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)


def test_a_receiver_that_died_leaves_its_row_to_the_sensor_once_its_lease_runs_out(world, db_url):
    data, sim = world
    engine = appdb.create_engine_from_url(db_url)
    landed = appdb.land_webhook_event(engine, event_id="evt_3", event_type="x", instance_id="abc123", payload=None,
                                      lease_owner="receiver:gone:1:dead", lease_seconds=300.0)

    def lease_runs_out() -> None:  # what 300 s of a dead receiver would do, without waiting
        with engine.begin() as conn:
            conn.execute(sa.update(appdb.billing_webhook_events).where(appdb.billing_webhook_events.c.id == landed.id)
                         .values(claimed_until=datetime.now(timezone.utc) - timedelta(seconds=1)))

    resources = {"app_db": AppDatabaseResource(database_url=db_url),
                 "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN)}
    with instance_for_test() as instance:
        def tick(cursor):
            context = build_sensor_context(instance=instance, resources=resources, cursor=cursor,
                                           sensor_name="billing_webhook_sensor")
            return billing_webhook_sensor(context)

        first = tick(None)
        assert not first.run_requests  # the (dead) receiver still holds it
        lease_runs_out()
        later = tick(first.cursor)
        (request,) = later.run_requests
        assert request.run_config["ops"]["sync_instances"]["config"]["webhook_event_ids"] == [landed.id]
        assert instance_credit_sync_job.execute_in_process(
            run_config=request.run_config, tags=request.tags, instance=instance, resources=resources).success
    engine.dispose()
    assert rows(db_url)["evt_3"]["outcome"] == "corrected"


def test_a_burst_is_synced_by_a_bounded_pool_and_no_row_twice(world, db_url):
    data, sim = world
    paying_stuck = [i for i, (plan, _) in data.expected.items()
                    if plan != "free" and next(r for r in data.instances if r["instance_id"] == i)["plan_id"] == "free"]
    before = threading.active_count()
    peak = [before]
    with TestClient(create_app(settings_for(db_url, sim, workers=2))) as client:
        started = threading.active_count()
        for n in range(120):
            deliver(client, f"evt_b{n}", paying_stuck[n % len(paying_stuck)])
            peak[0] = max(peak[0], threading.active_count())
        deliver(client, "evt_b0", paying_stuck[0])  # a redelivery of the first event
        wait_for(lambda: all(r["processed_at"] is not None for r in rows(db_url).values()), timeout=60)
    # Bounded, whatever the burst: Starlette's thread pool (40 at most), and per background worker
    # one thread plus its look-up threads (4); never one per delivery.
    assert peak[0] <= started + 40 + 2 * 4 < 120
    landed = rows(db_url)
    assert len(landed) == 120
    assert {r["attempts"] for r in landed.values()} == {1}  # every row synced exactly once
    assert {r["outcome"] for r in landed.values()} <= {"corrected", "already_correct"}
    after = end_state(db_url)
    assert all(after[i][:2] == data.expected[i] for i in paying_stuck)
    assert len(audit_rows(db_url)) == len(set(paying_stuck))  # each instance corrected once


def test_the_pool_refuses_rows_beyond_its_bound(world, db_url):
    data, sim = world
    gate = threading.Event()
    engine = appdb.create_engine_from_url(db_url)
    billing = BillingClient(sim.base_url, TOKEN)
    real = billing.fetch_instances

    def gated(ids, **kwargs):
        gate.wait(10)
        return real(ids, **kwargs)

    billing.fetch_instances = gated  # type: ignore[method-assign]
    pool = ReceiverSync(engine, billing, workers=1, max_pending=3)
    try:
        assert [pool.reserve() for _ in range(5)] == [True, True, True, False, False]
        pool.cancel()
        assert pool.reserve() is True
    finally:
        gate.set()
        pool.close()
        billing.close()
        engine.dispose()


# -- the Wix receiver ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def wix_keys() -> tuple[str, str]:
    from creditsync_pipeline.server.wix import generate_key_pair

    return generate_key_pair()


def test_a_signed_wix_delivery_is_synced_at_once(world, db_url, wix_keys):
    """Paid Plan Purchased for abc123 (stuck at free): verified, landed, answered, corrected."""
    from creditsync_pipeline.server.wix import sign_wix_webhook
    from creditsync_pipeline.settings import WixSettings
    from creditsync_pipeline.simulators.wix import WixSimulator, demo_instances

    data, _ = world
    private_key, public_key = wix_keys
    with WixSimulator(demo_instances(data), app_id="app-1", app_secret="wix-SECRET-recv-1") as wix:
        cfg = Settings(
            database_url=db_url, billing_provider="wix", app_secret=Secret(APP_SECRET), receiver_workers=1,
            wix=WixSettings(app_id="app-1", app_secret=Secret("wix-SECRET-recv-1"), api_base=wix.base_url,
                            webhook_public_key=public_key),
        )
        body = sign_wix_webhook(private_key, event_type="PaidPlanPurchased", instance_id="abc123",
                                data={"vendorProductId": "pro", "cycle": "MONTHLY"})
        with TestClient(create_app(cfg)) as client:
            response = client.post("/api/billing/webhook/wix", content=body, headers={"Content-Type": "text/plain"})
            assert response.status_code == 200, response.text
            wait_for(lambda: next(iter(rows(db_url).values()))["processed_at"] is not None)
            forged = client.post("/api/billing/webhook/wix", content=body[:-4] + "AAAA")
            assert forged.status_code == 401
    (row,) = rows(db_url).values()
    assert (row["event_type"], row["instance_id"], row["outcome"]) == ("PaidPlanPurchased", "abc123", "corrected")
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)
    assert "wix-SECRET-recv-1" not in str(cfg) and private_key not in response.text


# -- the Stripe receiver ------------------------------------------------------------------------------


def test_a_signed_stripe_delivery_is_synced_at_once_and_its_link_remembered(world, db_url):
    from creditsync_pipeline.server.stripe import sign_stripe_payload
    from creditsync_pipeline.settings import StripeSettings
    from creditsync_pipeline.simulators.stripe import StripeSimulator

    data, _ = world
    key, secret = "sk_test_SECRET_recv_41c0", "whsec_SECRET_recv_9e7a"
    with StripeSimulator.from_records(data.records, api_key=key, metadata_on="subscription") as stripe:
        (sub_id,) = [s.id for s in stripe.subscriptions().values() if s.metadata.get("instance_id") == "abc123"]
        cfg = Settings(
            database_url=db_url, billing_provider="stripe", app_secret=Secret(APP_SECRET), receiver_workers=1,
            stripe=StripeSettings(api_key=Secret(key), api_base=stripe.base_url, webhook_secret=Secret(secret)),
        )
        body = stripe.event(sub_id, "customer.subscription.updated")
        with TestClient(create_app(cfg)) as client:
            response = client.post("/api/billing/webhook/stripe", content=body,
                                   headers={"Stripe-Signature": sign_stripe_payload(secret, body)})
            assert response.status_code == 200, response.text
            wait_for(lambda: next(iter(rows(db_url).values()))["processed_at"] is not None)
            stale = client.post("/api/billing/webhook/stripe", content=body,
                                headers={"Stripe-Signature": sign_stripe_payload(secret, body, int(time.time()) - 900)})
            assert stale.status_code == 401
            assert key not in response.text + stale.text and secret not in response.text + stale.text
    (row,) = rows(db_url).values()
    assert (row["instance_id"], row["outcome"]) == ("abc123", "corrected")
    assert end_state(db_url)["abc123"][:2] == ("pro", 5000)
    engine = appdb.create_engine_from_url(db_url)
    try:
        assert set(appdb.customer_links_for(engine, "stripe", ["abc123"])) == {"abc123"}
    finally:
        engine.dispose()
