"""Billing: the authoritative side of the sync, behind one provider contract.

* :mod:`.base` -- the contract (:class:`BillingProvider`, :class:`BillingSnapshot`) and the
  per-instance look-up machinery every provider shares;
* :mod:`.records` -- the SPEC record shape and its bulk validation;
* :mod:`.http` -- one pooled httpx client per provider, retries, secret masking;
* :mod:`.errors` -- the exception hierarchy;
* one module per provider: :mod:`.generic` (the SPEC Billing API), :mod:`.wix`, :mod:`.stripe`;
* :mod:`.providers` -- ``BILLING_PROVIDER`` -> provider.
"""

from __future__ import annotations

from .base import (
    FAILED_STATUSES,
    LOOKUP_ERROR,
    REMOVED,
    UNAVAILABLE,
    UNLINKED,
    UNRESOLVED_COLUMNS,
    BillingProvider,
    BillingSnapshot,
    Budget,
    CustomerLinks,
)
from .errors import BillingAuthError, BillingError, BillingMalformedError, BillingUnavailableError, is_systemic
from .generic import GenericBillingClient
from .providers import provider_class, provider_from_settings
from .records import INVALID_COLUMNS, MAX_INSTANCE_ID_LENGTH, RECORD_COLUMNS, STATUSES, instance_id_problem

#: the generic provider under its historical name
BillingClient = GenericBillingClient

__all__ = [
    "FAILED_STATUSES",
    "INVALID_COLUMNS",
    "LOOKUP_ERROR",
    "MAX_INSTANCE_ID_LENGTH",
    "RECORD_COLUMNS",
    "REMOVED",
    "STATUSES",
    "UNAVAILABLE",
    "UNLINKED",
    "UNRESOLVED_COLUMNS",
    "BillingAuthError",
    "BillingClient",
    "BillingError",
    "BillingMalformedError",
    "BillingProvider",
    "BillingSnapshot",
    "BillingUnavailableError",
    "Budget",
    "CustomerLinks",
    "GenericBillingClient",
    "instance_id_problem",
    "is_systemic",
    "provider_class",
    "provider_from_settings",
]
