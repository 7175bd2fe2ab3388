"""The Stripe simulator: the part of Stripe's API creditsync reads, with injectable faults.

* :mod:`.objects` -- customers, prices, subscriptions and their JSON (current and older shape);
* :mod:`.convert` -- SPEC-shaped records (the demo's, the benchmark's) -> Stripe objects;
* :mod:`.simulator` -- :class:`StripeSimulator`, the HTTP server;
* :mod:`.admin` -- its ``/_sim/...`` endpoints, to drive it from another process.

Run it standalone (API key from ``STRIPE_API_KEY``, default ``sk_test_simulator``)::

    python -m creditsync_pipeline.simulators.stripe --port 12111 --records records.json
    python -m creditsync_pipeline.simulators.stripe --port 12111 --generate 100000
"""

from __future__ import annotations

from .convert import stripe_objects_from_records
from .objects import Customer, Item, Price, Subscription
from .simulator import DEFAULT_API_KEY, StripeSimulator

__all__ = [
    "DEFAULT_API_KEY",
    "Customer",
    "Item",
    "Price",
    "StripeSimulator",
    "Subscription",
    "main",
    "stripe_objects_from_records",
]


def main(argv: list[str] | None = None) -> int:
    """``python -m creditsync_pipeline.simulators.stripe``: serve until SIGTERM/SIGINT."""
    import argparse
    import json
    import os
    import sys
    from datetime import date

    from ..base import serve_until_signalled
    from ..generic import generate_records

    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.simulators.stripe",
        description="Stripe API simulator (API key from STRIPE_API_KEY, default 'sk_test_simulator').",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=12111)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--records", metavar="FILE.json", help="a JSON list of SPEC-shaped subscription records")
    source.add_argument("--generate", type=int, metavar="N", help="serve N synthetic records (generic generate_records)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --generate (default 0)")
    parser.add_argument("--anchor", type=date.fromisoformat, metavar="YYYY-MM-DD", help="anchor day of --generate")
    parser.add_argument("--metadata-key", default=os.environ.get("STRIPE_INSTANCE_METADATA_KEY") or "instance_id")
    parser.add_argument("--metadata-on", choices=("customer", "subscription", "alternate"), default="alternate")
    parser.add_argument("--search-lag", type=float, default=0.0, help="seconds before search sees a write")
    parser.add_argument("--no-search", action="store_true", help="answer 404 to search, like a test server without it")
    args = parser.parse_args(argv)
    try:
        if args.generate is not None:
            records = generate_records(args.generate, seed=args.seed, anchor=args.anchor)
        elif args.records:
            with open(args.records, encoding="utf-8") as fh:
                records = json.load(fh)
            if not isinstance(records, list):
                raise ValueError(f"{args.records}: expected a JSON list of records")
        else:
            records = []
        sim = StripeSimulator.from_records(
            records, metadata_key=args.metadata_key, metadata_on=args.metadata_on,
            api_key=os.environ.get("STRIPE_API_KEY") or DEFAULT_API_KEY, host=args.host, port=args.port,
            search_lag=args.search_lag, search_enabled=not args.no_search,
        )
        sim.start()
    except (OSError, ValueError) as exc:
        print(f"stripe simulator: {exc}", file=sys.stderr)
        return 2
    return serve_until_signalled(sim, lambda: f"stripe simulator listening on {sim.base_url}")
