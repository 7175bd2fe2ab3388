"""Shared test helpers: seeding, table dumps, end-state reads."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone

import sqlalchemy as sa

from creditsync_pipeline import appdb
from creditsync_pipeline.demo import DemoData, demo_dataset, seed_database

TOKEN = "tok-SECRET-9f3c1e77b2"
NOW = datetime.now(timezone.utc)


def seeded(db_url: str, size: int = 200) -> DemoData:
    """Seed the demo data set into ``db_url``; return it with its expected end state."""
    data = demo_dataset(NOW, size=size)
    seed_database(db_url, data)
    return data


def dump_tables(db_url: str) -> dict[str, list[tuple]]:
    """Every row of every creditsync table, sorted: a byte-for-byte comparison basis."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        with engine.connect() as conn:
            return {
                table.name: sorted(
                    (tuple(repr(v) for v in row) for row in conn.execute(sa.select(table))),
                )
                for table in appdb.metadata.sorted_tables
            }
    finally:
        engine.dispose()


def end_state(db_url: str) -> dict[str, tuple[str, int, int]]:
    """instance_id -> (plan_id, credits_total, credits_used)."""
    engine = appdb.create_engine_from_url(db_url)
    try:
        df = appdb.read_instances(engine)
    finally:
        engine.dispose()
    return {
        r.instance_id: (r.plan_id, int(r.credits_total), int(r.credits_used)) for r in df.itertuples(index=False)
    }


def audit_rows(db_url: str):
    engine = appdb.create_engine_from_url(db_url)
    try:
        return appdb.read_audit(engine)
    finally:
        engine.dispose()


@dataclass
class ServeProcess:
    """A running ``creditsync serve`` subprocess: its URL, its stderr lines so far, the process."""

    base_url: str
    proc: subprocess.Popen
    captured: list[str] = field(default_factory=list)


@contextmanager
def creditsync_serve(env: Mapping[str, str], *, stdout: int = subprocess.DEVNULL) -> Iterator[ServeProcess]:
    """``creditsync serve --port 0`` as an operator runs it, with ``env`` over ``os.environ``.

    Waits for its "listening on" line; on exit sends SIGTERM (kill after 30 s). The
    process (``returncode``, ``stdout`` when piped) stays readable after the block.
    """
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.cli", "serve", "--host", "127.0.0.1", "--port", "0"],
        env={**os.environ, **env}, stdout=stdout, stderr=subprocess.PIPE, text=True,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    captured: list[str] = []

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            captured.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    try:
        port = None
        while port is None:
            line = lines.get(timeout=60)
            assert line is not None, "serve exited early:\n" + "".join(captured)
            match = re.search(r"listening on http://127\.0\.0\.1:(\d+)", line)
            port = int(match.group(1)) if match else None
        yield ServeProcess(f"http://127.0.0.1:{port}", proc, captured)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
