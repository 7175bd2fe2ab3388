"""``BILLING_PROVIDER`` -> the provider object every entry point uses (one place).

Entry points do not call this directly: :func:`creditsync_pipeline.sync.open_billing`
adds what a provider needs from the app database (Stripe's remembered customer links).
"""

from __future__ import annotations

from ..settings import PROVIDERS, Settings, SettingsError
from .base import BillingProvider, Budget, CustomerLinks

__all__ = ["provider_class", "provider_from_settings"]


def provider_class(name: str) -> type[BillingProvider]:
    """The class behind a ``BILLING_PROVIDER`` value (imported on demand)."""
    if name == "generic":
        from .generic import GenericBillingClient

        return GenericBillingClient
    if name == "wix":
        from .wix import WixProvider

        return WixProvider
    if name == "stripe":
        from .stripe import StripeProvider

        return StripeProvider
    raise SettingsError(f"BILLING_PROVIDER must be one of {', '.join(PROVIDERS)}, got {name!r}")


def provider_from_settings(
    cfg: Settings, *, interactive: bool = False, links: CustomerLinks | None = None
) -> BillingProvider:
    """Build the configured provider; a :class:`SettingsError` (one line) when it cannot be.

    ``interactive``: the budget of a person waiting on the "Sync credits" button
    (:meth:`Budget.interactive`) instead of a batch job's.
    """
    budget = Budget(timeout=cfg.billing_timeout, max_attempts=cfg.billing_max_attempts)
    if interactive:
        budget = budget.interactive()
    cls = provider_class(cfg.billing_provider)
    try:
        return cls.from_settings(cfg, budget=budget, links=links)
    except ValueError as exc:
        raise SettingsError(f"BILLING_PROVIDER={cfg.billing_provider}: {' '.join(str(exc).split())}") from None
