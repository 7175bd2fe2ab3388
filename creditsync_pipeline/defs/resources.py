"""Resources: the app database and the billing API, configured from the environment."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache

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
    }
