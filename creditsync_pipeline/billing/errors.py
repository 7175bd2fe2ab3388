"""The billing errors every provider raises (a small hierarchy, as httpx and stripe-python have).

``str()`` of each is one line and never holds a token, key or secret: the HTTP layer
(:mod:`.http`) masks every secret it was given before it builds a message.

Which failures are *systemic* -- billing as a whole, not one instance -- matters to the
real-time nets (SPEC "Real-time nets": an outage must not use up a webhook row's retry
budget): :func:`is_systemic` says so.
"""

from __future__ import annotations

__all__ = [
    "BillingAuthError",
    "BillingError",
    "BillingMalformedError",
    "BillingUnavailableError",
    "is_systemic",
]


class BillingError(Exception):
    """Base class; ``str()`` is one line and never contains a secret."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


class BillingAuthError(BillingError):
    """The provider rejected creditsync's credentials (HTTP 401/403, a refused app secret); never retried."""


class BillingUnavailableError(BillingError):
    """5xx, timeouts, dropped connections or 429s that persisted after every attempt."""


class BillingMalformedError(BillingError):
    """A response that is not of the provider's documented shape (incl. a record without a usable id)."""


def is_systemic(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of billing as a whole (unreachable, 5xx after retries, credentials refused)."""
    return isinstance(exc, (BillingUnavailableError, BillingAuthError))
