"""The production dagster.yaml: Dagster's own storage on PostgreSQL (dagster-postgres)."""

from __future__ import annotations

import shutil
from pathlib import Path

from dagster import DagsterInstance
from sqlalchemy import create_engine, inspect
from sqlalchemy.engine import make_url

from creditsync_pipeline.defs.resources import AppDatabaseResource, BillingResource
from creditsync_pipeline.simulators.generic import BillingSimulator

from .helpers import TOKEN, end_state, seeded

REPO_DAGSTER_YAML = Path(__file__).resolve().parents[1] / "dagster.yaml"


def test_repo_dagster_yaml_runs_the_job_on_postgres_storage(pg_url, sqlite_url, tmp_path, monkeypatch):
    url = make_url(pg_url)
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(REPO_DAGSTER_YAML, home / "dagster.yaml")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("DAGSTER_PG_HOST", url.host or "127.0.0.1")
    monkeypatch.setenv("DAGSTER_PG_PORT", str(url.port or 5432))
    monkeypatch.setenv("DAGSTER_PG_USER", url.username or "postgres")
    monkeypatch.setenv("DAGSTER_PG_PASSWORD", url.password or "")
    monkeypatch.setenv("DAGSTER_PG_DB", url.database)

    data = seeded(sqlite_url)
    with BillingSimulator(data.records, token=TOKEN) as sim, DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        from creditsync_pipeline.definitions import defs

        job = defs.resolve_job_def("credit_sync_job")
        result = job.execute_in_process(
            instance=instance,
            resources={
                "app_db": AppDatabaseResource(database_url=sqlite_url),
                "billing": BillingResource(api_url=sim.base_url, api_token=TOKEN),
            },
        )
        assert result.success
        stored = instance.get_run_by_id(result.run_id)
        assert stored is not None and stored.is_success

    # the run and its events live in PostgreSQL, the corrections in the app DB
    engine = create_engine(pg_url)
    try:
        assert {"runs", "event_logs"} <= set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert end_state(sqlite_url)["abc123"][:2] == ("pro", 5000)
