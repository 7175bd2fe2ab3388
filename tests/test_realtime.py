"""The real-time nets in-process: sensors evaluated against a real database and a
real (temporary, persistent) Dagster instance, the runs they request executed
for real over HTTP against the billing simulator.

Runs on SQLite and PostgreSQL (``db_url``).
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import sqlalchemy as sa
import yaml
from dagster import (
    DagsterEventType,
    DefaultSensorStatus,
    SensorResult,
    build_run_status_sensor_context,
    build_sensor_context,
    instance_for_test,
)

from creditsync_pipeline import appdb, realtime, sync
from creditsync_pipeline.billing import BillingClient
from creditsync_pipeline.defs import sensors as sensors_mod
from creditsync_pipeline.defs.jobs import instance_credit_sync_job
from creditsync_pipeline.defs.resources import AlertWebhookResource, AppDatabaseResource, BillingResource
from creditsync_pipeline.defs.sensors import (
    BATCH_TAG,
    LOST_RUN_SECONDS,
    billing_webhook_sensor,
    credit_sync_failure_alert,
    new_instance_sensor,
)
from creditsync_pipeline.demo import demo_dataset
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, end_state

NOW = datetime.now(timezone.utc)
OLD = NOW - timedelta(days=2)
REPO = Path(__file__).resolve().parents[1]


def iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%SZ")


def record(instance_id: str, plan: str, status: str = "active", updated: datetime | None = None) -> dict:
    return {"instance_id": instance_id, "plan_id": plan, "status": status,
            "current_period_end": iso(NOW + timedelta(days=20)), "updated_at": iso(updated or NOW - timedelta(hours=1))}


def seed_old(db_url: str):
    """The demo data set, every instance created two days ago (not "new")."""
    data = demo_dataset(NOW)
    engine = appdb.create_engine_from_url(db_url)
    try:
        appdb.init_db(engine)
        appdb.upsert_plans(engine, data.plans)
        appdb.insert_instances(engine, [{**row, "created_at": OLD, "updated_at": OLD} for row in data.instances])
    finally:
        engine.dispose()
    return data


class World:
    def __init__(self, db_url: str, data, sim: BillingSimulator, instance) -> None:
        self.db_url, self.data, self.sim, self.instance = db_url, data, sim, instance
        self.engine = appdb.create_engine_from_url(db_url)
        self.resources = {
            "app_db": AppDatabaseResource(database_url=db_url),
            "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN, max_attempts="2", timeout="5"),
            "alert_webhook": AlertWebhookResource(url_env="CREDITSYNC_TEST_ALERT_URL"),
        }
        self.cursors: dict[str, str | None] = {}

    def tick(self, sensor_def, now: float | None = None) -> SensorResult:
        """Evaluate a sensor once, carrying its cursor like the daemon does."""
        context = build_sensor_context(
            instance=self.instance, cursor=self.cursors.get(sensor_def.name), resources=self.resources,
            sensor_name=sensor_def.name,
        )
        if now is None:
            result = sensor_def(context)
        else:  # evaluate "later" (backoff, lost runs) without sleeping
            fn = {"billing_webhook_sensor": sensors_mod.evaluate_webhook_sensor,
                  "new_instance_sensor": sensors_mod.evaluate_new_instance_sensor}[sensor_def.name]
            result = fn(context, self.engine, now=now)
        assert isinstance(result, SensorResult)
        self.cursors[sensor_def.name] = result.cursor
        return result

    def launch(self, result: SensorResult):
        """Execute every requested run, as the daemon would (same config and tags)."""
        out = []
        for request in result.run_requests or []:
            out.append(
                instance_credit_sync_job.execute_in_process(
                    run_config=request.run_config, tags=request.tags, instance=self.instance,
                    resources=self.resources, raise_on_error=False,
                )
            )
        return out

    def land(self, event_id: str, instance_id: str | None, payload: str | None = None, event_type="subscription.updated") -> int:
        assert appdb.land_webhook_event(self.engine, event_id=event_id, event_type=event_type,
                                        instance_id=instance_id, payload=payload).inserted
        return self.row(event_id)["id"]

    def rows(self) -> dict[str, dict]:
        t = appdb.billing_webhook_events
        with self.engine.connect() as conn:
            return {r.event_id: dict(r._mapping) for r in conn.execute(sa.select(t).order_by(t.c.id))}

    def row(self, event_id: str) -> dict:
        return self.rows()[event_id]

    def state(self, instance_id: str) -> tuple[str, int]:
        return end_state(self.db_url)[instance_id][:2]


@pytest.fixture
def world(db_url):
    data = seed_old(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim, instance_for_test() as instance:
        w = World(db_url, data, sim, instance)
        try:
            yield w
        finally:
            w.engine.dispose()


def config_of(request) -> dict:
    return request.run_config["ops"]["sync_instances"]["config"]


def all_event_text(instance, run_id: str) -> str:
    return json.dumps([r.to_dict() if hasattr(r, "to_dict") else str(r) for r in instance.all_logs(run_id)], default=str)


# ----------------------------------------------------------------------------- definitions


def test_definitions_wire_the_realtime_nets():
    from creditsync_pipeline.definitions import defs

    job = defs.resolve_job_def("instance_credit_sync_job")
    assert job.tags["creditsync/sync"] == "targeted"
    for name in ("billing_webhook_sensor", "new_instance_sensor", "credit_sync_failure_alert"):
        sensor_def = defs.resolve_sensor_def(name)
        assert sensor_def.default_status == DefaultSensorStatus.RUNNING, name
        assert (sensor_def.minimum_interval_seconds or 0) <= 5, name
    assert defs.resolve_sensor_def("billing_webhook_sensor").job_name == "instance_credit_sync_job"
    assert defs.resolve_sensor_def("new_instance_sensor").job_name == "instance_credit_sync_job"

    config = yaml.safe_load((REPO / "dagster.yaml").read_text())
    limits = config["concurrency"]["runs"]["tag_concurrency_limits"]
    assert {"key": "creditsync/sync", "value": "full", "limit": 1} in limits
    assert any(l["key"] == "creditsync/sync" and l["value"] == "targeted" for l in limits)
    assert config["run_queue"]["dequeue_interval_seconds"] <= 2


def test_manual_targeted_job_fixes_audits_and_leaks_no_token(world):
    result = instance_credit_sync_job.execute_in_process(
        run_config={"ops": {"sync_instances": {"config": {"instance_ids": ["abc123", "site-0002"]}}}},
        instance=world.instance, resources=world.resources,
    )
    assert result.success
    assert world.state("abc123") == ("pro", 5000)
    audit = audit_rows(world.db_url)
    assert set(audit["trigger"]) == {"manual"} and set(audit["run_id"]) == {result.run_id}
    assert "abc123" in set(audit["instance_id"])
    text = all_event_text(world.instance, result.run_id)
    assert "Synced credits for instance abc123: 100 \\u2192 5000" in text or "Synced credits for instance abc123: 100 → 5000" in text
    assert TOKEN not in text
    # the targeted job fetched one instance at a time, never the list
    assert world.sim.request_count("list") == 0


# -------------------------------------------------------------------------- webhook sensor


def test_webhook_row_is_synced_once_and_marked_after_commit(world):
    row_id = world.land("evt_1", "abc123", '{"type": "subscription.updated"}')
    first = world.tick(billing_webhook_sensor)
    assert len(first.run_requests) == 1
    request = first.run_requests[0]
    assert config_of(request) == {"instance_ids": ["abc123"], "trigger": "webhook", "webhook_event_ids": [row_id]}
    assert request.tags["creditsync/trigger"] == "webhook" and request.tags["creditsync/sync"] == "targeted"
    assert request.run_key and request.tags[BATCH_TAG] == request.run_key
    assert world.row("evt_1")["processed_at"] is None  # nothing committed yet

    # the run has not run yet: the next ticks must not ask again
    for _ in range(2):
        again = world.tick(billing_webhook_sensor)
        assert not again.run_requests

    (run,) = world.launch(first)
    assert run.success
    row = world.row("evt_1")
    assert row["processed_at"] is not None and row["outcome"] == "corrected" and row["attempts"] == 1
    assert world.state("abc123") == ("pro", 5000)
    audit = audit_rows(world.db_url)
    assert list(audit["instance_id"]) == ["abc123"] and list(audit["trigger"]) == ["webhook"]
    assert list(audit["run_id"]) == [run.run_id]
    assert TOKEN not in all_event_text(world.instance, run.run_id)

    settled = world.tick(billing_webhook_sensor)
    assert not settled.run_requests
    assert json.loads(settled.cursor)["inflight"] == {}

    # a second event for the same instance: synced again, already correct, no audit row
    world.land("evt_2", "abc123")
    (run2,) = world.launch(world.tick(billing_webhook_sensor))
    assert run2.success and world.row("evt_2")["outcome"] == "already_correct"
    assert len(audit_rows(world.db_url)) == 1


def test_webhook_payload_is_a_poke_never_the_truth(world):
    # the payload claims "team"; billing says pro: pro wins
    world.land("evt_lie", "abc123", json.dumps({"instance_id": "abc123", "plan_id": "team", "credits": 20000}))
    world.launch(world.tick(billing_webhook_sensor))
    assert world.state("abc123") == ("pro", 5000)


def test_junk_rows_get_an_outcome_and_never_block_the_rows_behind(world):
    ids = {
        "bad-json": world.land("evt_a", None, "{not json"),
        "no-id": world.land("evt_b", None, json.dumps({"type": "invoice.paid"})),
        "control": world.land("evt_c", "bad\x01id", None),
        "from-payload": world.land("evt_d", None, json.dumps({"data": {"object": {"instance_id": "site-0002"}}})),
        "unknown": world.land("evt_e", "ghost-site-1", None),
        "good": world.land("evt_f", "abc123", None),
    }
    result = world.tick(billing_webhook_sensor)
    rows = world.rows()
    # unreadable rows are settled in the tick itself, without a run
    for event_id in ("evt_a", "evt_b", "evt_c"):
        assert rows[event_id]["outcome"] == "unreadable" and rows[event_id]["processed_at"] is not None
        assert rows[event_id]["attempts"] == 0
    (request,) = result.run_requests
    assert config_of(request)["webhook_event_ids"] == [ids["from-payload"], ids["unknown"], ids["good"]]
    assert config_of(request)["instance_ids"] == ["site-0002", "ghost-site-1", "abc123"]

    (run,) = world.launch(result)
    assert run.success
    rows = world.rows()
    assert rows["evt_e"]["outcome"] == "unknown_instance" and rows["evt_e"]["processed_at"] is not None
    assert rows["evt_f"]["outcome"] == "corrected"
    assert rows["evt_d"]["outcome"] in {"corrected", "already_correct"}
    assert all(r["processed_at"] is not None for r in rows.values())
    assert world.state("abc123") == ("pro", 5000)


def test_duplicate_event_ids_on_an_app_table_without_the_unique_constraint(db_url):
    """An app's own handler table may lack UNIQUE(event_id): repeats are marked, not synced."""
    engine = appdb.create_engine_from_url(db_url)
    ident = "INTEGER PRIMARY KEY AUTOINCREMENT" if engine.dialect.name == "sqlite" else "BIGSERIAL PRIMARY KEY"
    with engine.begin() as conn:
        conn.exec_driver_sql(
            f"CREATE TABLE billing_webhook_events (id {ident}, event_id TEXT NOT NULL, instance_id TEXT, "
            "event_type TEXT NOT NULL, payload TEXT, received_at TIMESTAMP NOT NULL DEFAULT CURRENT_TIMESTAMP, "
            "processed_at TIMESTAMP, outcome TEXT, attempts INTEGER NOT NULL DEFAULT 0)"
        )
    engine.dispose()
    data = seed_old(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim, instance_for_test() as instance:
        w = World(db_url, data, sim, instance)
        t = appdb.billing_webhook_events
        with w.engine.begin() as conn:
            for event_id in ("evt_1", "evt_1", "evt_2", "evt_1"):
                conn.execute(sa.insert(t).values(event_id=event_id, event_type="x", instance_id="abc123"))
        result = w.tick(billing_webhook_sensor)
        with w.engine.connect() as conn:
            rows = conn.execute(sa.select(t.c.id, t.c.event_id, t.c.outcome).order_by(t.c.id)).all()
        assert [r.outcome for r in rows] == [None, "duplicate_event", None, "duplicate_event"]
        (request,) = result.run_requests
        assert config_of(request)["webhook_event_ids"] == [rows[0].id, rows[2].id]
        w.launch(result)
        w.engine.dispose()


def test_failed_rows_are_retried_with_backoff_and_given_up(world, monkeypatch):
    monkeypatch.setattr(realtime, "MAX_ATTEMPTS", 3)
    world.sim.upsert({"plan_id": "pro", "status": "active"}, key="poison-1")  # a record without instance_id
    appdb.insert_instances(world.engine, [{"instance_id": "poison-1", "plan_id": "free", "credits_total": 100,
                                           "created_at": OLD, "updated_at": OLD}])
    world.land("evt_poison", "poison-1")
    world.land("evt_good", "abc123")

    t0 = 1_000_000_000.0 + 10**6  # a fixed clock for the sensor
    first = world.tick(billing_webhook_sensor, now=t0)
    (request,) = first.run_requests
    (run,) = world.launch(first)
    assert not run.success  # the poisoned record fails the run (and alerts) ...
    rows = world.rows()
    # ... but the good row behind it in the same batch is settled
    assert rows["evt_good"]["outcome"] == "corrected" and rows["evt_good"]["processed_at"] is not None
    assert rows["evt_poison"]["processed_at"] is None and rows["evt_poison"]["outcome"] == "error"
    assert rows["evt_poison"]["attempts"] == 1
    assert world.state("abc123") == ("pro", 5000)

    # settled: the failed row waits for its backoff, new rows are not blocked meanwhile
    world.land("evt_later", "site-0002")
    waiting = world.tick(billing_webhook_sensor, now=t0 + 1)
    (later,) = waiting.run_requests
    assert config_of(later)["webhook_event_ids"] == [world.row("evt_later")["id"]]
    world.launch(waiting)
    assert not world.tick(billing_webhook_sensor, now=t0 + 2).run_requests

    keys = {request.run_key, later.run_key}
    for attempt in (2, 3):
        if attempt > 2:  # the sensor notices the failed run, then backs off before retrying
            assert not world.tick(billing_webhook_sensor, now=t0 + 10_000 * attempt - 5_000).run_requests
        retry = world.tick(billing_webhook_sensor, now=t0 + 10_000 * attempt)
        (again,) = retry.run_requests
        assert again.run_key not in keys
        keys.add(again.run_key)
        assert config_of(again)["webhook_event_ids"] == [world.row("evt_poison")["id"]]
        (run,) = world.launch(retry)
        assert not run.success
        assert world.row("evt_poison")["attempts"] == attempt

    row = world.row("evt_poison")
    assert row["outcome"] == "failed" and row["processed_at"] is None  # never synced: stays unprocessed
    for later_now in (t0 + 10**6, t0 + 10**7):
        assert not world.tick(billing_webhook_sensor, now=later_now).run_requests  # no hot loop


def test_a_row_that_fails_then_succeeds_is_processed(world):
    world.sim.add_fault("error", endpoint="one", count=None)
    world.land("evt_1", "abc123")
    t0 = 2_000_000_000.0
    (run,) = world.launch(world.tick(billing_webhook_sensor, now=t0))
    assert not run.success
    # billing answered 500 every time: an outage, not this row's fault -- it waits, its attempt given back
    first = world.row("evt_1")
    assert first["outcome"] == "waiting" and first["attempts"] == 0 and world.state("abc123") == ("free", 100)
    world.sim.clear_faults()
    assert not world.tick(billing_webhook_sensor, now=t0 + 1).run_requests  # backing off
    retry = world.tick(billing_webhook_sensor, now=t0 + 60)
    (run,) = world.launch(retry)
    assert run.success
    row = world.row("evt_1")
    assert row["outcome"] == "corrected" and row["processed_at"] is not None and row["attempts"] == 1


def test_burst_of_1000_rows_is_a_few_runs(world):
    ids = [r["instance_id"] for r in world.data.instances]
    t = appdb.billing_webhook_events
    with world.engine.begin() as conn:
        conn.execute(sa.insert(t), [
            {"event_id": f"evt_{n:04d}", "event_type": "subscription.updated", "instance_id": ids[n % len(ids)]}
            for n in range(1000)
        ])
    first = world.tick(billing_webhook_sensor)
    assert len(first.run_requests) == 2
    assert sum(len(config_of(r)["webhook_event_ids"]) for r in first.run_requests) == 1000
    # every row in exactly one batch
    handed = [i for r in first.run_requests for i in config_of(r)["webhook_event_ids"]]
    assert len(set(handed)) == 1000
    # more rows land while both runs are in flight: they wait and are batched later
    with world.engine.begin() as conn:
        conn.execute(sa.insert(t), [{"event_id": f"late_{n}", "event_type": "x", "instance_id": "abc123"} for n in range(30)])
    busy = world.tick(billing_webhook_sensor)
    assert not busy.run_requests and "in flight" in busy.skip_reason.skip_message
    runs = world.launch(first)
    assert all(r.success for r in runs)
    rest = world.tick(billing_webhook_sensor)
    assert len(rest.run_requests) == 1 and len(config_of(rest.run_requests[0])["webhook_event_ids"]) == 30
    assert all(r.success for r in world.launch(rest))
    rows = world.rows()
    assert all(r["processed_at"] is not None for r in rows.values())
    assert {i: world.data.expected[i] for i in world.data.expected} == {
        i: v[:2] for i, v in end_state(world.db_url).items() if i in world.data.expected}


def test_rows_committed_below_the_cursor_and_lost_runs_are_not_lost(world):
    t = appdb.billing_webhook_events
    a = world.land("evt_a", "abc123")
    with world.engine.begin() as conn:  # a later identity value commits first ...
        conn.execute(sa.insert(t).values(id=a + 10, event_id="evt_c", event_type="x", instance_id="site-0002"))
    t0 = 3_000_000_000.0
    first = world.tick(billing_webhook_sensor, now=t0)
    assert [config_of(r)["webhook_event_ids"] for r in first.run_requests] == [[a, a + 10]]
    assert json.loads(first.cursor)["hw"] == a + 10
    with world.engine.begin() as conn:  # ... and the earlier one commits late, below the cursor
        conn.execute(sa.insert(t).values(id=a + 5, event_id="evt_b", event_type="x", instance_id="site-0003"))
    late = world.tick(billing_webhook_sensor, now=t0 + 1)
    assert [config_of(r)["webhook_event_ids"] for r in late.run_requests] == [[a + 5]]

    # the first batch's run never shows up (lost): after LOST_RUN_SECONDS its rows go out again
    world.launch(late)
    assert not world.tick(billing_webhook_sensor, now=t0 + 2).run_requests
    lost = world.tick(billing_webhook_sensor, now=t0 + LOST_RUN_SECONDS + 1)
    assert not lost.run_requests  # settled as lost; now backing off
    redo = world.tick(billing_webhook_sensor, now=t0 + LOST_RUN_SECONDS + 120)
    (request,) = redo.run_requests
    assert config_of(request)["webhook_event_ids"] == [a, a + 10]
    assert request.run_key != first.run_requests[0].run_key
    world.launch(redo)
    assert all(r["processed_at"] is not None for r in world.rows().values())


def test_a_run_for_rows_already_processed_syncs_nothing(world):
    """If two runs ever name the same rows (a reset cursor), the second finds them processed."""
    world.land("evt_1", "abc123")
    result = world.tick(billing_webhook_sensor)
    (first,) = world.launch(result)
    assert first.success
    (second,) = world.launch(result)  # the same request once more, e.g. from a reset cursor
    assert second.success
    audit = audit_rows(world.db_url)
    assert len(audit) == 1 and world.row("evt_1")["attempts"] == 1
    assert world.sim.request_count("one") == 1


def test_unreadable_cursor_starts_over_without_losing_rows(world):
    world.land("evt_1", "abc123")
    world.cursors["billing_webhook_sensor"] = "{garbage"
    result = world.tick(billing_webhook_sensor)
    assert len(result.run_requests) == 1


# --------------------------------------------------------------------- new instance sensor


def add_instance(world: World, instance_id: str, plan: str = "free", credits: int = 100, created_at=None) -> None:
    row = {"instance_id": instance_id, "plan_id": plan, "credits_total": credits}
    if created_at is not None:
        row.update(created_at=created_at, updated_at=created_at)
    appdb.insert_instances(world.engine, [row])


def test_new_instance_is_synced_once_with_trigger_provisioning(world):
    first = world.tick(new_instance_sensor)
    assert not first.run_requests  # the seeded instances are two days old: not "new"

    world.sim.upsert(record("fresh-1", "pro"))
    add_instance(world, "fresh-1")
    result = world.tick(new_instance_sensor)
    (request,) = result.run_requests
    assert config_of(request) == {"instance_ids": ["fresh-1"], "trigger": "provisioning"}
    assert request.tags["creditsync/trigger"] == "provisioning"
    assert not world.tick(new_instance_sensor).run_requests  # in flight: not again

    (run,) = world.launch(result)
    assert run.success
    assert world.state("fresh-1") == ("pro", 5000)
    audit = audit_rows(world.db_url)
    assert list(audit["trigger"]) == ["provisioning"] and list(audit["instance_id"]) == ["fresh-1"]
    assert not world.tick(new_instance_sensor).run_requests

    # committed late with an older created_at (long transaction, clock skew): still found, once
    world.sim.upsert(record("late-1", "team"))
    cursor = json.loads(world.cursors["new_instance_sensor"])
    add_instance(world, "late-1", created_at=datetime.fromisoformat(cursor["wm"]) - timedelta(minutes=3))
    late = world.tick(new_instance_sensor)
    assert [config_of(r)["instance_ids"] for r in late.run_requests] == [["late-1"]]
    world.launch(late)
    assert world.state("late-1") == ("team", 20000)
    assert not world.tick(new_instance_sensor).run_requests


def test_new_instances_burst_is_batched(world):
    world.tick(new_instance_sensor)
    appdb.insert_instances(world.engine, [
        {"instance_id": f"burst-{n:04d}", "plan_id": "free", "credits_total": 100} for n in range(1000)])
    result = world.tick(new_instance_sensor)
    assert len(result.run_requests) == 2
    assert sorted(i for r in result.run_requests for i in config_of(r)["instance_ids"]) == [
        f"burst-{n:04d}" for n in range(1000)]
    appdb.insert_instances(world.engine, [{"instance_id": "burst-late", "plan_id": "free", "credits_total": 100}])
    assert not world.tick(new_instance_sensor).run_requests  # both slots busy: waits
    assert all(r.success for r in world.launch(result))
    (request,) = world.tick(new_instance_sensor).run_requests
    assert config_of(request)["instance_ids"] == ["burst-late"]


def test_failed_provisioning_run_is_retried(world):
    world.tick(new_instance_sensor)
    world.sim.upsert(record("fresh-2", "starter"))
    world.sim.add_fault("error", endpoint="one", count=None)
    add_instance(world, "fresh-2")
    t0 = time.time()
    first = world.tick(new_instance_sensor, now=t0)
    (run,) = world.launch(first)
    assert not run.success
    world.sim.clear_faults()
    assert not world.tick(new_instance_sensor, now=t0 + 1).run_requests  # backing off
    retry = world.tick(new_instance_sensor, now=t0 + 60)
    (request,) = retry.run_requests
    assert config_of(request)["instance_ids"] == ["fresh-2"]
    # billing answered 500 every time: an outage, so the retry is still the first attempt
    assert world.instance.get_run_by_id(run.run_id).tags.get("creditsync/outage") == "true"
    assert json.loads(retry.cursor)["inflight"][request.run_key]["attempt"] == 1
    (run,) = world.launch(retry)
    assert run.success and world.state("fresh-2") == ("starter", 1000)


def test_instance_created_while_a_full_sync_runs_is_synced(world):
    """The full run's snapshot predates the purchase and the instance; both nets keep the truth."""
    billing = BillingClient(world.sim.base_url, TOKEN)
    try:
        snapshot = sync.fetch_billing(billing, world.engine)  # the full run has fetched billing ...
        world.tick(new_instance_sensor)
        world.sim.upsert(record("mid-1", "pro", updated=datetime.now(timezone.utc)))
        add_instance(world, "mid-1")  # ... the instance appears (and pays) meanwhile
        result = world.tick(new_instance_sensor)
        assert [config_of(r)["instance_ids"] for r in result.run_requests] == [["mid-1"]]
        (run,) = world.launch(result)
        assert run.success and world.state("mid-1") == ("pro", 5000)
        # the full run goes on with its older snapshot (which says: no subscription -> free)
        state = sync.read_state(world.engine)
        decision = sync.decide(snapshot, state, options=sync.SyncOptions())
        assert "mid-1" in set(decision.stale["instance_id"])
        sync.apply(world.engine, decision, run_id="full-1", trigger="periodic", options=sync.SyncOptions())
    finally:
        billing.close()
    assert world.state("mid-1") == ("pro", 5000)
    audit = audit_rows(world.db_url)
    assert list(audit[audit["instance_id"] == "mid-1"]["trigger"]) == ["provisioning"]


# ------------------------------------------------------------------- overlapping full + targeted


@pytest.mark.parametrize("full_reads", ["before_targeted_write", "after_targeted_write"])
def test_stale_full_snapshot_never_reverts_a_targeted_fix(world, full_reads):
    """The full run fetched billing when abc123 was on starter; the customer then upgraded to pro
    and the webhook net fixed it. The full run's older snapshot must not put starter back."""
    world.sim.upsert(record("abc123", "starter", updated=NOW - timedelta(hours=2)))
    billing = BillingClient(world.sim.base_url, TOKEN)
    try:
        snapshot = sync.fetch_billing(billing, world.engine)
        state = sync.read_state(world.engine) if full_reads == "before_targeted_write" else None

        world.sim.upsert(record("abc123", "pro", updated=datetime.now(timezone.utc)))
        world.land("evt_upgrade", "abc123")
        (run,) = world.launch(world.tick(billing_webhook_sensor))
        assert run.success and world.state("abc123") == ("pro", 5000)

        if state is None:
            state = sync.read_state(world.engine)
        decision = sync.decide(snapshot, state, options=sync.SyncOptions())
        result = sync.apply(world.engine, decision, run_id="full-stale", trigger="periodic", options=sync.SyncOptions())
    finally:
        billing.close()
    assert world.state("abc123") == ("pro", 5000)
    assert "abc123" not in set(result.applied["instance_id"])
    if full_reads == "before_targeted_write":
        assert "abc123" in set(result.skipped["instance_id"])  # compare-and-set
    else:
        assert "abc123" in set(decision.stale["instance_id"])  # older than the row
    audit = audit_rows(world.db_url)
    assert list(audit[audit["instance_id"] == "abc123"]["trigger"]) == ["webhook"]


# ---------------------------------------------------------------------------- failure alert


class _Capture(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def alert_server():
    _Capture.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/hooks/secret-path", _Capture.received
    finally:
        server.shutdown()
        server.server_close()


def test_failed_run_is_logged_and_posted_to_the_alert_webhook(world, alert_server, monkeypatch, caplog):
    url, received = alert_server
    monkeypatch.setenv("CREDITSYNC_TEST_ALERT_URL", url)
    resources = dict(world.resources)
    resources["billing"] = BillingResource(api_url=world.sim.base_url, api_token="wrong-" + TOKEN, max_attempts="1")
    result = instance_credit_sync_job.execute_in_process(
        run_config={"ops": {"sync_instances": {"config": {"instance_ids": ["abc123"]}}}},
        instance=world.instance, resources=resources, raise_on_error=False,
        tags={"creditsync/trigger": "manual"},
    )
    assert not result.success
    (failure,) = world.instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
    context = build_run_status_sensor_context(
        sensor_name="credit_sync_failure_alert", dagster_event=failure.dagster_event,
        dagster_instance=world.instance, dagster_run=result.dagster_run,
        resources={"alert_webhook": world.resources["alert_webhook"]},
    ).for_run_failure()
    caplog.set_level("ERROR", logger="creditsync")
    credit_sync_failure_alert(context)

    (posted,) = received
    assert posted["text"].startswith("[CreditSync] Error running credit sync task: instance_credit_sync_job run ")
    assert "rejected the token" in posted["text"]
    assert posted["run_id"] == result.run_id and posted["trigger"] == "manual"
    assert "[CreditSync] Error running credit sync task:" in caplog.text
    for text in (json.dumps(posted), caplog.text, all_event_text(world.instance, result.run_id)):
        assert TOKEN not in text
        assert "secret-path" not in caplog.text


def test_failure_alert_without_a_webhook_only_logs(world, monkeypatch, caplog):
    monkeypatch.delenv("CREDITSYNC_TEST_ALERT_URL", raising=False)
    world.sim.add_fault("error", endpoint="one", count=None)
    result = instance_credit_sync_job.execute_in_process(
        run_config={"ops": {"sync_instances": {"config": {"instance_ids": ["abc123"]}}}},
        instance=world.instance, resources=world.resources, raise_on_error=False,
    )
    assert not result.success
    (failure,) = world.instance.all_logs(result.run_id, of_type=DagsterEventType.RUN_FAILURE)
    context = build_run_status_sensor_context(
        sensor_name="credit_sync_failure_alert", dagster_event=failure.dagster_event,
        dagster_instance=world.instance, dagster_run=result.dagster_run,
        resources={"alert_webhook": world.resources["alert_webhook"]},
    ).for_run_failure()
    caplog.set_level("ERROR", logger="creditsync")
    credit_sync_failure_alert(context)
    assert "[CreditSync] Error running credit sync task: instance_credit_sync_job" in caplog.text
    assert "billing API unavailable" in caplog.text


# -- SPEC safety rules of the nets ------------------------------------------------------------------


def test_a_created_at_in_the_future_never_blinds_the_provisioning_net(world):
    """One app server with a clock a day fast must not hide every instance created until then."""
    world.tick(new_instance_sensor)
    tomorrow = datetime.now(timezone.utc) + timedelta(days=1)
    world.sim.upsert(record("fast-clock", "pro"))
    add_instance(world, "fast-clock", created_at=tomorrow)
    first = world.tick(new_instance_sensor)
    (request,) = first.run_requests
    assert config_of(request)["instance_ids"] == ["fast-clock"]
    wm = datetime.fromisoformat(json.loads(first.cursor)["wm"])
    assert wm < datetime.now(timezone.utc) + timedelta(minutes=5)  # clamped to the database's clock
    world.launch(first)

    world.sim.upsert(record("normal", "team"))
    add_instance(world, "normal")  # created now: before the bogus "tomorrow"
    later = world.tick(new_instance_sensor)
    assert [config_of(r)["instance_ids"] for r in later.run_requests] == [["normal"]]
    (run,) = world.launch(later)
    assert run.success and world.state("normal") == ("team", 20000)


def test_a_90_minute_billing_outage_gives_up_no_webhook_row(world):
    """Billing answers 500 for 90 minutes: the row waits, keeps its budget, settles once billing is back."""
    world.sim.add_fault("error", endpoint="one", count=None)
    world.land("evt_outage", "abc123")
    t0 = 2_100_000_000.0
    launched = 0
    for minute in range(0, 91, 1):
        result = world.tick(billing_webhook_sensor, now=t0 + minute * 60)
        launched += len(world.launch(result))
        row = world.row("evt_outage")
        assert row["outcome"] in (None, "waiting") and row["attempts"] == 0  # never "failed"
    assert launched > realtime.MAX_ATTEMPTS  # far more tries than the budget, none of them counted
    world.sim.clear_faults()
    back = t0 + 91 * 60
    for second in (0, 30, 60):
        world.launch(world.tick(billing_webhook_sensor, now=back + second))
    row = world.row("evt_outage")
    assert row["outcome"] == "corrected" and row["processed_at"] is not None and row["attempts"] == 1
    assert world.state("abc123") == ("pro", 5000)


def test_a_row_a_receiver_holds_is_not_handed_out_by_the_sensor(world):
    landed = appdb.land_webhook_event(
        world.engine, event_id="evt_held", event_type="x", instance_id="abc123", payload=None,
        lease_owner="receiver-1", lease_seconds=300,
    )
    assert landed.inserted and landed.leased
    assert not world.tick(billing_webhook_sensor).run_requests  # the receiver is syncing it
    appdb.mark_webhook_events(world.engine, {landed.id: "error"}, processed=False)  # its sync failed: released
    (request,) = world.tick(billing_webhook_sensor, now=time.time() + 120).run_requests
    assert config_of(request)["webhook_event_ids"] == [landed.id]
