"""Billing simulators: each provider's API served over real HTTP, with injectable faults.

* :mod:`.base` -- the HTTP server, fault rules and admin endpoints they share;
* :mod:`.generic` -- the SPEC "Billing API" (:class:`BillingSimulator`);
* one module per provider: :mod:`.wix`, :mod:`.stripe`.

For the tests, the demo and the benchmarks; never part of a production run.
"""

from __future__ import annotations

from .generic import BillingSimulator, generate_records

__all__ = ["BillingSimulator", "generate_records"]
