"""The Wix simulator: Wix's OAuth token endpoint and App Instance API over real HTTP.

* :mod:`.server` -- :class:`WixSimulator` (the API, its faults, its admin endpoints);
* :mod:`.instances` -- SPEC-shaped records -> Wix instances (:func:`instances_from_records`,
  :func:`demo_instances` for the demo data set);
* ``python -m creditsync_pipeline.simulators.wix --port N (--records FILE [--installed FILE]
  | --generate N | --instances FILE)``: the simulator in its own process (app id and
  secret from ``WIX_APP_ID`` / ``WIX_APP_SECRET``).
"""

from __future__ import annotations

from .instances import demo_instances, instances_from_records
from .server import DEFAULT_APP_ID, DEFAULT_APP_SECRET, DEFAULT_TOKEN_TTL, FAULT_ENDPOINTS, WixSimulator

__all__ = [
    "DEFAULT_APP_ID",
    "DEFAULT_APP_SECRET",
    "DEFAULT_TOKEN_TTL",
    "FAULT_ENDPOINTS",
    "WixSimulator",
    "demo_instances",
    "instances_from_records",
]
