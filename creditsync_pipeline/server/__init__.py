"""The manual-sync and webhook HTTP app (``creditsync serve``) and instance tokens.

* :mod:`.tokens` -- sign/verify the app's signed instance tokens (pure);
* :mod:`.webhooks` -- the billing provider's webhook signature and event shape (pure);
* :mod:`.ratelimit` -- the per-instance, in-process rate limit of the button;
* :mod:`.app` -- the Starlette app (:func:`create_app`) and :func:`serve`.

Nothing is imported eagerly, so ``python -m creditsync_pipeline.server.tokens``
stays light and warning-free.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from . import app

        return getattr(app, name)
    raise AttributeError(name)
