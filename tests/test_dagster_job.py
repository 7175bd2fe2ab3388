"""The full sync as one Dagster step, on a real instance (the project's dagster.yaml, SQLite
storage under a temporary DAGSTER_HOME): the report read back from the event log, the
pool that keeps a second full sync waiting whatever launched it, what a run leaves on
disk and its pruning, the Wix and Stripe providers through the step, and the report route."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
from dagster import DagsterEventType, DagsterInstance, materialize

from creditsync_pipeline import reports, sync
from creditsync_pipeline.defs import report as render
from creditsync_pipeline.defs.assets import FULL_SYNC_POOL, STEP, credit_sync_assets
from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.rules import KINDS
from creditsync_pipeline.settings import Secret, Settings
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded

REPO = Path(__file__).resolve().parents[1]
APP_SECRET = "app-SECRET-reports-5d1e9b"
PUBLIC_URL = "http://127.0.0.1:8000"
ASSETS = ("billing_subscriptions", "instance_credits", "credit_mismatches", "credit_corrections")


def project_instance(home: Path) -> DagsterInstance:
    """An instance on the project's dagster.yaml without its ``storage:`` block (SQLite)."""
    lines, skipping = [], False
    for line in (REPO / "dagster.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("storage:"):
            skipping = True
            continue
        if skipping and (line.startswith(" ") or not line.strip()):
            continue
        skipping = False
        lines.append(line)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return DagsterInstance.from_config(str(home))


@pytest.fixture
def world(sqlite_url, tmp_path, monkeypatch):
    data = seeded(sqlite_url)
    monkeypatch.delenv("CREDITSYNC_REPORTS_DIR", raising=False)
    monkeypatch.delenv("CREDITSYNC_PUBLIC_URL", raising=False)
    with BillingSimulator(data.records, token=TOKEN) as sim, project_instance(tmp_path / "dagster_home") as instance:
        resources = {
            "app_db": AppDatabaseResource(database_url=sqlite_url),
            "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN, page_size="30", max_attempts="3"),
        }
        yield data, resources, instance


def stored_metadata(instance: DagsterInstance, run_id: str) -> dict[str, dict]:
    """asset -> its materialization's metadata, as the UI reads it: from the event log."""
    out = {}
    for record in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
        mat = record.dagster_event.event_specific_data.materialization
        out[mat.asset_key.to_user_string()] = dict(mat.metadata)
    return out


def stored_checks(instance: DagsterInstance, run_id: str) -> dict[str, object]:
    return {
        r.dagster_event.event_specific_data.check_name: r.dagster_event.event_specific_data
        for r in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION)
    }


# -- the report ops read ------------------------------------------------------------------------


def test_the_report_read_back_from_the_event_log(world, sqlite_url, monkeypatch):
    data, resources, instance = world
    monkeypatch.setenv("CREDITSYNC_PUBLIC_URL", PUBLIC_URL)
    monkeypatch.setenv("CREDITSYNC_APP_SECRET", APP_SECRET)
    result = materialize(credit_sync_assets, resources=resources, instance=instance,
                         tags={"creditsync/trigger": "periodic"})
    assert result.success
    md = stored_metadata(instance, result.run_id)
    assert set(md) == set(ASSETS)

    mismatches = md["credit_mismatches"]
    # summary first, then the per-kind integers (Dagster plots each over runs: the chart)
    keys = list(mismatches)
    assert keys[0] == "summary"
    assert keys[1 : 1 + len(KINDS)] == [f"{k}_count" for k in KINDS]
    assert mismatches["wrong_plan_count"].value == 12 and mismatches["wrong_credits_count"].value == 3
    summary = mismatches["summary"].value
    assert "**17 mismatch(es)**" in summary and "| `wrong_plan` | 12 |" in summary
    # the narrow table: 4 short columns, every cell short, the reason cut
    table = mismatches["mismatches"].value
    assert [c.name for c in table.schema.columns] == ["instance_id", "kind", "change", "why"]
    assert len(table.records) == 17
    assert all(len(str(v)) <= max(render.REASON_CHARS, 40) for r in table.records for v in r.data.values())
    row = next(r.data for r in table.records if r.data["instance_id"] == "abc123")
    assert row["kind"] == "wrong_plan" and row["change"] == "free → pro, 100 → 5000"

    # credit_corrections: the corrected instances themselves (id, old -> new)
    corrections = md["credit_corrections"]
    assert list(corrections)[0] == "summary"
    assert "**15 instance(s) corrected** of 15 planned" in corrections["summary"].value
    corrected = corrections["corrected_instances"].value
    assert [c.name for c in corrected.schema.columns] == ["instance_id", "plan", "credits"]
    assert len(corrected.records) == 15
    by_id = {r.data["instance_id"]: r.data for r in corrected.records}
    assert by_id["abc123"]["credits"] == "100 → 5000"
    assert set(by_id) == set(audit_rows(sqlite_url)["instance_id"])

    # the full list: a keyed link to `creditsync serve`, never the secret
    name = f"credit_mismatches-{result.run_id}.csv"
    link = mismatches["full_list"].value
    assert link == f"{PUBLIC_URL}/reports/{name}?key={reports.link_key(APP_SECRET, name)}"
    assert corrections["full_list"].value == link
    assert md["billing_subscriptions"]["records"].value == len(data.records)
    assert md["instance_credits"]["instances"].value == len(end_state(sqlite_url))

    checks = stored_checks(instance, result.run_id)
    assert checks["no_mismatches_after_fix"].passed is True
    assert checks["no_unknown_plans"].passed is False
    stored = json.dumps([str(r) for r in instance.all_logs(result.run_id)])
    assert APP_SECRET not in stored and TOKEN not in stored


def test_without_a_public_url_the_report_names_the_file_and_how_to_link_it(world, monkeypatch):
    _, resources, instance = world
    result = materialize(credit_sync_assets, resources=resources, instance=instance)
    md = stored_metadata(instance, result.run_id)["credit_mismatches"]
    assert "full_list" not in md
    path = Path(md["full_list_csv"].value)
    assert path.is_file() and path.name == f"credit_mismatches-{result.run_id}.csv"
    assert "CREDITSYNC_PUBLIC_URL" in md["summary"].value


def test_the_tables_are_capped_with_a_count_of_the_rest():
    n = render.TABLE_ROWS + 70
    frame = pd.DataFrame({
        "instance_id": [f"site-{i:04d}" for i in range(n)], "kind": "wrong_credits",
        "current_plan_id": "pro", "expected_plan_id": "pro", "current_credits_total": 10,
        "expected_credits_total": 5000, "reason": "x" * 300,
    })
    applied = pd.DataFrame({
        "instance_id": frame["instance_id"], "old_plan_id": "pro", "new_plan_id": "pro",
        "old_credits_total": 10, "new_credits_total": 5000, "reason": "r",
    })
    report = sync.SyncReport(run_id="r1", trigger="manual", scope="full", dry_run=False, forced=False,
                             total_instances=1000, mismatches=frame, applied=applied, planned=n)
    md = render.mismatches_metadata(report, Path("/reports/credit_mismatches-r1.csv"), None)
    assert len(md["mismatches"].value.records) == render.TABLE_ROWS
    assert f"showing {render.TABLE_ROWS} of {n}; 70 more in the full list" in md["summary"].value
    assert all(len(r.data["why"]) <= render.REASON_CHARS for r in md["mismatches"].value.records)
    corr = render.corrections_metadata(report, None, None)
    assert len(corr["corrected_instances"].value.records) == render.TABLE_ROWS
    assert f"showing {render.TABLE_ROWS} of {n}" in corr["summary"].value
    assert corr["corrected_instances"].value.records[0].data == {
        "instance_id": "site-0000", "plan": "pro", "credits": "10 → 5000"}


# -- one full sync at a time (the pool) -----------------------------------------------------------


@pytest.mark.parametrize("route", ["credit_sync_job", "materialize_all"])
def test_a_second_full_sync_waits_for_the_pool_whatever_launched_it(world, sqlite_url, route):
    """Another run holds the pool's one slot: this run's step waits (nothing written) until
    it is freed. ``credit_sync_job`` is what the schedule launches; ``materialize_all`` is
    the UI's "Materialize all" (an asset job without the creditsync/sync tag)."""
    from creditsync_pipeline.definitions import defs

    _, resources, instance = world
    storage = instance.event_log_storage
    assert storage.initialize_concurrency_limit_to_default(FULL_SYNC_POOL)
    assert storage.get_concurrency_info(FULL_SYNC_POOL).slot_count == 1  # dagster.yaml: pools default_limit 1
    storage.claim_concurrency_slot(FULL_SYNC_POOL, "an-earlier-full-sync", STEP)
    before = dump_tables(sqlite_url)

    outcome: dict[str, object] = {}

    def launch() -> None:
        if route == "credit_sync_job":
            job = defs.resolve_job_def("credit_sync_job")
            outcome["result"] = job.execute_in_process(instance=instance, resources=resources)
        else:
            outcome["result"] = materialize(credit_sync_assets, resources=resources, instance=instance)

    worker = threading.Thread(target=launch, daemon=True)
    worker.start()
    deadline = time.monotonic() + 120
    while True:  # wait until the run's step queues for the slot (not a timing assertion)
        pending = [s for s in storage.get_concurrency_info(FULL_SYNC_POOL).pending_steps
                   if s.run_id != "an-earlier-full-sync"]
        if pending or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert pending and pending[0].step_key == STEP and pending[0].assigned_timestamp is None
    assert worker.is_alive(), "the second full sync did not wait for the pool"
    assert dump_tables(sqlite_url) == before  # it has not begun

    storage.free_concurrency_slots_for_run("an-earlier-full-sync")
    worker.join(timeout=180)
    assert not worker.is_alive()
    result = outcome["result"]
    assert result.success
    assert len(audit_rows(sqlite_url)) == 15
    assert storage.get_concurrency_info(FULL_SYNC_POOL).claimed_slots == []  # released after the step


def test_the_run_tag_limit_and_the_pool_are_both_configured(tmp_path):
    with project_instance(tmp_path / "home") as instance:
        config = instance.get_concurrency_config()
        assert config.pool_config.default_pool_limit == 1
        limits = config.run_queue_config.tag_concurrency_limits
        assert {"key": "creditsync/sync", "value": "full", "limit": 1} in limits
    from creditsync_pipeline.definitions import defs

    job = defs.resolve_job_def("credit_sync_job")
    assert job.tags["creditsync/sync"] == "full"
    assert {n.definition.pool for n in job.nodes} == {FULL_SYNC_POOL}


# -- what a run leaves on disk, and its pruning -----------------------------------------------------


def test_a_run_stores_no_values_and_old_reports_are_pruned(world, tmp_path, monkeypatch):
    _, resources, instance = world
    folder = tmp_path / "reports"
    folder.mkdir()
    monkeypatch.setenv("CREDITSYNC_REPORTS_DIR", str(folder))
    monkeypatch.setenv("CREDITSYNC_REPORT_RETENTION_DAYS", "7")
    old, recent, other = (folder / "credit_mismatches-old.csv", folder / "credit_mismatches-recent.csv",
                          folder / "notes.txt")
    for path in (old, recent, other):
        path.write_text("instance_id\n")
    eight_days = time.time() - 8 * 86400
    os.utime(old, (eight_days, eight_days))
    os.utime(other, (eight_days, eight_days))
    os.utime(recent, (time.time() - 6 * 86400,) * 2)

    result = materialize(credit_sync_assets, resources=resources, instance=instance)
    assert result.success
    assert not old.exists() and recent.exists() and other.exists()
    assert (folder / f"credit_mismatches-{result.run_id}.csv").is_file()

    # nothing is handed between steps: no stored asset values (the default IO manager's
    # pickles lived at storage/<asset key>) anywhere under DAGSTER_HOME
    root = Path(instance.root_directory)
    names = {p.name for p in root.rglob("*")}
    assert not names & set(ASSETS)
    assert not [p for p in root.rglob("*") if p.is_file() and p.stat().st_size > 5_000_000]


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failed_run(world, sqlite_url, tmp_path, monkeypatch):
    """The corrections are committed before the report is written (SPEC: a failure after the
    commit never turns a committed correction into a reported failure)."""
    _, resources, instance = world
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the report folder should be\n")
    monkeypatch.setenv("CREDITSYNC_REPORTS_DIR", str(blocker))
    result = materialize(credit_sync_assets, resources=resources, instance=instance)
    assert result.success
    assert len(audit_rows(sqlite_url)) == 15
    corrections = stored_metadata(instance, result.run_id)["credit_corrections"]
    assert "the mismatch report could not be written" in corrections["summary"].value
    assert "full_list" not in corrections and "full_list_csv" not in corrections


# -- the other providers through the step -----------------------------------------------------------


def test_wix_through_the_job(sqlite_url, tmp_path, monkeypatch):
    from creditsync_pipeline.simulators.wix import WixSimulator, demo_instances

    monkeypatch.delenv("CREDITSYNC_PUBLIC_URL", raising=False)
    data = seeded(sqlite_url)
    app_id, secret = "wix-app-job-1", "wix-SECRET-job-7a1c"
    with WixSimulator(demo_instances(data), app_id=app_id, app_secret=secret) as sim, \
            project_instance(tmp_path / "home") as instance:
        billing = BillingResource(provider="wix", wix_app_id=app_id, wix_app_secret=secret,
                                  wix_api_base=sim.base_url, wix_concurrency="8", max_attempts="3")
        result = materialize(credit_sync_assets, instance=instance,
                             resources={"app_db": AppDatabaseResource(database_url=sqlite_url), "billing": billing})
        assert result.success
        md = stored_metadata(instance, result.run_id)
        assert md["billing_subscriptions"]["provider"].value == "wix"
        assert md["credit_mismatches"]["wrong_plan_count"].value == 12
        assert md["credit_corrections"]["applied"].value == 15
        assert secret not in json.dumps([str(r) for r in instance.all_logs(result.run_id)])
    after = end_state(sqlite_url)
    assert {i: after[i][:2] for i in data.expected if i in after} == {i: v for i, v in data.expected.items() if i in after}


def test_stripe_through_the_job(sqlite_url, tmp_path, monkeypatch):
    from creditsync_pipeline.simulators.stripe import StripeSimulator

    monkeypatch.delenv("CREDITSYNC_PUBLIC_URL", raising=False)
    key = "sk_test_JOB_SECRET_51c0e2"
    data = seeded(sqlite_url)
    with StripeSimulator(api_key=key) as sim, project_instance(tmp_path / "home") as instance:
        sim.load_records(data.records)
        billing = BillingResource(provider="stripe", stripe_api_key=key, stripe_api_base=sim.base_url, max_attempts="3")
        result = materialize(credit_sync_assets, instance=instance,
                             resources={"app_db": AppDatabaseResource(database_url=sqlite_url), "billing": billing})
        assert result.success
        md = stored_metadata(instance, result.run_id)
        assert md["billing_subscriptions"]["provider"].value == "stripe"
        assert md["credit_mismatches"]["wrong_plan_count"].value == 12
        assert md["credit_corrections"]["applied"].value == 15
        assert key not in json.dumps([str(r) for r in instance.all_logs(result.run_id)])
    after = end_state(sqlite_url)
    assert {i: after[i][:2] for i in data.expected} == data.expected


# -- GET /reports/<file>.csv?key= ---------------------------------------------------------------------


@pytest.fixture
def report_app(sqlite_url, tmp_path):
    from starlette.testclient import TestClient

    from creditsync_pipeline.server import create_app

    seeded(sqlite_url)
    folder = tmp_path / "reports"
    folder.mkdir()
    name = "credit_mismatches-0123abcd.csv"
    reports.write_csv(pd.DataFrame({"instance_id": ["abc123", "=cmd"], "kind": ["wrong_plan", "wrong_plan"]}),
                      folder / name)
    (tmp_path / "secret.csv").write_text("not a report\n")
    (folder / "credit_mismatches-link.csv").symlink_to(tmp_path / "secret.csv")
    cfg = Settings(database_url=sqlite_url, billing_api_url="http://127.0.0.1:9", billing_api_token=Secret(TOKEN),
                   app_secret=Secret(APP_SECRET), receiver_workers=0, reports_dir=str(folder))
    with TestClient(create_app(cfg), raise_server_exceptions=False) as client:
        yield client, folder, name


def test_the_report_route_serves_a_keyed_report_and_nothing_else(report_app):
    client, folder, name = report_app
    ok = client.get(f"/reports/{name}", params={"key": reports.link_key(APP_SECRET, name)})
    assert ok.status_code == 200
    assert ok.headers["content-type"].startswith("text/csv")
    assert ok.content == (folder / name).read_bytes() and "'=cmd" in ok.text
    assert ok.headers["cache-control"] == "no-store"

    refused = [
        client.get(f"/reports/{name}"),  # no key
        client.get(f"/reports/{name}", params={"key": "0" * 64}),  # wrong key
        client.get(f"/reports/{name}", params={"key": reports.link_key("another-secret", name)}),
        client.get("/reports/credit_mismatches-other.csv",  # another file's key
                   params={"key": reports.link_key(APP_SECRET, name)}),
        client.get("/reports/credit_mismatches-missing.csv",
                   params={"key": reports.link_key(APP_SECRET, "credit_mismatches-missing.csv")}),
    ]
    for sneaky in ("../secret.csv", "..%2Fsecret.csv", "%2e%2e%2fsecret.csv", "credit_mismatches-link.csv",
                   "credit_mismatches-..%2F..%2Fsecret.csv"):
        refused.append(client.get(f"/reports/{sneaky}", params={"key": reports.link_key(APP_SECRET, sneaky)}))
    refused.append(client.get("/reports/credit_mismatches-link.csv",
                              params={"key": reports.link_key(APP_SECRET, "credit_mismatches-link.csv")}))
    for response in refused:
        assert response.status_code == 404, (response.url, response.status_code)
        assert "not a report" not in response.text
    for response in [ok, *refused]:
        assert APP_SECRET not in response.text and APP_SECRET not in str(response.headers)


def test_the_report_route_is_closed_without_a_secret_or_a_folder(tmp_path):
    """(``serve`` refuses to start without CREDITSYNC_APP_SECRET; the route is closed anyway.)"""
    from creditsync_pipeline.server.reports import report_file

    name = "credit_mismatches-0123abcd.csv"
    reports.write_csv(pd.DataFrame({"instance_id": ["abc123"]}), tmp_path / name)
    assert report_file(tmp_path, APP_SECRET, name, reports.link_key(APP_SECRET, name)) == (tmp_path / name).resolve()
    assert report_file(tmp_path, "", name, reports.link_key("", name)) is None
    assert report_file(None, APP_SECRET, name, reports.link_key(APP_SECRET, name)) is None


def test_the_settings_read_the_report_folder_and_the_public_url(tmp_path, monkeypatch):
    from creditsync_pipeline import settings

    cfg = settings.from_env({"CREDITSYNC_PUBLIC_URL": "http://ops.example:8000/", "CREDITSYNC_REPORTS_DIR": str(tmp_path)})
    assert cfg.public_url == "http://ops.example:8000" and cfg.report_folder() == tmp_path
    monkeypatch.setenv("DAGSTER_HOME", "/srv/dagster")
    assert settings.from_env({}).report_folder() == Path("/srv/dagster/storage/creditsync_reports")
    with pytest.raises(settings.SettingsError, match="CREDITSYNC_PUBLIC_URL"):
        settings.from_env({"CREDITSYNC_PUBLIC_URL": "javascript:alert(1)"})


def test_report_link_keys_are_bound_to_their_purpose() -> None:
    """The app secret also signs instance tokens: a link key is never a bare HMAC of its text."""
    import hashlib
    import hmac

    name = "credit_mismatches-run1.csv"
    bare = hmac.new(APP_SECRET.encode(), name.encode(), hashlib.sha256).hexdigest()
    assert reports.link_key(APP_SECRET, name) != bare
    assert reports.link_key(APP_SECRET, name) == reports.link_key(APP_SECRET, name)
    assert reports.link_key(APP_SECRET, name) != reports.link_key(APP_SECRET, "credit_mismatches-run2.csv")
