"""Benchmark of the webhook receivers: delivery -> instance corrected, through ``creditsync serve``.

SPEC "Real-time nets": right after the 2xx the receiving process syncs the event's
instance; target p95 <= 1 s. For each of ``--events`` deliveries (one at a time,
``--interval`` seconds apart) to the receiver of ``--provider`` (generic, wix, stripe),
this measures

* **answered**: POST sent -> the 2xx received (Wix waits 1.25 s for it);
* **corrected**: POST sent -> the instance's row holds the plan billing says (polled in
  the app database every 5 ms);

and prints p50 / p95 / max of each. Every instance starts on the free plan while billing
says it bought ``pro``, so every delivery must end in a correction.

Set-up: an app database (a temporary SQLite file, or ``--database-url`` naming a server on
which a throw-away database is created and dropped), the provider's simulator in this
process (its own threads; ``serve`` reaches it over HTTP), and ``creditsync serve`` as its
own process with the provider's settings -- no Dagster daemon anywhere.

    .venv/bin/python benchmarks/receiver_latency.py --provider wix          # table
    .venv/bin/python benchmarks/receiver_latency.py --provider stripe --json

Not a test: nothing is asserted; the exit code is 1 when a delivery was not corrected
within ``--timeout``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack, contextmanager
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterator

import httpx
import sqlalchemy as sa

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from creditsync_pipeline import appdb  # noqa: E402
from creditsync_pipeline.demo import PLANS  # noqa: E402

TOKEN = "bench-token-not-a-secret"
APP_SECRET = "bench-app-secret-not-a-secret"
WEBHOOK_SECRET = "bench-webhook-secret-not-a-secret"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def records(ids: list[str]) -> list[dict[str, Any]]:
    """Billing: every instance bought ``pro`` (the app still has it on free)."""
    now = datetime.now(timezone.utc)
    return [{"instance_id": i, "plan_id": "pro", "status": "active",
             "current_period_end": (now + timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ"),
             "updated_at": (now - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")} for i in ids]


@contextmanager
def app_database(url: str | None, workdir: Path) -> Iterator[str]:
    """A fresh app database: a SQLite file, or a throw-away database on the named server."""
    if url is None:
        yield f"sqlite:///{workdir / 'app.db'}"
        return
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    name = f"creditsync_bench_recv_{uuid.uuid4().hex[:8]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    try:
        yield admin.url.set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            else:
                conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
        admin.dispose()


class Provider:
    """The provider's simulator (in this process) and how to sign a delivery for it."""

    def __init__(self, name: str, ids: list[str], workdir: Path) -> None:
        self.name = name
        self.env: dict[str, str] = {"BILLING_PROVIDER": name}
        if name == "generic":
            from creditsync_pipeline.simulators.generic import BillingSimulator

            self.sim = BillingSimulator(records(ids), token=TOKEN).start()
            self.env.update(BILLING_API_URL=self.sim.base_url, BILLING_API_TOKEN=TOKEN,
                            CREDITSYNC_WEBHOOK_SECRET=WEBHOOK_SECRET)
            self.path = "/api/billing/webhook"
        elif name == "wix":
            from creditsync_pipeline.server.wix import generate_key_pair
            from creditsync_pipeline.simulators.wix import WixSimulator, instances_from_records

            self.private_key, public_key = generate_key_pair()
            self.sim = WixSimulator(instances_from_records(records(ids), installed=ids),
                                    app_id="bench-app", app_secret="bench-wix-secret").start()
            (workdir / "wix.pem").write_text(public_key)
            self.env.update(WIX_API_BASE=self.sim.base_url, WIX_APP_ID="bench-app", WIX_APP_SECRET="bench-wix-secret",
                            WIX_WEBHOOK_PUBLIC_KEY=str(workdir / "wix.pem"))
            self.path = "/api/billing/webhook/wix"
        elif name == "stripe":
            from creditsync_pipeline.simulators.stripe import StripeSimulator

            self.sim = StripeSimulator.from_records(records(ids), api_key="sk_test_bench", metadata_on="subscription").start()
            self.subs = {s.metadata.get("instance_id"): s.id for s in self.sim.subscriptions().values()}
            self.env.update(STRIPE_API_BASE=self.sim.base_url, STRIPE_API_KEY="sk_test_bench",
                            STRIPE_WEBHOOK_SECRET=WEBHOOK_SECRET)
            self.path = "/api/billing/webhook/stripe"
        else:
            raise SystemExit(f"unknown provider {name!r}")

    def delivery(self, instance_id: str, n: int) -> tuple[bytes, dict[str, str]]:
        if self.name == "generic":
            from creditsync_pipeline.server.webhooks import SIGNATURE_HEADER, sign_webhook

            body = json.dumps({"event_id": f"evt_bench_{n}", "type": "subscription.updated",
                               "instance_id": instance_id}).encode()
            return body, {SIGNATURE_HEADER: sign_webhook(WEBHOOK_SECRET, body), "Content-Type": "application/json"}
        if self.name == "wix":
            from creditsync_pipeline.server.wix import sign_wix_webhook

            body = sign_wix_webhook(self.private_key, event_type="PaidPlanPurchased", instance_id=instance_id,
                                    data={"vendorProductId": "pro", "operationTimeStamp": n})
            return body.encode(), {"Content-Type": "text/plain"}
        from creditsync_pipeline.server.stripe import sign_stripe_payload

        body = self.sim.event(self.subs[instance_id], "customer.subscription.updated", event_id=f"evt_bench_{n}")
        return body, {"Stripe-Signature": sign_stripe_payload(WEBHOOK_SECRET, body), "Content-Type": "application/json"}

    def close(self) -> None:
        self.sim.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--provider", choices=("generic", "wix", "stripe"), default="generic")
    parser.add_argument("--events", type=int, default=30, help="deliveries (default 30)")
    parser.add_argument("--interval", type=float, default=0.3, help="seconds between deliveries (default 0.3)")
    parser.add_argument("--timeout", type=float, default=20.0, help="seconds to wait for one correction")
    parser.add_argument("--database-url", help="a server URL that may CREATE DATABASE (default: a SQLite file)")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    args = parser.parse_args(argv)

    ids = [f"bench-{n:04d}" for n in range(args.events)]
    with tempfile.TemporaryDirectory(prefix="creditsync-recv-") as tmp, ExitStack() as stack:
        workdir = Path(tmp)
        db_url = stack.enter_context(app_database(args.database_url, workdir))
        engine = appdb.create_engine_from_url(db_url)
        stack.callback(engine.dispose)
        appdb.init_db(engine)
        appdb.upsert_plans(engine, PLANS)
        old = datetime.now(timezone.utc) - timedelta(days=2)
        appdb.insert_instances(engine, [{"instance_id": i, "plan_id": "free", "credits_total": 100,
                                         "created_at": old, "updated_at": old} for i in ids])
        provider = Provider(args.provider, ids, workdir)
        stack.callback(provider.close)

        env = dict(os.environ, DATABASE_URL=db_url, CREDITSYNC_APP_SECRET=APP_SECRET, **provider.env)
        log = open(workdir / "serve.log", "w")
        stack.callback(log.close)
        # --port 0: serve binds a free port itself and says which (no race with other processes)
        serve = subprocess.Popen([sys.executable, "-m", "creditsync_pipeline.cli", "serve", "--port", "0"],
                                 env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)

        def stop_serve() -> None:
            serve.terminate()
            try:
                serve.wait(10)
            except subprocess.TimeoutExpired:
                serve.kill()

        stack.callback(stop_serve)
        deadline = time.monotonic() + 60
        client = None
        while client is None:
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", (workdir / "serve.log").read_text())
            if match:
                client = stack.enter_context(httpx.Client(base_url=match.group(1), timeout=10))
            elif serve.poll() is not None or time.monotonic() > deadline:
                print((workdir / "serve.log").read_text()[-2000:], file=sys.stderr)
                raise SystemExit("creditsync serve did not come up")
            else:
                time.sleep(0.1)
        while client.get("/healthz").status_code != 200:
            time.sleep(0.1)

        plan_of = sa.select(appdb.instances.c.plan_id).where(appdb.instances.c.instance_id == sa.bindparam("iid"))
        answered: list[float] = []
        corrected: list[float] = []
        missed = 0
        for n, iid in enumerate(ids):
            body, headers = provider.delivery(iid, n)
            t0 = time.perf_counter()
            response = client.post(provider.path, content=body, headers=headers)
            answered.append(time.perf_counter() - t0)
            if response.status_code != 200:
                raise SystemExit(f"delivery {n} answered HTTP {response.status_code}: {response.text[:200]}")
            while True:
                with engine.connect() as conn:
                    if conn.execute(plan_of, {"iid": iid}).scalar_one() == "pro":
                        corrected.append(time.perf_counter() - t0)
                        break
                if time.perf_counter() - t0 > args.timeout:
                    missed += 1
                    break
                time.sleep(0.005)
            time.sleep(args.interval)

    def stats(values: list[float]) -> dict[str, float]:
        return {"p50_s": round(percentile(values, 0.5), 4), "p95_s": round(percentile(values, 0.95), 4),
                "max_s": round(max(values), 4) if values else float("nan")}

    result = {
        "provider": args.provider, "events": args.events, "database": db_url.split(":", 1)[0],
        "answered": stats(answered), "corrected": stats(corrected), "missed": missed,
        "target_p95_s": 1.0, "machine": f"{platform.machine()}, {os.cpu_count()} CPU, Python {platform.python_version()}",
    }
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"receiver latency, provider {args.provider}, {args.events} deliveries, {result['database']}")
        print(f"  {'':<26}{'p50':>9}{'p95':>9}{'max':>9}")
        for label, key in (("POST -> 2xx", "answered"), ("POST -> instance corrected", "corrected")):
            s = result[key]
            print(f"  {label:<26}{s['p50_s']:>8.3f}s{s['p95_s']:>8.3f}s{s['max_s']:>8.3f}s")
        print(f"  target: corrected p95 <= 1 s; missed {missed}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
