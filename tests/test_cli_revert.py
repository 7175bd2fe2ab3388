"""End to end: ``creditsync revert`` after a real ``creditsync fix`` over HTTP (SQLite, PostgreSQL, MySQL).

A revert restores each instance's plan and allowance from the run's audit rows,
compare-and-set against what the run wrote: a row changed since is skipped and
counted; ``credits_used`` is never touched; a second revert reverts nothing.
"""

from __future__ import annotations

import json

import sqlalchemy as sa

from creditsync_pipeline import appdb

from .helpers import audit_rows, dump_tables, end_state
from .test_cli_e2e import run_cli, sim, world  # noqa: F401 - fixtures


def _set(db_url: str, instance_id: str, **values) -> None:
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(appdb.schema.instances)
                         .where(appdb.schema.instances.c.instance_id == instance_id).values(**values))
    finally:
        engine.dispose()


def test_revert_restores_skips_changed_rows_and_is_idempotent(world, db_url, capsys, caplog):
    before_fix = end_state(db_url)
    code, out, err = run_cli(capsys, "fix", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    fixed = audit_rows(db_url)
    assert len(fixed) == 15
    changed_plans = list(fixed[fixed["old_plan_id"] != fixed["new_plan_id"]]["instance_id"])
    # after the fix: one row is changed by the app (must be skipped), one uses credits (kept)
    _set(db_url, "abc123", plan_id="team", credits_total=12345)
    user = next(i for i in changed_plans if i != "abc123")
    _set(db_url, user, credits_used=777)
    after_fix = end_state(db_url)

    # --dry-run: says what would happen, writes nothing
    snapshot = dump_tables(db_url)
    code, out, err = run_cli(capsys, "revert", run_id, "--dry-run", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert (doc["dry_run"], doc["reverted_count"], doc["skipped_count"]) == (True, 14, 1)
    assert doc["skipped"] == [{"instance_id": "abc123", "current_plan_id": "team", "current_credits_total": 12345,
                               "target_plan_id": "free", "target_credits_total": 100}]
    assert dump_tables(db_url) == snapshot

    caplog.clear()
    code, out, err = run_cli(capsys, "revert", run_id)
    assert code == 0, err
    assert f"Reverted 14 instance(s) of run {run_id}" in out and "skipped 1 changed since the run" in out
    assert "skipped abc123: now team/12345" in out
    after = end_state(db_url)
    for iid, (plan, credits, used) in after.items():
        if iid == "abc123":
            assert (plan, credits) == ("team", 12345), "a row changed since the run was overwritten"
        elif iid in set(fixed["instance_id"]):
            assert (plan, credits) == before_fix[iid][:2], iid
        else:
            assert (plan, credits, used) == after_fix[iid], iid
        assert used == after_fix[iid][2], "credits_used must never change"
    assert after[user][2] == 777
    audit = audit_rows(db_url)
    reverts = audit[audit["trigger"] == "revert"]
    assert len(reverts) == 14 and reverts["run_id"].nunique() == 1 and reverts["run_id"].iloc[0] != run_id
    assert set(reverts["reason"]) == {f"revert of run {run_id}"}
    assert "abc123" not in set(reverts["instance_id"])
    logs = caplog.text
    assert f"[CreditSync] Reverted 14 instance(s) of run {run_id}" in logs
    row = fixed.set_index("instance_id").loc[user]
    assert f"Updating instance plan {user}: {row['new_plan_id']} → {row['old_plan_id']}" in logs

    # a second revert reverts nothing and says so
    code, out, err = run_cli(capsys, "revert", run_id)
    assert code == 0, err
    assert "already reverted" in out
    code, out, _ = run_cli(capsys, "revert", run_id, "--json")
    assert json.loads(out)["already_reverted"] is True and json.loads(out)["reverted_count"] == 0
    assert len(audit_rows(db_url)) == len(audit)


def test_revert_of_an_unknown_run_exits_2_with_one_line(world, db_url, capsys):
    run_cli(capsys, "init-db")
    before = dump_tables(db_url)
    code, out, err = run_cli(capsys, "revert", "no-such-run")
    assert code == 2 and out == ""
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert errors == [errors[0]] and "unknown run id 'no-such-run'" in errors[0]
    assert dump_tables(db_url) == before
    code, out, err = run_cli(capsys, "revert", "no-such-run", "--json")
    assert code == 2 and out == ""


def test_the_dagster_job_is_the_same_revert(world, db_url, capsys):
    from dagster import DagsterInstance

    from creditsync_pipeline.defs.jobs import revert_credit_sync_run
    from creditsync_pipeline.defs.resources import AppDatabaseResource

    code, out, err = run_cli(capsys, "fix", "--json")
    assert code == 0, err
    run_id = json.loads(out)["run_id"]
    resources = {"app_db": AppDatabaseResource(database_url=db_url)}

    def launch(config: dict):
        with DagsterInstance.ephemeral() as instance:
            return revert_credit_sync_run.execute_in_process(
                run_config={"ops": {"revert_run": {"config": config}}}, resources=resources,
                instance=instance, raise_on_error=False)

    before = dump_tables(db_url)
    preview = launch({"run_id": run_id, "dry_run": True})
    assert preview.success and preview.output_for_node("revert_run")["skipped"] == []
    assert len(preview.output_for_node("revert_run")["reverted"]) == 15
    assert dump_tables(db_url) == before
    done = launch({"run_id": run_id})
    assert done.success
    reverts = audit_rows(db_url).query("trigger == 'revert'")
    assert len(reverts) == 15 and set(reverts["run_id"]) == {done.run_id}
    unknown = launch({"run_id": "no-such-run"})
    assert not unknown.success
    (failure,) = [e for e in unknown.all_events if e.event_type_value == "STEP_FAILURE"]
    assert "unknown run id 'no-such-run'" in failure.step_failure_data.error.message
