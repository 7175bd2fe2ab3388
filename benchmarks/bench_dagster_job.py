"""Dagster-path benchmark: ``credit_sync_job`` against ``creditsync fix`` on the same data.

One command, one run::

    .venv/bin/python benchmarks/bench_dagster_job.py --n 100000 --drift 0.05 [--repeat 3] [--json]

What it does (the data helpers are ``bench_full_sync``'s):

1. a throw-away PostgreSQL database (``--database-url``), N instances, ``drift`` of them
   wrong; the generic billing simulator in its own process;
2. ``creditsync fix --json`` in a child process (wall time, peak RSS from ``wait4``);
3. the drifted rows put back as seeded (and the table rewritten compactly, as after seeding);
4. ``dagster job execute -m creditsync_pipeline.definitions -j credit_sync_job`` in a
   child process, as ops launch it, with a fresh ``DAGSTER_HOME`` holding the project's
   ``dagster.yaml`` without its ``storage:`` block (SQLite under ``DAGSTER_HOME``): wall
   time, peak RSS, and every byte the run left under ``DAGSTER_HOME`` -- the mismatch
   report counted apart;
5. both outcomes checked (each run wrote exactly the drifted rows, per the audit table).

Prints both wall times, the ratio (target <= 1.3x), both peak RSS and the bytes.
The machine is shared: the load average before and after is printed with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import bench_full_sync as bfs  # noqa: E402

from creditsync_pipeline import appdb  # noqa: E402

REPO = bfs.REPO
TARGET_RATIO = 1.3
TARGET_STORAGE_MB = 10.0
REPORTS = "creditsync_reports"


def log(msg: str) -> None:
    bfs.log(msg)


def audit_count(url: str) -> int:
    engine = appdb.create_engine_from_url(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(appdb.credit_sync_audit)).scalar_one())
    finally:
        engine.dispose()


def dagster_home_without_storage(home: Path) -> None:
    """``home`` with the project's dagster.yaml minus its top-level ``storage:`` block."""
    out: list[str] = []
    skipping = False
    for line in (REPO / "dagster.yaml").read_text(encoding="utf-8").splitlines():
        if line.startswith("storage:"):
            skipping = True
            continue
        if skipping and (line.startswith((" ", "\t")) or not line.strip()):
            continue
        skipping = False
        out.append(line)
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("\n".join(out) + "\n", encoding="utf-8")


def tree_bytes(root: Path) -> dict[str, int]:
    """Bytes of the files under ``root`` per top-level entry (the reports folder apart)."""
    sizes: dict[str, int] = {}
    for dirpath, _, files in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        key = REPORTS if REPORTS in rel.parts else (rel.parts[0] if rel.parts else ".")
        if key == "storage" and len(rel.parts) > 1:
            key = f"storage/{rel.parts[1]}"
        for name in files:
            try:
                sizes[key] = sizes.get(key, 0) + (Path(dirpath) / name).stat().st_size
            except OSError:
                pass
    return sizes


def _child(cmd: list[str], env: dict[str, str]) -> tuple[float, float, str, str, int]:
    """Run ``cmd``; (wall s, peak RSS MB of it and its children, stdout, stderr, exit code)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        wall = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        return wall, usage.ru_maxrss / 1024, out.read().decode(), err.read().decode(), os.waitstatus_to_exitcode(status)


def run_dagster_job(url: str, base_url: str, page_size: int, home: Path) -> dict[str, Any]:
    """``dagster job execute ... -j credit_sync_job`` in a child process, fresh DAGSTER_HOME."""
    dagster_home_without_storage(home)
    env0 = {**os.environ, "DAGSTER_HOME": str(home)}
    # An instance is made once, not per run: create its SQLite storage (schema, migrations)
    # before the timed run, as a deployment's DAGSTER_HOME already holds it.
    subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; DagsterInstance.get().dispose()"],
                   env=env0, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    before_by_place = tree_bytes(home)
    before = sum(before_by_place.values())
    env = {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "DATABASE_URL": url,
        "BILLING_API_URL": base_url,
        "BILLING_API_TOKEN": bfs.TOKEN,
        "BILLING_API_PAGE_SIZE": str(page_size),
    }
    for name in ("CREDITSYNC_REPORTS_DIR", "CREDITSYNC_PUBLIC_URL"):
        env.pop(name, None)
    dagster = str(Path(sys.executable).with_name("dagster"))
    cmd = [dagster, "job", "execute", "-m", "creditsync_pipeline.definitions", "-j", "credit_sync_job",
           "--tags", json.dumps({"creditsync/trigger": "periodic"})]
    wall, rss, _, stderr, code = _child(cmd, env)
    if code != 0:
        tail = "\n".join(stderr.strip().splitlines()[-8:])
        raise RuntimeError(f"dagster job execute exited {code}:\n{tail}")
    sizes = tree_bytes(home)
    report = sizes.pop(REPORTS, 0)
    grown = {k: v - before_by_place.get(k, 0) for k, v in sizes.items() if v != before_by_place.get(k, 0)}
    return {"wall": wall, "peak_rss_mb": rss, "stored_bytes": sum(sizes.values()) - before,
            "stored_by_place": grown, "report_bytes": report, **run_stats(env0)}


def run_stats(env: dict[str, str]) -> dict[str, Any]:
    """The run's own figures from its instance: the step's duration, events stored."""
    code = (
        "import json; from dagster import DagsterInstance\n"
        "i = DagsterInstance.get(); r = i.get_runs(limit=1)[0]; s = i.get_run_stats(r.run_id)\n"
        "steps = i.get_run_step_stats(r.run_id)\n"
        "from dagster import AssetKey\n"
        "m = i.get_latest_materialization_event(AssetKey('credit_corrections')).asset_materialization.metadata\n"
        "print(json.dumps({'run_s': (s.end_time or 0) - (s.launch_time or s.start_time or 0),"
        " 'step_s': sum((x.end_time or 0) - (x.start_time or 0) for x in steps),"
        " 'events': len(i.all_logs(r.run_id)), 'stages': m['timings'].value}))"
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(args: argparse.Namespace) -> dict[str, Any]:
    anchor = datetime.now(timezone.utc).date()
    load_before = os.getloadavg()
    name, url = bfs.create_database(args.database_url)
    sim = None
    try:
        log(f"seeding {args.n:,} instances into {name} (bulk load)")
        data = bfs.seed_database(url, args.n, args.drift, args.seed, anchor)
        log(f"starting the billing simulator ({args.n:,} records)")
        sim, base_url = bfs.start_simulator(args.n, args.seed, anchor)
        httpx.get(f"{base_url}/v1/subscriptions", params={"limit": 1},
                  headers={"Authorization": f"Bearer {bfs.TOKEN}"}).raise_for_status()  # warm-up

        pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
        for rep in range(args.repeat):
            # odd repetitions run the job first: neither side always gets the warmer caches
            order = ("fix", "job") if rep % 2 == 0 else ("job", "fix")
            done: dict[str, dict[str, Any]] = {}
            for k, who in enumerate(order):
                if rep or k:
                    log("restoring the drifted rows")
                    bfs.restore_drift(url, data)
                before = audit_count(url)
                if who == "fix":
                    log(f"[{rep + 1}/{args.repeat}] creditsync fix --json (child process)")
                    done[who] = bfs.run_fix(url, base_url, args.page_size, False, None)
                else:
                    log(f"[{rep + 1}/{args.repeat}] dagster job execute -j credit_sync_job (child process, fresh DAGSTER_HOME)")
                    with tempfile.TemporaryDirectory(prefix="creditsync-dagster-home-") as tmp:
                        done[who] = run_dagster_job(url, base_url, args.page_size, Path(tmp) / "home")
                count = audit_count(url) - before
                if count != data.drifted:
                    raise RuntimeError(f"{who} corrected {count} row(s); expected {data.drifted}")
            pairs.append((done["fix"], done["job"]))
        version = bfs.server_version(url)
    finally:
        bfs.stop_process(sim)
        bfs.drop_database(args.database_url, name)

    # the repetition with the median ratio is reported; all are listed
    fix, job = sorted(pairs, key=lambda p: p[1]["wall"] / p[0]["wall"])[len(pairs) // 2]
    ratio = job["wall"] / fix["wall"]
    stored_mb = max(j["stored_bytes"] for _, j in pairs) / 1e6
    return {
        "n": args.n,
        "drift": args.drift,
        "corrections": data.drifted,
        "machine": {**bfs.machine(), "database": version,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join(["benchmarks/bench_dagster_job.py"] + sys.argv[1:]),
        "fix": {"wall_s": round(fix["wall"], 3), "peak_rss_mb": round(fix["peak_rss_mb"], 1),
                "stages_s": {k: round(v, 3) for k, v in fix["report"]["timings"].items()}},
        "dagster_job": {"wall_s": round(job["wall"], 3), "peak_rss_mb": round(job["peak_rss_mb"], 1),
                        "stored_mb_excluding_report": round(stored_mb, 2),
                        "stored_by_place_kb": {k: round(v / 1e3, 1) for k, v in sorted(job["stored_by_place"].items())},
                        "report_mb": round(job["report_bytes"] / 1e6, 2),
                        "run_s": round(job["run_s"], 3), "step_s": round(job["step_s"], 3),
                        "events_stored": job["events"], "stages_s": job["stages"]},
        "ratio_job_to_fix": round(ratio, 2),
        "repetitions": [{"fix_s": round(f["wall"], 2), "job_s": round(j["wall"], 2), "ratio": round(j["wall"] / f["wall"], 2)}
                        for f, j in pairs],
        "targets": {"ratio_max": TARGET_RATIO, "ratio_met": ratio <= TARGET_RATIO,
                    "stored_mb_max": TARGET_STORAGE_MB, "storage_met": stored_mb <= TARGET_STORAGE_MB},
    }


def render(r: dict[str, Any]) -> str:
    m, fx, jb, t = r["machine"], r["fix"], r["dagster_job"], r["targets"]
    ok = lambda flag: "met" if flag else "NOT MET"  # noqa: E731
    return "\n".join([
        f"credit_sync_job vs creditsync fix: {r['n']:,} instances, {r['drift']:.1%} drift ({r['corrections']:,} corrections)",
        f"machine: {m['cores']} cores (shared), {m['memory_gib']} GiB RAM, {m['cpu']}; {m['database']}, "
        f"Python {m['python']}; load average {m['load_average_before'][0]} before, {m['load_average_after'][0]} after",
        *([("repetitions (fix / job = ratio; the median one is shown): "
             + ", ".join(f"{x['fix_s']:.2f}/{x['job_s']:.2f} = {x['ratio']:.2f}x" for x in r["repetitions"]))]
          if len(r["repetitions"]) > 1 else []),
        "",
        "| whole process | wall s | peak RSS MB |",
        "|---|---:|---:|",
        f"| creditsync fix --json | {fx['wall_s']:.2f} | {fx['peak_rss_mb']:.0f} |",
        f"| dagster job execute -j credit_sync_job | {jb['wall_s']:.2f} | {jb['peak_rss_mb']:.0f} |",
        f"| ... of which the run (start to success, per the instance) | {jb['run_s']:.2f} | |",
        f"| ... of which the credit_sync step | {jb['step_s']:.2f} | |",
        "",
        "| run_full_sync stage, s | " + " | ".join(fx["stages_s"]) + " |",
        "|---|" + "---:|" * len(fx["stages_s"]),
        "| in creditsync fix | " + " | ".join(f"{v:.2f}" for v in fx["stages_s"].values()) + " |",
        "| in the credit_sync step | " + " | ".join(f"{jb['stages_s'].get(k, 0):.2f}" for k in fx["stages_s"]) + " |",
        "",
        "| result | value | target |",
        "|---|---:|---|",
        f"| job / fix wall | {r['ratio_job_to_fix']:.2f}x | <= {t['ratio_max']}x: {ok(t['ratio_met'])} |",
        f"| written under DAGSTER_HOME (not the report) | {jb['stored_mb_excluding_report']:.2f} MB | "
        f"<= {t['stored_mb_max']:.0f} MB: {ok(t['storage_met'])} |",
        f"| the mismatch report (CSV) | {jb['report_mb']:.2f} MB | |",
        f"events stored by the run: {jb['events_stored']:,}; grown: " + ", ".join(f"{k} {v:,.0f} kB" for k, v in jb["stored_by_place_kb"].items()),
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="instances (and billing records)")
    parser.add_argument("--drift", type=float, default=0.05, help="share of instances that are wrong (<= 10%%)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--database-url", default=bfs.DEFAULT_PG_ADMIN_URL,
                        help="a PostgreSQL server URL allowed to CREATE/DROP DATABASE (default: the local one)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--page-size", type=int, default=1000, help="billing list page size")
    parser.add_argument("--repeat", type=int, default=1,
                        help="measure both this many times (alternating which goes first); report the median ratio")
    args = parser.parse_args(argv)
    if args.n < 1 or not 0 <= args.drift <= 0.1 or args.repeat < 1:
        parser.error("--n must be >= 1 and --drift between 0 and 0.1 (the guard rails refuse more)")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
