"""The Wix provider (``BILLING_PROVIDER=wix``): Wix's App Instance API, one look-up per instance.

* :mod:`.provider` -- :class:`WixProvider`: tokens, look-ups, what each answer means;
* :mod:`.instance` -- a Get App Instance answer -> SPEC records (pure, table-tested);
* :mod:`.tokens` -- the per-instance access-token cache (single-flight, LRU, shared).
"""

from __future__ import annotations

from .instance import instance_records
from .provider import INSTANCE_PATH, MAX_FAILED_RATIO, TOKEN_PATH, WixProvider
from .tokens import TokenCache, shared_cache

__all__ = ["INSTANCE_PATH", "MAX_FAILED_RATIO", "TOKEN_PATH", "TokenCache", "WixProvider", "instance_records", "shared_cache"]
