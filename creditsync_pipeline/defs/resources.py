"""Resources: the app database and the billing provider, configured from the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any, Optional

import httpx
from dagster import ConfigurableResource, EnvVar
from pydantic import Field
from sqlalchemy.engine import Engine

from .. import appdb, settings, sync
from ..billing import BillingProvider


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    # One engine (and pool) per URL per process, however many assets ask.
    return appdb.create_engine_from_url(url)


class AppDatabaseResource(ConfigurableResource):
    """The app database (``DATABASE_URL``: PostgreSQL in production, SQLite embedded)."""

    database_url: str = Field(description="SQLAlchemy URL of the app database")

    def get_engine(self) -> Engine:
        return _engine(self.database_url)


#: BillingResource field -> the environment variable it stands for (settings.from_env reads them)
_BILLING_FIELDS = {
    "provider": "BILLING_PROVIDER",
    "api_url": "BILLING_API_URL",
    "api_token": "BILLING_API_TOKEN",
    "timeout": "BILLING_API_TIMEOUT",
    "max_attempts": "BILLING_API_MAX_ATTEMPTS",
    "page_size": "BILLING_API_PAGE_SIZE",
    "plan_map": "CREDITSYNC_PLAN_MAP",
    "wix_app_id": "WIX_APP_ID",
    "wix_app_secret": "WIX_APP_SECRET",
    "wix_api_base": "WIX_API_BASE",
    "wix_concurrency": "WIX_CONCURRENCY",
    "stripe_api_key": "STRIPE_API_KEY",
    "stripe_api_base": "STRIPE_API_BASE",
    "stripe_instance_metadata_key": "STRIPE_INSTANCE_METADATA_KEY",
}
#: what each provider cannot run without (bound to EnvVar even when unset, so a run names it)
_REQUIRED = {
    "generic": ("api_url", "api_token"),
    "wix": ("wix_app_id", "wix_app_secret"),
    "stripe": ("stripe_api_key",),
}


class BillingResource(ConfigurableResource):
    """The billing provider: ``BILLING_PROVIDER`` and that provider's settings.

    Each field stands for one environment variable (set from an ``EnvVar`` by
    :func:`resources_from_env`, so the UI shows the variable's name, never a key or a
    secret); the values go through the same ``settings.from_env`` as the CLI's, so every
    entry point validates them alike.
    """

    provider: str = Field(default="generic", description="BILLING_PROVIDER: generic, wix or stripe")
    api_url: Optional[str] = Field(default=None, description="BILLING_API_URL (generic)")
    api_token: Optional[str] = Field(default=None, description="BILLING_API_TOKEN (generic); set it from an EnvVar")
    timeout: Optional[str] = Field(default=None, description="BILLING_API_TIMEOUT, seconds per request")
    max_attempts: Optional[str] = Field(default=None, description="BILLING_API_MAX_ATTEMPTS")
    page_size: Optional[str] = Field(default=None, description="BILLING_API_PAGE_SIZE (generic)")
    plan_map: Optional[str] = Field(default=None, description="CREDITSYNC_PLAN_MAP: JSON object or file path")
    wix_app_id: Optional[str] = Field(default=None, description="WIX_APP_ID")
    wix_app_secret: Optional[str] = Field(default=None, description="WIX_APP_SECRET; set it from an EnvVar")
    wix_api_base: Optional[str] = Field(default=None, description="WIX_API_BASE")
    wix_concurrency: Optional[str] = Field(default=None, description="WIX_CONCURRENCY")
    stripe_api_key: Optional[str] = Field(default=None, description="STRIPE_API_KEY; set it from an EnvVar")
    stripe_api_base: Optional[str] = Field(default=None, description="STRIPE_API_BASE")
    stripe_instance_metadata_key: Optional[str] = Field(default=None, description="STRIPE_INSTANCE_METADATA_KEY")

    def settings(self) -> settings.Settings:
        """These fields as :class:`settings.Settings` (validated like the environment is)."""
        env = {var: str(getattr(self, name)) for name, var in _BILLING_FIELDS.items() if getattr(self, name) is not None}
        return settings.from_env(env)

    @contextmanager
    def get_client(self, engine: Engine | None = None, *, remember_links: bool = True) -> Iterator[BillingProvider]:
        """The configured provider (``engine``: where Stripe's customer links are kept;
        ``remember_links`` False: read them, write none, as a dry run must)."""
        provider = sync.open_billing(self.settings(), engine, remember_links=remember_links)
        try:
            yield provider
        finally:
            provider.close()


def billing_resource_from_env(env: Mapping[str, str] | None = None) -> BillingResource:
    """A :class:`BillingResource` bound to the environment variables of the configured provider."""
    env = os.environ if env is None else env
    provider = settings.from_env(dict(env)).billing_provider
    fields: dict[str, Any] = {"provider": provider}
    required = _REQUIRED[provider]
    for name, var in _BILLING_FIELDS.items():
        if name != "provider" and (env.get(var) or name in required):
            fields[name] = EnvVar(var)
    return BillingResource(**fields)


class AlertWebhookResource(ConfigurableResource):
    """Where run-failure alerts are posted: the URL in the environment variable ``url_env``.

    The URL is read when an alert is sent and never shown or logged (chat
    webhook URLs are secrets); unset means "log only".
    """

    url_env: str = Field(default="CREDITSYNC_ALERT_WEBHOOK_URL", description="Environment variable holding the alert webhook URL")
    timeout: float = 5.0
    attempts: int = 2

    def configured(self) -> bool:
        return bool(os.environ.get(self.url_env, "").strip())

    def post(self, payload: Mapping[str, Any]) -> str | None:
        """POST ``payload`` as JSON; ``None`` on a 2xx, else a one-line reason (no URL in it)."""
        url = os.environ.get(self.url_env, "").strip()
        if not url:
            return "no alert webhook configured"
        reason = "not sent"
        for _ in range(max(1, self.attempts)):
            try:
                response = httpx.post(url, json=dict(payload), timeout=self.timeout)
            except httpx.HTTPError as exc:
                reason = f"alert webhook unreachable ({type(exc).__name__})"
                continue
            except Exception as exc:  # noqa: BLE001 - a bad URL must not break the sensor
                return f"alert webhook not usable ({type(exc).__name__})"
            if 200 <= response.status_code < 300:
                return None
            reason = f"alert webhook answered HTTP {response.status_code}"
        return reason


def resources_from_env() -> dict[str, ConfigurableResource]:
    """Production wiring: every value comes from an environment variable.

    ``EnvVar`` keeps secrets out of the Dagster UI: it shows the variable's
    name, never its value.
    """
    return {
        "app_db": AppDatabaseResource(database_url=EnvVar("DATABASE_URL")),
        "billing": billing_resource_from_env(),
        "alert_webhook": AlertWebhookResource(),
    }
