"""Stripe full-sync benchmark: ``creditsync fix`` with ``BILLING_PROVIDER=stripe`` against its I/O floor.

One command, one run, the same data for every number::

    .venv/bin/python benchmarks/bench_stripe_sync.py --n 100000 [--json] [--skip-library]

What it does:

1. creates a throw-away PostgreSQL database (dropped at the end) and seeds N instances with
   COPY, ``drift`` of them wrong (the seeding of ``bench_full_sync.py``, reused);
2. starts the Stripe simulator in its own process (``python -m
   creditsync_pipeline.simulators.stripe --generate N``: the same records, as Stripe customers
   and subscriptions in the current API shape, customers expanded: ~3.5 KB a subscription);
3. measures the I/O floor: every list page fetched by a bare httpx client (one pooled
   connection, nothing parsed beyond the cursor, which is cut out of the bytes) plus
   ``COPY instances TO STDOUT``;
4. runs ``creditsync fix --json`` in a child process, exactly as an operator would, and takes
   the per-stage timings from its report and its peak RSS from ``wait4``;
5. measures the billing walk alone, in this process: :class:`StripeProvider` (raw httpx +
   orjson, the next page fetched while this one is mapped) against the official ``stripe``
   library's auto-paging list walk reading the same fields (unless ``--skip-library``).

Target: the fix's total <= 2x the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_full_sync as full  # noqa: E402 - the seeding, floors and child-process run are shared

from creditsync_pipeline.billing.stripe import API_VERSION, StripeProvider  # noqa: E402
from creditsync_pipeline.simulators.generic import SYNTHETIC_PLANS  # noqa: E402

KEY = "sk_test_bench_0123456789abcdef"
TARGET_RATIO = 2.0
PLAN_IDS = [p for p, _, _ in SYNTHETIC_PLANS]
_LIST_PARAMS = {"status": "all", "limit": 100, "expand[]": "data.customer"}
_OBJECT_MARK = b'","object":"subscription"'
_ID_MARK = b'{"id":"'


def start_simulator(n: int, seed: int, anchor: Any) -> tuple[Any, str]:
    import re
    import subprocess

    env = {**os.environ, "STRIPE_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "creditsync_pipeline.simulators.stripe", "--port", "0", "--generate", str(n),
         "--seed", str(seed), "--anchor", anchor.isoformat()],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env, cwd=REPO,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (http://\S+)", line)
    if not match:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"Stripe simulator did not start: {line!r}")
    return proc, match.group(1)


def last_subscription_id(body: bytes) -> str:
    """The id of a page's last subscription, cut out of the bytes (the simulator's key order)."""
    at = body.rfind(_OBJECT_MARK)
    start = body.rfind(_ID_MARK, 0, at)
    if at < 0 or start < 0:
        raise RuntimeError("no subscription id found in a page")
    return body[start + len(_ID_MARK):at].decode("ascii")


def raw_fetch(base_url: str) -> dict[str, Any]:
    """Every list page, bytes only: the cursor (last id) and has_more are cut out of the body."""
    pages = size = 0
    c0, t0 = time.process_time(), time.perf_counter()
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}", "Stripe-Version": API_VERSION},
                      timeout=60) as client:
        params = dict(_LIST_PARAMS)
        while True:
            body = client.get("/v1/subscriptions", params=params).raise_for_status().content
            pages += 1
            size += len(body)
            if not body.rstrip().endswith(b"}") or b'"has_more":true' not in body[-200:]:
                break
            params["starting_after"] = last_subscription_id(body)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "pages": pages, "bytes": size}


def provider_walk(base_url: str) -> dict[str, Any]:
    c0, t0 = time.process_time(), time.perf_counter()
    with StripeProvider(KEY, base_url=base_url) as provider:
        snapshot = provider.fetch_all(plan_ids=PLAN_IDS)
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "records": len(snapshot.records),
            "pages": snapshot.pages}


def library_walk(base_url: str) -> dict[str, Any]:
    """The official library's auto-paging walk, reading the fields the provider maps."""
    import stripe

    def metadata(obj: Any, key: str) -> Any:
        md = obj["metadata"] if "metadata" in obj else None
        return md[key] if md is not None and key in md else None

    client = stripe.StripeClient(KEY, base_addresses={"api": base_url}, stripe_version=API_VERSION,
                                 max_network_retries=2)
    rows = 0
    c0, t0 = time.process_time(), time.perf_counter()
    listing = client.v1.subscriptions.list(params={"status": "all", "limit": 100, "expand": ["data.customer"]})
    for sub in listing.auto_paging_iter():
        customer = sub["customer"]
        instance = metadata(sub, "instance_id") or (None if isinstance(customer, str) else metadata(customer, "instance_id"))
        item = sub["items"]["data"][0]
        price = item["price"]
        _ = (instance, price["lookup_key"] or price["id"], sub["status"], sub["created"],
             item["current_period_end"] if "current_period_end" in item else None,
             sub["cancel_at_period_end"], sub["cancel_at"], sub["ended_at"])
        rows += 1
    return {"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0, "records": rows,
            "http_client": client._requestor._client.name}


def run(args: argparse.Namespace) -> dict[str, Any]:
    anchor = datetime.now(timezone.utc).date()
    load_before = os.getloadavg()
    name, url = full.create_database(args.pg_admin_url)
    sim = None
    try:
        full.log(f"seeding {args.n:,} instances into {name} (COPY)")
        data = full.seed_database(url, args.n, args.drift, args.seed, anchor)
        full.log(f"starting the Stripe simulator ({args.n:,} subscriptions)")
        sim, base_url = start_simulator(args.n, args.seed, anchor)
        full.log("I/O floor: raw page fetch + COPY out")
        fetch_floor = raw_fetch(base_url)
        copy_floor = full.copy_out(url)
        full.log("creditsync fix --json (child process, BILLING_PROVIDER=stripe)")
        os.environ.update({"BILLING_PROVIDER": "stripe", "STRIPE_API_KEY": KEY, "STRIPE_API_BASE": base_url})
        fix = full.run_fix(url, base_url, 1000, False, args.profile)
        report = fix["report"]
        if report["applied"] != data.drifted or report["remaining"] != 0 or report["mismatch_count"] != data.drifted:
            raise RuntimeError(
                f"wrong outcome: applied {report['applied']}, mismatches {report['mismatch_count']}, "
                f"remaining {report['remaining']}; expected {data.drifted} drifted instance(s)"
            )
        full.log("billing walk alone: StripeProvider (raw httpx + orjson)")
        walk_floor = raw_fetch(base_url)
        provider = provider_walk(base_url)
        library = None
        if not args.skip_library:
            full.log("billing walk alone: the official stripe library (auto-paging)")
            library = library_walk(base_url)
        version = full.server_version(url)
    finally:
        full.stop_process(sim)
        full.drop_database(args.pg_admin_url, name)

    timings = report["timings"]
    stages = {k: timings.get(k, 0.0) for k in ("fetch", "read", "diff", "write", "verify")}
    total = timings.get("total", sum(stages.values()))
    floor = fetch_floor["seconds"] + copy_floor["seconds"]
    result: dict[str, Any] = {
        "n": args.n,
        "drift": args.drift,
        "corrections": data.drifted,
        "machine": {**full.machine(), "postgresql": version,
                    "load_average_before": [round(x, 2) for x in load_before],
                    "load_average_after": [round(x, 2) for x in os.getloadavg()]},
        "command": " ".join(["benchmarks/bench_stripe_sync.py"] + sys.argv[1:]),
        "fix": {
            "stages_s": {k: round(v, 3) for k, v in stages.items()},
            "total_s": round(total, 3),
            "process_wall_s": round(fix["wall"], 3),
            "applied": report["applied"],
            "billing_records": report["billing_records"],
            "unassigned_records": report.get("unassigned_records"),
        },
        "io_floor": {
            "fetch_raw_s": round(fetch_floor["seconds"], 3),
            "pages": fetch_floor["pages"],
            "fetch_mb": round(fetch_floor["bytes"] / 1e6, 1),
            "copy_out_s": round(copy_floor["seconds"], 3),
            "total_s": round(floor, 3),
        },
        "ratio_to_floor": round(total / floor, 2),
        "fetch_stage_to_raw_fetch": round(stages["fetch"] / fetch_floor["seconds"], 2),
        "peak_rss_mb": round(fix["peak_rss_mb"], 1),
        "walk": {
            "raw_fetch_s": round(walk_floor["seconds"], 3),
            "raw_fetch_cpu_s": round(walk_floor["cpu"], 3),
            "provider_s": round(provider["seconds"], 3),
            "provider_cpu_s": round(provider["cpu"], 3),
            "provider_records": provider["records"],
            "provider_to_raw": round(provider["seconds"] / walk_floor["seconds"], 2),
            **({
                "library_s": round(library["seconds"], 3),
                "library_cpu_s": round(library["cpu"], 3),
                "library_records": library["records"],
                "library_http_client": library["http_client"],
                "library_to_provider": round(library["seconds"] / provider["seconds"], 2),
                "library_to_raw": round(library["seconds"] / walk_floor["seconds"], 2),
            } if library else {}),
        },
        "targets": {"ratio_to_floor_max": TARGET_RATIO, "ratio_met": total / floor <= TARGET_RATIO},
    }
    return result


def render(r: dict[str, Any]) -> str:
    m, fx, fl, w = r["machine"], r["fix"], r["io_floor"], r["walk"]
    met = "met" if r["targets"]["ratio_met"] else "NOT MET"
    lines = [
        f"creditsync full sync, BILLING_PROVIDER=stripe: {r['n']:,} instances and subscriptions, "
        f"{r['drift']:.1%} drift ({r['corrections']:,} corrections)",
        f"machine: {m['cores']} cores, {m['memory_gib']} GiB RAM, {m['cpu']}; PostgreSQL {m['postgresql']}, "
        f"Python {m['python']}; load average {m['load_average_before'][0]} before, {m['load_average_after'][0]} after",
        "",
        "| creditsync fix, stage | seconds |",
        "|---|---:|",
        *(f"| {k} | {v:.2f} |" for k, v in fx["stages_s"].items()),
        f"| **total** (wall time of the run; the read overlaps the fetch) | **{fx['total_s']:.2f}** |",
        f"| process wall (incl. interpreter start, imports, JSON output) | {fx['process_wall_s']:.2f} |",
        "",
        "| I/O floor | seconds | |",
        "|---|---:|---|",
        f"| fetch every list page raw | {fl['fetch_raw_s']:.2f} | {fl['pages']:,} pages, {fl['fetch_mb']} MB |",
        f"| COPY instances TO STDOUT | {fl['copy_out_s']:.2f} | |",
        f"| **floor** | **{fl['total_s']:.2f}** | |",
        "",
        "| result | value | target |",
        "|---|---:|---|",
        f"| total / I/O floor | {r['ratio_to_floor']:.2f}x | <= {r['targets']['ratio_to_floor_max']:.0f}x: {met} |",
        f"| fetch stage / raw fetch | {r['fetch_stage_to_raw_fetch']:.2f}x | |",
        f"| peak RSS of the fix process | {r['peak_rss_mb']:.0f} MB | |",
        "",
        "| billing walk alone (this process) | seconds | / raw fetch | client CPU s |",
        "|---|---:|---:|---:|",
        f"| raw fetch (bytes, cursor cut out) | {w['raw_fetch_s']:.2f} | 1.00x | {w['raw_fetch_cpu_s']:.2f} |",
        f"| StripeProvider.fetch_all (httpx + orjson, pipelined) | {w['provider_s']:.2f} | {w['provider_to_raw']:.2f}x "
        f"| {w['provider_cpu_s']:.2f} |",
    ]
    if "library_s" in w:
        lines.append(
            f"| official stripe library, auto_paging_iter ({w['library_http_client']}) | {w['library_s']:.2f} | "
            f"{w['library_to_raw']:.2f}x ({w['library_to_provider']:.1f}x the provider) | {w['library_cpu_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000, help="instances (and Stripe subscriptions)")
    parser.add_argument("--drift", type=float, default=0.05, help="share of instances that are wrong")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the tables")
    parser.add_argument("--pg-admin-url", default=full.DEFAULT_PG_ADMIN_URL,
                        help="a PostgreSQL URL allowed to CREATE/DROP DATABASE")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--skip-library", action="store_true", help="do not measure the official stripe library")
    parser.add_argument("--profile", metavar="FILE", help="run the fix under pyinstrument, text report to FILE")
    args = parser.parse_args(argv)
    if args.n < 1 or not 0 <= args.drift <= 1:
        parser.error("--n must be >= 1 and --drift between 0 and 1")
    result = run(args)
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
