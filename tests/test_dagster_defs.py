"""The Dagster side: definitions load, assets materialize in-process over real
HTTP and a real database, metadata and asset checks say what ops need."""

from __future__ import annotations

import json

import pytest
from dagster import DagsterInstance, DefaultScheduleStatus, materialize

from creditsync_pipeline.defs.assets import credit_sync_assets
from creditsync_pipeline.defs.checks import credit_sync_checks
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded


def test_definitions_load_with_the_spec_names():
    from creditsync_pipeline.definitions import defs

    job = defs.resolve_job_def("credit_sync_job")
    # the full sync is one step (the CLI's run_full_sync) producing the four assets
    assert [n.name for n in job.nodes] == ["credit_sync"]
    assert job.nodes[0].definition.pool == "creditsync_full_sync"
    schedule = defs.resolve_schedule_def("credit_sync_every_6_hours")
    assert schedule.cron_schedule == "0 */6 * * *"
    assert schedule.execution_timezone == "UTC"
    assert schedule.default_status == DefaultScheduleStatus.RUNNING
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert keys == {"billing_subscriptions", "instance_credits", "credit_mismatches", "credit_corrections"}
    for key in graph.get_all_asset_keys():
        assert graph.get(key).group_name == "credit_sync"
    checks = {k.name for k in graph.asset_check_keys}
    assert checks == {"no_mismatches_after_fix", "no_unknown_plans"}


@pytest.fixture
def world(db_url):
    data = seeded(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim:
        resources = {
            "app_db": AppDatabaseResource(database_url=db_url),
            "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN, page_size="30", max_attempts="3"),
        }
        yield data, sim, resources


def _run(resources, instance, run_config=None, raise_on_error=True):
    return materialize(
        [*credit_sync_assets, *credit_sync_checks],
        resources=resources,
        instance=instance,
        run_config=run_config,
        tags={"creditsync/trigger": "periodic"},
        raise_on_error=raise_on_error,
    )


def _metadata(result, asset):
    """The metadata of ``asset``'s materialization in ``result`` (one step makes all four)."""
    (mat,) = [m for m in result.asset_materializations_for_node("credit_sync") if m.asset_key.to_user_string() == asset]
    return {k: v.value for k, v in mat.metadata.items()}


def test_full_job_fixes_and_reports(world, db_url):
    data, sim, resources = world
    with DagsterInstance.ephemeral() as instance:
        result = _run(resources, instance)
        assert result.success

        md = _metadata(result, "credit_mismatches")
        assert md["wrong_plan_count"] == 12
        assert md["wrong_credits_count"] == 3
        assert md["unknown_plan_count"] == 1
        assert md["missing_instance_count"] == 1
        assert md["invalid_record_count"] == 0
        assert md["mismatch_count"] == 17
        assert md["guard_rail"] == "ok"
        table = md["mismatches"]
        assert len(table.records) == 17
        assert {r.data["instance_id"] for r in table.records} >= {"abc123", "deleted-site-9"}
        with open(md["full_list_csv"], encoding="utf-8") as fh:
            assert len(fh.read().strip().splitlines()) == 18  # header + 17

        corr = _metadata(result, "credit_corrections")
        assert corr["applied"] == 15 and corr["remaining"] == 0 and corr["trigger"] == "periodic"

        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["no_mismatches_after_fix"].passed is True
        assert checks["no_unknown_plans"].passed is False
        assert checks["no_unknown_plans"].metadata["unknown_plans"].value == ["enterprise"]

        after = end_state(db_url)
        assert {i: after[i][:2] for i in data.expected} == data.expected
        audit = audit_rows(db_url)
        assert len(audit) == 15 and set(audit["trigger"]) == {"periodic"}
        assert set(audit["run_id"]) == {result.run_id}

        # every event of the run, as stored: no token anywhere (UI reads these)
        records = instance.all_logs(result.run_id)
        assert records, "the run stored no events"
        assert all(TOKEN not in json.dumps(r.to_dict() if hasattr(r, "to_dict") else str(r), default=str) for r in records)
        assert any("Synced credits for instance abc123: 100 → 5000" in (r.user_message or "") for r in records)

        # second run converges
        again = _run(resources, instance)
        assert _metadata(again, "credit_mismatches")["wrong_plan_count"] == 0
        assert _metadata(again, "credit_corrections")["applied"] == 0
        assert len(audit_rows(db_url)) == 15


def test_dry_run_writes_nothing_and_the_check_says_so(world, db_url):
    _, _, resources = world
    before = dump_tables(db_url)
    with DagsterInstance.ephemeral() as instance:
        result = _run(resources, instance, run_config={"ops": {"credit_sync": {"config": {"dry_run": True}}}})
        assert result.success
        assert _metadata(result, "credit_corrections")["applied"] == 0
        checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
        assert checks["no_mismatches_after_fix"].passed is False
        assert checks["no_mismatches_after_fix"].metadata["remaining"].value == 15
    assert dump_tables(db_url) == before


def test_guard_rail_fails_the_run_and_force_overrides(world, db_url):
    _, sim, resources = world
    sim.set_records([])
    before = dump_tables(db_url)
    with DagsterInstance.ephemeral() as instance:
        result = _run(resources, instance, raise_on_error=False)
        assert not result.success
        assert "empty subscription list" in _metadata(result, "credit_mismatches")["guard_rail"]
        assert dump_tables(db_url) == before
        forced = _run(resources, instance, run_config={"ops": {"credit_sync": {"config": {"force": True}}}})
        assert forced.success
    assert {p for p, _, _ in end_state(db_url).values()} == {"free"}


def test_billing_outage_fails_the_run_and_writes_nothing(world, db_url):
    _, sim, resources = world
    sim.add_fault("error", endpoint="list", after=1, count=None)
    before = dump_tables(db_url)
    with DagsterInstance.ephemeral() as instance:
        result = _run(resources, instance, raise_on_error=False)
        assert not result.success
        messages = " ".join(r.user_message or "" for r in instance.all_logs(result.run_id))
        assert "[CreditSync] Error running credit sync task:" in messages
        assert TOKEN not in messages
    assert dump_tables(db_url) == before
