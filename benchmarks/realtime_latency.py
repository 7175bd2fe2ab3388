"""Benchmark of the real-time webhook net through a real ``dagster-daemon``.

Measures, on this machine:

1. **latency**: for each of ``--events`` webhook rows, the time from the row
   landing in ``billing_webhook_events`` to the instance being corrected in
   the app database (the billing plan was changed just before). Rows land
   one at a time, ``--interval`` seconds apart (jittered, so they hit every
   phase of the daemon's ~5 s sensor loop); p50 / p95 / max are reported.
2. **burst**: ``--burst`` rows landed back to back (one committed insert
   each, as a webhook handler does), each naming a different instance whose
   plan changed; reports how many Dagster runs the webhook net used and how
   long until every row was processed and every instance corrected.

Setup: a temporary DAGSTER_HOME (the repo's dagster.yaml without its
PostgreSQL storage block, so Dagster keeps its state in SQLite), the billing
simulator in this process (the daemon's runs reach it over HTTP), and an app
database (a temporary SQLite file, or ``--database-url`` pointing at an
*empty* database, e.g. PostgreSQL). The daemon is started as
``dagster-daemon run -m creditsync_pipeline.definitions`` and always stopped.

    .venv/bin/python benchmarks/realtime_latency.py            # table
    .venv/bin/python benchmarks/realtime_latency.py --json     # one JSON document

Not a test: nothing is asserted; the exit code is 1 only when events were
not corrected within ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import sqlalchemy as sa  # noqa: E402

from creditsync_pipeline import appdb  # noqa: E402
from creditsync_pipeline.demo import PLANS, write_dagster_home  # noqa: E402
from creditsync_pipeline.simulators.generic import BillingSimulator  # noqa: E402

TOKEN = "bench-token-not-a-secret"
CREDITS = {p["plan_id"]: p["credits"] for p in PLANS}


def iso(d: datetime) -> str:
    return d.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def record(instance_id: str, plan: str) -> dict[str, Any]:
    now = datetime.now(timezone.utc)
    return {"instance_id": instance_id, "plan_id": plan, "status": "active",
            "current_period_end": iso(now + timedelta(days=30)), "updated_at": iso(now)}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


class Harness:
    """App DB + simulator + a dagster-daemon on a temporary DAGSTER_HOME."""

    def __init__(self, root: Path, database_url: str | None, size: int) -> None:
        self.root = root
        self.db_url = database_url or f"sqlite:///{root / 'app.db'}"
        self.engine = appdb.create_engine_from_url(self.db_url)
        appdb.init_db(self.engine)
        appdb.upsert_plans(self.engine, PLANS)
        old = datetime.now(timezone.utc) - timedelta(days=2)
        self.ids = [f"bench-{n:05d}" for n in range(size)]
        appdb.insert_instances(self.engine, [
            {"instance_id": i, "plan_id": "starter", "credits_total": CREDITS["starter"],
             "created_at": old, "updated_at": old} for i in self.ids])
        self.sim = BillingSimulator([record(i, "starter") for i in self.ids], token=TOKEN).start()
        self.home = root / "dagster_home"
        write_dagster_home(self.home)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("DAGSTER_", "CREDITSYNC_"))}
        env.update(DAGSTER_HOME=str(self.home), DATABASE_URL=self.db_url, BILLING_API_URL=self.sim.base_url,
                   BILLING_API_TOKEN=TOKEN, PYTHONUNBUFFERED="1")
        daemon = Path(sys.executable).with_name("dagster-daemon")
        self.log = open(root / "daemon.log", "wb")
        self.proc = subprocess.Popen(
            [str(daemon), "run", "-m", "creditsync_pipeline.definitions"],
            env=env, cwd=REPO, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        self._seq = 0

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=20)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.log.close()
        self.sim.stop()
        self.engine.dispose()

    def land(self, instance_id: str) -> None:
        self._seq += 1
        appdb.land_webhook_event(self.engine, event_id=f"bench-evt-{self._seq:06d}",
                                 event_type="subscription.updated", instance_id=instance_id, payload=None)

    def plans_of(self, ids: list[str]) -> dict[str, str]:
        df = appdb.read_instances(self.engine, ids)
        return dict(zip(df["instance_id"], df["plan_id"]))

    def unprocessed(self) -> int:
        t = appdb.billing_webhook_events
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).where(t.c.processed_at.is_(None))).scalar_one())

    def webhook_runs_since(self, since: float) -> int:
        from dagster import DagsterInstance, RunsFilter
        from dagster._core.instance.ref import InstanceRef

        with DagsterInstance.from_ref(InstanceRef.from_dir(str(self.home))) as instance:
            runs = instance.get_runs(filters=RunsFilter(tags={"creditsync/trigger": "webhook"},
                                                        created_after=datetime.fromtimestamp(since, timezone.utc)))
            return len(runs)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = (self.root / "daemon.log").read_text(errors="replace").splitlines()[-40:]
            raise SystemExit("dagster-daemon exited:\n" + "\n".join(tail))


def wait_corrected(h: Harness, pending: dict[str, tuple[str, float]], done: dict[str, float], timeout: float) -> None:
    """Poll until every pending instance shows its target plan; record monotonic completion times."""
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        h.check_alive()
        current = h.plans_of(list(pending))
        stamp = time.monotonic()
        for iid, plan in current.items():
            if iid in pending and plan == pending[iid][0]:
                done[iid] = stamp - pending.pop(iid)[1]
        time.sleep(0.05)


def latency_phase(h: Harness, events: int, interval: float, timeout: float, rng: random.Random) -> dict[str, Any]:
    pending: dict[str, tuple[str, float]] = {}
    done: dict[str, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def poller() -> None:
        while not stop.is_set():
            with lock:
                snapshot = dict(pending)
            if snapshot:
                current = h.plans_of(list(snapshot))
                stamp = time.monotonic()
                with lock:
                    for iid, plan in current.items():
                        if iid in pending and plan == pending[iid][0]:
                            done[iid] = stamp - pending.pop(iid)[1]
            time.sleep(0.05)

    thread = threading.Thread(target=poller, daemon=True)
    thread.start()
    try:
        for n in range(events):
            iid = h.ids[n]
            h.sim.upsert(record(iid, "pro"))
            with lock:
                pending[iid] = ("pro", time.monotonic())
            h.land(iid)
            time.sleep(interval * rng.uniform(0.5, 1.5))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            h.check_alive()
            with lock:
                if not pending:
                    break
            time.sleep(0.1)
    finally:
        stop.set()
        thread.join(timeout=5)
    values = list(done.values())
    return {
        "events": events,
        "corrected": len(values),
        "p50_s": round(percentile(values, 0.50), 2),
        "p95_s": round(percentile(values, 0.95), 2),
        "max_s": round(max(values), 2) if values else None,
        "mean_s": round(statistics.fmean(values), 2) if values else None,
        "missing": sorted(pending),
    }


def burst_phase(h: Harness, burst: int, offset: int, timeout: float) -> dict[str, Any]:
    ids = h.ids[offset : offset + burst]
    for iid in ids:
        h.sim.upsert(record(iid, "team"))
    started_wall, started = time.time(), time.monotonic()
    for iid in ids:
        h.land(iid)
    landed = time.monotonic() - started
    pending = {iid: ("team", started) for iid in ids}
    done: dict[str, float] = {}
    wait_corrected(h, pending, done, timeout)
    while h.unprocessed() and time.monotonic() - started < timeout:
        time.sleep(0.1)
    all_done = time.monotonic() - started
    return {
        "rows": burst,
        "land_seconds": round(landed, 2),
        "runs": h.webhook_runs_since(started_wall - 1),
        "corrected": len(done),
        "all_processed_seconds": round(all_done, 2),
        "unprocessed_rows": h.unprocessed(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=20, help="webhook rows measured one by one (default 20)")
    parser.add_argument("--interval", type=float, default=1.5, help="mean seconds between them (default 1.5)")
    parser.add_argument("--burst", type=int, default=1000, help="rows landed at once (default 1000; 0 skips)")
    parser.add_argument("--database-url", help="an EMPTY app database (default: a temporary SQLite file)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait per phase (default 180)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (daemon log, DAGSTER_HOME)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of a table")
    args = parser.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="creditsync-bench-"))
    h = Harness(root, args.database_url, size=args.events + args.burst + 1)
    rng = random.Random(args.seed)
    try:
        # warm-up (not measured): the daemon's first sensor tick and code server start
        warm_id = h.ids[-1]
        h.sim.upsert(record(warm_id, "pro"))
        h.land(warm_id)
        warm: dict[str, float] = {}
        wait_corrected(h, {warm_id: ("pro", time.monotonic())}, warm, args.timeout)
        if not warm:
            raise SystemExit("warm-up event was not corrected; see the daemon log (--keep)")
        latency = latency_phase(h, args.events, args.interval, args.timeout, rng)
        burst = burst_phase(h, args.burst, args.events, args.timeout) if args.burst else None
    finally:
        h.close()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "database": "sqlite (temporary file)" if not args.database_url else appdb.redact_url(args.database_url),
        "warmup_s": round(next(iter(warm.values())), 2),
        "latency": latency,
        "burst": burst,
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"creditsync real-time webhook net via dagster-daemon ({result['machine']['cpus']} CPUs, {result['database']})")
        print(f"{'metric':<44}{'value':>12}")
        print("-" * 56)
        rows = [
            ("warm-up event (first tick, not measured)", f"{result['warmup_s']:.2f} s"),
            ("events measured", f"{latency['corrected']}/{latency['events']}"),
            ("webhook row -> corrected  p50", f"{latency['p50_s']:.2f} s"),
            ("webhook row -> corrected  p95", f"{latency['p95_s']:.2f} s"),
            ("webhook row -> corrected  max", f"{latency['max_s']} s"),
        ]
        if burst:
            rows += [
                ("burst: rows landed (one insert each)", f"{burst['rows']}"),
                ("burst: seconds to land them", f"{burst['land_seconds']:.2f} s"),
                ("burst: Dagster runs used", f"{burst['runs']}"),
                ("burst: instances corrected", f"{burst['corrected']}"),
                ("burst: seconds until all processed", f"{burst['all_processed_seconds']:.2f} s"),
            ]
        for name, value in rows:
            print(f"{name:<44}{value:>12}")
        if root.exists():
            print(f"kept: {root}")
    missing = latency["corrected"] < latency["events"] or (burst and burst["corrected"] < burst["rows"])
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
