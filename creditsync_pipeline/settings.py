"""Settings read from the environment, in one place.

Every other module takes explicit arguments; only the entry points (CLI,
Dagster resources, HTTP app) read the environment, through this module.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

DEFAULT_DATABASE_URL = "sqlite:///creditsync.db"
DEFAULT_BILLING_API_URL = "http://127.0.0.1:8765"
DEFAULT_MAX_CHANGE_RATIO = 0.10
DEFAULT_SYNC_RATE_LIMIT = 3  # manual syncs per instance per minute (``creditsync serve``)


class SettingsError(Exception):
    """A required setting is missing or unusable (one-line message)."""


class Secret(str):
    """A string whose repr never shows the value (tokens, signing secrets)."""

    def __repr__(self) -> str:  # pragma: no cover - trivial
        return "Secret('***')"


@dataclass(frozen=True)
class Settings:
    """What creditsync needs to run; built by :func:`from_env`."""

    database_url: str = DEFAULT_DATABASE_URL
    billing_api_url: str = DEFAULT_BILLING_API_URL
    billing_api_token: Secret = field(default=Secret(""), repr=False)
    app_secret: Secret = field(default=Secret(""), repr=False)
    webhook_secret: Secret = field(default=Secret(""), repr=False)
    sync_rate_limit: int = DEFAULT_SYNC_RATE_LIMIT
    max_change_ratio: float = DEFAULT_MAX_CHANGE_RATIO
    billing_timeout: float = 30.0
    billing_max_attempts: int = 5
    billing_page_size: int = 1000

    def require_billing_token(self) -> str:
        if not self.billing_api_token:
            raise SettingsError("BILLING_API_TOKEN is not set")
        return str(self.billing_api_token)


def _float(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except ValueError:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from None


def _int(env: dict[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from None


def from_env(env: dict[str, str] | None = None) -> Settings:
    """Build :class:`Settings` from ``os.environ`` (or the mapping given)."""
    env = dict(os.environ if env is None else env)
    ratio = _float(env, "CREDITSYNC_MAX_CHANGE_RATIO", DEFAULT_MAX_CHANGE_RATIO)
    if not 0.0 <= ratio <= 1.0:
        raise SettingsError(f"CREDITSYNC_MAX_CHANGE_RATIO must be between 0 and 1, got {ratio}")
    rate_limit = _int(env, "CREDITSYNC_SYNC_RATE_LIMIT", DEFAULT_SYNC_RATE_LIMIT)
    if rate_limit < 1:
        raise SettingsError(f"CREDITSYNC_SYNC_RATE_LIMIT must be at least 1, got {rate_limit}")
    return Settings(
        database_url=env.get("DATABASE_URL") or DEFAULT_DATABASE_URL,
        billing_api_url=env.get("BILLING_API_URL") or DEFAULT_BILLING_API_URL,
        billing_api_token=Secret(env.get("BILLING_API_TOKEN", "")),
        app_secret=Secret(env.get("CREDITSYNC_APP_SECRET", "")),
        webhook_secret=Secret(env.get("CREDITSYNC_WEBHOOK_SECRET", "")),
        sync_rate_limit=rate_limit,
        max_change_ratio=ratio,
        billing_timeout=_float(env, "BILLING_API_TIMEOUT", 30.0),
        billing_max_attempts=_int(env, "BILLING_API_MAX_ATTEMPTS", 5),
        billing_page_size=_int(env, "BILLING_API_PAGE_SIZE", 1000),
    )
