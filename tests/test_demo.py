"""The README's demo command, minus the UI: seeds, serves billing, runs the job."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import demo_dataset

from .helpers import NOW, end_state


@pytest.mark.slow
@pytest.mark.parametrize("provider", ["generic", "wix", "stripe"])
def test_demo_no_ui_runs_the_first_reconciliation(tmp_path, provider):
    env = dict(os.environ, CREDITSYNC_DEMO_DIR=str(tmp_path / "demo"))
    proc = subprocess.run(
        [sys.executable, "-m", "creditsync_pipeline.cli", "demo", "--no-ui", "--provider", provider],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RUN_SUCCESS" in proc.stdout + proc.stderr
    db_url = f"sqlite:///{tmp_path / 'demo' / 'app.db'}"
    state = end_state(db_url)
    expected = demo_dataset(NOW).expected
    assert {i: state[i][:2] for i in expected} == expected
    engine = appdb.create_engine_from_url(db_url)
    try:
        assert len(appdb.read_audit(engine)) == 15
    finally:
        engine.dispose()
    # Dagster's own state went to SQLite under the demo's DAGSTER_HOME
    assert (tmp_path / "demo" / "dagster_home" / "history").is_dir()
