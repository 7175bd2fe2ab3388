"""``python -m creditsync_pipeline.simulators.wix``: serve a Wix simulator until SIGTERM/SIGINT.

    WIX_APP_ID=... WIX_APP_SECRET=... python -m creditsync_pipeline.simulators.wix --port 8766 --generate 1000
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from datetime import date
from typing import Any

from ..base import serve_until_signalled
from ..generic import generate_records
from .instances import instances_from_records
from .server import DEFAULT_APP_ID, DEFAULT_APP_SECRET, DEFAULT_TOKEN_TTL, WixSimulator

__all__ = ["main"]


def _load_json(path: str, what: str) -> Any:
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    if not isinstance(data, (list, dict)):
        raise ValueError(f"{path}: expected a JSON list or object of {what}")
    return data


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.simulators.wix",
        description=(
            "Wix OAuth + App Instance API simulator (app id/secret from WIX_APP_ID / WIX_APP_SECRET, "
            f"defaults {DEFAULT_APP_ID!r} / {DEFAULT_APP_SECRET!r})."
        ),
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--records", metavar="FILE.json", help="a JSON list of SPEC-shaped subscription records")
    source.add_argument("--generate", type=int, metavar="N", help="N synthetic instances (generic generate_records)")
    source.add_argument("--instances", metavar="FILE.json", help="Wix instance objects (id -> instance, or a list)")
    parser.add_argument("--installed", metavar="FILE.json", help="with --records: a JSON list of every installed instance id")
    parser.add_argument("--seed", type=int, default=0, help="seed of --generate (default 0)")
    parser.add_argument("--anchor", type=date.fromisoformat, metavar="YYYY-MM-DD", help="anchor day of --generate")
    parser.add_argument("--token-ttl", type=float, default=DEFAULT_TOKEN_TTL, help="token lifetime, seconds (14400)")
    parser.add_argument("--rate-limit", type=int, metavar="N", help="requests a minute per instance (Wix: 200)")
    args = parser.parse_args(argv)
    if args.installed and not args.records:
        parser.error("--installed goes with --records")
    try:
        if args.generate is not None:
            instances: Any = instances_from_records(generate_records(args.generate, seed=args.seed, anchor=args.anchor))
        elif args.records:
            installed = _load_json(args.installed, "instance ids") if args.installed else []
            instances = instances_from_records(_load_json(args.records, "records"), installed=installed)
        else:
            instances = _load_json(args.instances, "instances") if args.instances else {}
        sim = WixSimulator(
            instances,
            app_id=os.environ.get("WIX_APP_ID") or DEFAULT_APP_ID,
            app_secret=os.environ.get("WIX_APP_SECRET") or DEFAULT_APP_SECRET,
            token_ttl=args.token_ttl,
            rate_limit=args.rate_limit,
            host=args.host,
            port=args.port,
        )
        sim.start()
    except (OSError, ValueError, KeyError, TypeError) as exc:
        print(f"wix simulator: {exc}", file=sys.stderr)
        return 2
    return serve_until_signalled(sim, lambda: f"wix simulator listening on {sim.base_url} ({len(sim)} instances)")


if __name__ == "__main__":
    sys.exit(main())
