"""The embedded demo: SQLite app DB, bundled billing simulator, Dagster UI.

``creditsync demo`` seeds a realistic app database (paying instances stuck
on the free plan, wrong allowances, canceled-but-paid-through, expired),
serves the matching billing data from the simulator, runs a first full
reconciliation so the UI has a mismatch report to show, then loses one
upgrade's webhook (:func:`lose_an_upgrade`) and starts ``creditsync serve``
and ``dagster dev`` (webserver + daemon) with the pipeline loaded. The banner
prints the Sync credits page of that instance. The terminal shows the banner and
the operator lines only; every child's full output goes to ``<demo>/logs/``
(:mod:`.demo_console`).
"""

from __future__ import annotations

import json
import os
import shlex
import random
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from pathlib import Path

import httpx
import yaml

from . import appdb
from .demo_console import Child, say, wait_until_up
from .server.tokens import sign_instance_token

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_TOKEN = "demo-billing-token"
#: signs the demo's instance tokens (the Sync credits page link in the banner)
DEMO_APP_SECRET = "demo-app-secret"

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


#: the demo instance whose plan goes wrong after the first run (an upgrade whose webhook is lost)
STALE_INSTANCE = "abc123"
STALE_UPGRADE = ("pro", "team")
#: the seeded rows were installed long ago: the provisioning net (new instances of the last
#: minutes) leaves them alone, so the lost upgrade waits for the button
INSTALLED_DAYS_AGO = 30


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def lose_an_upgrade(provider: str, data: DemoData, sim_url: str, now: datetime) -> str:
    """Billing now says :data:`STALE_INSTANCE` bought ``team``; the app still says ``pro``.

    The upgrade's webhook never reaches the app, so only a sync corrects it: the demo's
    Sync credits page shows the wrong plan until its button is pressed. Returns the id.
    """
    iid, (old, new) = STALE_INSTANCE, STALE_UPGRADE
    records = [dict(r) for r in data.records]
    (mine,) = [r for r in records if r["instance_id"] == iid]
    assert mine["plan_id"] == old, "the demo data set changed: pick another stale instance"
    mine.update(plan_id=new, status="active", current_period_end=_iso(now + timedelta(days=30)),
                updated_at=_iso(now + timedelta(seconds=1)))
    if provider == "generic":
        response = httpx.put(f"{sim_url}/_sim/subscriptions/{iid}", json=mine, timeout=10)
    elif provider == "wix":
        from .simulators.wix.instances import instances_from_records

        instance = instances_from_records([mine], now=now)[iid]
        response = httpx.put(f"{sim_url}/_sim/instances/{iid}", json=instance, timeout=10)
    elif provider == "stripe":
        response = httpx.post(f"{sim_url}/_sim/records", json={"records": records}, timeout=10)
    else:
        raise ValueError(f"unknown demo provider {provider!r}")
    response.raise_for_status()
    return iid


def _banner(*, db_url: str, provider: str, sim_url: str, ui_url: str | None, page_url: str | None,
            serve_url: str | None, logs: Path, exports: dict[str, str]) -> str:
    rule = "=" * 78
    lines = [rule, "[demo] creditsync demo is running"]
    if ui_url:
        lines.append(f"  Dagster UI          {ui_url}  (Assets > credit_sync > credit_mismatches)")
    if page_url:
        old, new = STALE_UPGRADE
        lines += [
            f"  Sync credits page   {page_url}",
            f"                      instance {STALE_INSTANCE}: {old} in the app, {new} in billing (its upgrade",
            "                      webhook was lost); open it and press Sync credits",
        ]
    if serve_url:
        lines.append(f"  creditsync serve    {serve_url}  (POST /api/billing/sync-credits, webhook receivers)")
    lines += [
        f"  app database        {db_url}",
        f"  billing             the {provider} simulator at {sim_url}",
        f"  logs                {logs}/  (dagster.log: UI, daemon, sensors, runs; serve.log;",
        "                      simulator.log; first-run.log; creditsync.log: CREDITSYNC_LOG_FILE)",
        "  from another shell:",
        f"    export {' '.join(f'{k}={shlex.quote(v)}' for k, v in exports.items())}",
        "    .venv/bin/creditsync check",
        "  Ctrl-C stops everything.",
        rule,
        "[demo] operator lines follow (everything else is in the log files above):",
    ]
    return "\n".join(lines)


def main(port: int = 3000, ui: bool = True, root: Path | None = None, provider: str = "generic") -> int:
    """Seed, serve billing (``provider``'s simulator), run the first sync, then run serve + the Dagster UI."""
    # SIGTERM (a service manager, `timeout`) stops the children as Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if hasattr(sys.stdout, "reconfigure"):
        sys.stdout.reconfigure(errors="replace")  # "→" on a terminal that cannot show it
    root = Path(root or os.environ.get("CREDITSYNC_DEMO_DIR") or Path.cwd() / ".demo").resolve()
    if root.exists():
        shutil.rmtree(root)
    logs = root / "logs"
    logs.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    data = demo_dataset(now)
    installed = now - timedelta(days=INSTALLED_DAYS_AGO)
    db_url = f"sqlite:///{root / 'app.db'}"
    seed_database(db_url, replace(data, instances=[{**r, "created_at": installed} for r in data.instances]))
    sim_args, billing_env = billing_side(provider, data, root)
    write_dagster_home(root / "dagster_home")

    serve_port = free_port(8000)
    serve_url = f"http://127.0.0.1:{serve_port}"
    env = dict(os.environ)
    env.update(
        {
            "DATABASE_URL": db_url,
            "DAGSTER_HOME": str(root / "dagster_home"),
            "CREDITSYNC_APP_SECRET": env.get("CREDITSYNC_APP_SECRET", DEMO_APP_SECRET),
            # read by the log-file and report-link code of every process (harmless where unread)
            "CREDITSYNC_LOG_FILE": str(logs / "creditsync.log"),
            "CREDITSYNC_PUBLIC_URL": serve_url,
            "PYTHONUNBUFFERED": "1",
            **billing_env,
        }
    )
    sim_port = free_port(8765)
    sim_url = f"http://127.0.0.1:{sim_port}"
    env[_BASE_SETTING[provider]] = sim_url
    exports = {k: env[k] for k in ("DATABASE_URL", *billing_env, _BASE_SETTING[provider])}
    children: list[Child] = []

    def start(name: str, *args: str) -> Child:
        child = Child(name, [sys.executable, *args], env, logs, cwd=REPO_ROOT)
        children.append(child)
        return child

    try:
        sim = start("simulator", *sim_args, "--port", str(sim_port))
        wait_until_up(sim, f"{sim_url}/_sim/health", "the billing simulator", 30)
        say(f"[demo] app database: {db_url} ({len(data.instances)} instances)")
        say(f"[demo] billing: the {provider} simulator at {sim_url} (the demo data set: {len(data.records)} subscriptions)")
        say(f"[demo] logs: {logs}/")
        say("[demo] first full reconciliation (credit_sync_job):")
        first = start("first-run", "-m", "dagster", "job", "execute", "-m", "creditsync_pipeline.definitions",
                      "-j", "credit_sync_job", "--tags", json.dumps({"creditsync/trigger": "manual"})).wait()
        if first != 0:
            say(f"[demo] the first run failed (exit {first}); see {logs / 'first-run.log'}:\n  "
                + "\n  ".join(children[-1].last_lines()[-8:]), sys.stderr)
        else:
            say("[demo] the first full reconciliation succeeded")
        if not ui:
            return first
        stale = lose_an_upgrade(provider, data, sim_url, datetime.now(timezone.utc))
        say("[demo] starting creditsync serve and the Dagster UI ...")
        serve = start("serve", "-m", "creditsync_pipeline.cli", "serve", "--host", "127.0.0.1", "--port", str(serve_port))
        wait_until_up(serve, f"{serve_url}/healthz", "creditsync serve", 60)
        ui_port = free_port(port)
        dev = start("dagster", "-m", "dagster", "dev", "-w", str(REPO_ROOT / "workspace.yaml"),
                    "-h", "127.0.0.1", "-p", str(ui_port))
        wait_until_up(dev, f"http://127.0.0.1:{ui_port}/server_info", "the Dagster UI", 240)
        token = sign_instance_token(env["CREDITSYNC_APP_SECRET"], stale)
        say(_banner(db_url=db_url, provider=provider, sim_url=sim_url, ui_url=f"http://127.0.0.1:{ui_port}",
                    page_url=f"{serve_url}/billing?instance={token}", serve_url=serve_url, logs=logs, exports=exports))
        while True:  # until Ctrl-C, or a child gives up
            for child in (dev, serve, sim):
                code = child.poll()
                if code is not None:
                    say(f"[demo] {child.name} exited with code {code}; its last lines ({child.log_path}):\n  "
                        + "\n  ".join(child.last_lines()[-8:]), sys.stderr)
                    return code or 1
            time.sleep(0.5)
    except RuntimeError as exc:
        say(f"[demo] error: {exc}", sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit):
        return 0
    finally:
        for child in reversed(children):
            child.stop(signal.SIGINT if child.name == "dagster" else signal.SIGTERM, grace=30)
