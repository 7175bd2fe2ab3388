"""Shared fixtures: throw-away SQLite and PostgreSQL app databases.

PostgreSQL tests create a fresh database per test on the server named by
``CREDITSYNC_TEST_PG_ADMIN_URL`` (default: local ``postgres`` superuser). When the
server is unreachable they are skipped, unless ``CREDITSYNC_REQUIRE_POSTGRES=1``
(set in CI), in which case they fail.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import Engine, make_url

DEFAULT_PG_ADMIN_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/postgres"


def _pg_admin_url() -> str:
    return os.environ.get("CREDITSYNC_TEST_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL)


def _postgres_required() -> bool:
    return os.environ.get("CREDITSYNC_REQUIRE_POSTGRES", "").strip().lower() in {"1", "true", "yes"}


def _safe(url: str) -> str:
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable URL>"


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the PostgreSQL maintenance database (skip/fail if down)."""
    url = _pg_admin_url()
    engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        engine.dispose()
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        message = f"PostgreSQL not reachable at {_safe(url)}: {reason}"
        if _postgres_required():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin_engine: Engine) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty PostgreSQL database, dropped afterwards."""
    name = f"creditsync_test_{uuid.uuid4().hex[:12]}"
    with pg_admin_engine.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = make_url(_pg_admin_url()).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with pg_admin_engine.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            )
            force = " WITH (FORCE)" if conn.dialect.server_version_info >= (13,) else ""
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}"{force}'))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite file database."""
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh app database, once per backend."""
    fixture = "sqlite_url" if request.param == "sqlite" else "pg_url"
    return request.getfixturevalue(fixture)


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    """An engine on a fresh app database with the schema applied."""
    from creditsync_pipeline.appdb import create_engine_from_url, init_db

    eng = create_engine_from_url(db_url)
    init_db(eng)
    try:
        yield eng
    finally:
        eng.dispose()
