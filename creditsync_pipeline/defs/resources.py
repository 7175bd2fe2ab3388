"""Resources: the app database and the billing API, configured from the environment."""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import httpx
from dagster import ConfigurableResource, EnvVar
from pydantic import Field
from sqlalchemy.engine import Engine

from .. import appdb
from ..billing import BillingClient


@lru_cache(maxsize=8)
def _engine(url: str) -> Engine:
    # One engine (and pool) per URL per process, however many assets ask.
    return appdb.create_engine_from_url(url)


class AppDatabaseResource(ConfigurableResource):
    """The app database (``DATABASE_URL``: PostgreSQL in production, SQLite embedded)."""

    database_url: str = Field(description="SQLAlchemy URL of the app database")

    def get_engine(self) -> Engine:
        return _engine(self.database_url)


class BillingApiResource(ConfigurableResource):
    """The billing provider's API (``BILLING_API_URL`` + ``BILLING_API_TOKEN``)."""

    base_url: str = Field(description="Base URL of the billing API")
    token: str = Field(description="Bearer token; set it from an EnvVar so the UI shows only its name")
    timeout: float = 30.0
    max_attempts: int = 5
    page_size: int = 1000

    @contextmanager
    def get_client(self) -> Iterator[BillingClient]:
        client = BillingClient(
            self.base_url,
            self.token,
            timeout=self.timeout,
            max_attempts=self.max_attempts,
            page_size=self.page_size,
        )
        try:
            yield client
        finally:
            client.close()


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
        "billing": BillingApiResource(
            base_url=EnvVar("BILLING_API_URL"),
            token=EnvVar("BILLING_API_TOKEN"),
        ),
        "alert_webhook": AlertWebhookResource(),
    }
