"""The embedded demo: SQLite app DB, bundled billing simulator, Dagster UI.

``creditsync demo`` seeds a realistic app database (paying instances stuck
on the free plan, wrong allowances, canceled-but-paid-through, expired),
serves the matching billing data from the simulator, runs a first full
reconciliation so the UI has a mismatch report to show, then starts
``dagster dev`` (webserver + daemon) with the pipeline loaded.
"""

from __future__ import annotations

import json
import os
import shlex
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import yaml

from . import appdb

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKEN = "demo-billing-token"

PLANS = [
    {"plan_id": "free", "credits": 100, "is_free": True},
    {"plan_id": "starter", "credits": 1000, "is_free": False},
    {"plan_id": "pro", "credits": 5000, "is_free": False},
    {"plan_id": "team", "credits": 20000, "is_free": False},
]
CREDITS = {p["plan_id"]: p["credits"] for p in PLANS}


@dataclass(frozen=True)
class DemoData:
    """A seeded data set and the end state a correct fix must reach."""

    plans: list[dict]
    instances: list[dict]
    records: list[dict]
    #: instance_id -> (plan_id, credits_total) after a correct full fix
    expected: dict[str, tuple[str, int]]


def demo_dataset(now: datetime, seed: int = 42, size: int = 200) -> DemoData:
    """A deterministic app DB + billing data set with every kind of drift.

    15 of 200 instances need a correction (7.5 %, under the 10 % guard), one
    is entitled to an unknown plan, one billing record names no instance.
    """
    rng = random.Random(seed)
    iso = lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    instances: list[dict] = []
    records: list[dict] = []
    expected: dict[str, tuple[str, int]] = {}
    counter = iter(range(1, 10_000))

    def add(iid: str | None, row_plan: str, row_credits: int, record: dict | None, expect: tuple[str, int] | None) -> None:
        iid = iid or f"site-{next(counter):04d}"
        used = rng.randint(0, max(0, row_credits))
        instances.append({"instance_id": iid, "plan_id": row_plan, "credits_total": row_credits, "credits_used": used})
        if record is not None:
            records.append({"instance_id": iid, **record})
        if expect is not None:
            expected[iid] = expect

    def rec(plan: str, status: str = "active", period_days: int | None = 20, age_days: int = 3) -> dict:
        end = None if period_days is None else iso(now + timedelta(days=period_days))
        return {
            "plan_id": plan,
            "status": status,
            "current_period_end": end,
            "updated_at": iso(now - timedelta(days=age_days, minutes=rng.randint(0, 600))),
            "customer_email": "redacted@example.com",  # extra fields are ignored
        }

    # The flagship case: bought pro (5000), stuck at the free 100.
    add("abc123", "free", 100, rec("pro", age_days=1), ("pro", 5000))
    for plan in ["pro", "team", "starter", "pro", "starter", "team", "pro"]:  # more stuck on free
        add(None, "free", 100, rec(plan, rng.choice(["active", "trialing", "past_due"])), (plan, CREDITS[plan]))
    for plan, wrong in [("pro", 100), ("team", 5000), ("starter", 500)]:  # plan right, allowance wrong
        add(None, plan, wrong, rec(plan), (plan, CREDITS[plan]))
    for plan in ["pro", "team", "pro"]:  # expired, still on a paid plan -> free
        add(None, plan, CREDITS[plan], rec(plan, "expired", period_days=-10, age_days=10), ("free", 100))
    # Canceled but paid through the period; the app downgraded too early.
    add(None, "free", 100, rec("pro", "canceled", period_days=12), ("pro", 5000))
    # Entitled to a plan the app does not sell (reported, never written).
    add(None, "free", 100, rec("enterprise"), None)
    # Correct rows: paying, canceled-in-period, expired-and-free, plain free.
    for _ in range(50):
        plan = rng.choice(["starter", "pro", "team"])
        add(None, plan, CREDITS[plan], rec(plan, rng.choice(["active", "active", "trialing", "past_due"])), (plan, CREDITS[plan]))
    for _ in range(4):
        add(None, "pro", 5000, rec("pro", "canceled", period_days=rng.randint(1, 25)), ("pro", 5000))
    for _ in range(5):
        add(None, "free", 100, rec("pro", "expired", period_days=-rng.randint(5, 90), age_days=30), ("free", 100))
    while len(instances) < size:
        add(None, "free", 100, None, ("free", 100))
    # A purchase for an instance the app never provisioned (missing_instance).
    records.append({"instance_id": "deleted-site-9", **rec("team")})
    return DemoData(plans=PLANS, instances=instances, records=records, expected=expected)


def seed_database(url: str, data: DemoData) -> None:
    """Create the schema and load the demo rows (the database must be empty)."""
    engine = appdb.create_engine_from_url(url)
    try:
        appdb.init_db(engine)
        appdb.upsert_plans(engine, data.plans)
        appdb.insert_instances(engine, data.instances)
    finally:
        engine.dispose()


def free_port(preferred: int) -> int:
    """``preferred`` if it is free on 127.0.0.1, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise RuntimeError("no free port")


def write_dagster_home(home: Path) -> None:
    """The repo's dagster.yaml without its PostgreSQL storage: SQLite under DAGSTER_HOME."""
    home.mkdir(parents=True, exist_ok=True)
    config = yaml.safe_load((REPO_ROOT / "dagster.yaml").read_text()) or {}
    config.pop("storage", None)
    (home / "dagster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


#: the demo's billing providers (``creditsync demo --provider``)
PROVIDERS = ("generic", "wix", "stripe")
DEMO_WIX_APP_ID = "demo-wix-app"
DEMO_WIX_APP_SECRET = "demo-wix-app-secret"
DEMO_STRIPE_KEY = "sk_test_demo_creditsync"
DEMO_STRIPE_WEBHOOK_SECRET = "whsec_demo_creditsync"


def billing_side(provider: str, data: DemoData, root: Path) -> tuple[list[str], dict[str, str]]:
    """(the simulator's command line after ``--port N``, the settings creditsync needs) for ``provider``.

    Every provider serves the same demo data set in its own shape, so the same drift shows.
    """
    if provider == "generic":
        records_file = root / "billing_records.json"
        records_file.write_text(json.dumps(data.records, indent=1))
        return (["-m", "creditsync_pipeline.simulators.generic", "--records", str(records_file)],
                {"BILLING_PROVIDER": "generic", "BILLING_API_TOKEN": DEMO_TOKEN})
    if provider == "wix":
        from .server.wix import generate_key_pair
        from .simulators.wix import demo_instances

        instances_file = root / "wix_instances.json"
        instances_file.write_text(json.dumps(demo_instances(data), indent=1))
        private_key, public_key = generate_key_pair()
        (root / "wix_webhook_private_key.pem").write_text(private_key)  # to sign demo deliveries
        (root / "wix_webhook_public_key.pem").write_text(public_key)
        return (["-m", "creditsync_pipeline.simulators.wix", "--instances", str(instances_file)],
                {"BILLING_PROVIDER": "wix", "WIX_APP_ID": DEMO_WIX_APP_ID, "WIX_APP_SECRET": DEMO_WIX_APP_SECRET,
                 "WIX_WEBHOOK_PUBLIC_KEY": str(root / "wix_webhook_public_key.pem")})
    if provider == "stripe":
        records_file = root / "billing_records.json"
        records_file.write_text(json.dumps(data.records, indent=1))
        return (["-m", "creditsync_pipeline.simulators.stripe", "--records", str(records_file)],
                {"BILLING_PROVIDER": "stripe", "STRIPE_API_KEY": DEMO_STRIPE_KEY,
                 "STRIPE_WEBHOOK_SECRET": DEMO_STRIPE_WEBHOOK_SECRET})
    raise ValueError(f"unknown demo provider {provider!r}; expected one of {', '.join(PROVIDERS)}")


#: the setting that points creditsync at each provider's simulator
_BASE_SETTING = {"generic": "BILLING_API_URL", "wix": "WIX_API_BASE", "stripe": "STRIPE_API_BASE"}


def start_simulator(args: list[str], port: int, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, *args, "--port", str(port)], env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"billing simulator exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/_sim/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("billing simulator did not start within 20 s")


def main(port: int = 3000, ui: bool = True, root: Path | None = None, provider: str = "generic") -> int:
    """Seed, serve billing (``provider``'s simulator), run the first sync, then run the Dagster UI."""
    # SIGTERM (a service manager, `timeout`) stops the children as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = Path(root or os.environ.get("CREDITSYNC_DEMO_DIR") or Path.cwd() / ".demo").resolve()
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    data = demo_dataset(datetime.now(timezone.utc))
    db_url = f"sqlite:///{root / 'app.db'}"
    seed_database(db_url, data)
    sim_args, billing_env = billing_side(provider, data, root)
    write_dagster_home(root / "dagster_home")

    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": db_url,
            "DAGSTER_HOME": str(root / "dagster_home"),
            "CREDITSYNC_APP_SECRET": env.get("CREDITSYNC_APP_SECRET", "demo-app-secret"),
            **billing_env,
        }
    )
    sim, sim_url = start_simulator(sim_args, free_port(8765), env)
    env[_BASE_SETTING[provider]] = sim_url
    exports = {k: env[k] for k in ("DATABASE_URL", *billing_env, _BASE_SETTING[provider])}
    print(f"[demo] app database: {db_url} ({len(data.instances)} instances)")
    print(f"[demo] billing: the {provider} simulator at {sim_url} (the demo data set: {len(data.records)} subscriptions)")
    try:
        print("[demo] first full reconciliation (credit_sync_job):", flush=True)
        first = subprocess.run(
            [sys.executable, "-m", "dagster", "job", "execute", "-m", "creditsync_pipeline.definitions",
             "-j", "credit_sync_job", "--tags", json.dumps({"creditsync/trigger": "manual"})],
            env=env, cwd=REPO_ROOT,
        )
        if first.returncode != 0:
            print("[demo] the first run failed; the UI shows why", file=sys.stderr)
        if not ui:
            return first.returncode
        ui_port = free_port(port)
        print(
            f"\n[demo] Dagster UI: http://127.0.0.1:{ui_port}  (Assets > credit_sync > credit_mismatches for the report)\n"
            f"[demo] try it from another shell:\n"
            f"  export {' '.join(f'{k}={shlex.quote(v)}' for k, v in exports.items())}\n"
            f"  .venv/bin/creditsync check\n"
            f"[demo] Ctrl-C stops everything.\n",
            flush=True,
        )
        dev = subprocess.Popen(
            [sys.executable, "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
             "-h", "127.0.0.1", "-p", str(ui_port)],
            env=env, cwd=REPO_ROOT,
        )
        try:
            return dev.wait()
        except (KeyboardInterrupt, SystemExit):
            _stop(dev, signal.SIGINT, grace=30)
            return 0
    finally:
        _stop(sim, signal.SIGTERM, grace=10)


def _stop(proc: subprocess.Popen, sig: int, grace: float) -> None:
    """Ask a child to stop, then insist."""
    if proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
