"""Shared fixtures: throw-away SQLite, PostgreSQL and MySQL/MariaDB app databases.

PostgreSQL tests create a fresh database per test on the server named by
``CREDITSYNC_TEST_PG_ADMIN_URL`` (default: local ``postgres`` superuser). When the
server is unreachable they are skipped, unless ``CREDITSYNC_REQUIRE_POSTGRES=1``
(set in CI), in which case they fail.

MySQL/MariaDB tests do the same on ``CREDITSYNC_TEST_MYSQL_ADMIN_URL`` (default: local
``root`` without a password), mandatory with ``CREDITSYNC_REQUIRE_MYSQL=1``. Their
databases default to a case- and accent-insensitive collation (``utf8mb4_general_ci``,
what many apps run with), so the tests prove that the DDL's own exact collation, not
the server's default, decides how ids compare.
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
DEFAULT_MYSQL_ADMIN_URL = "mysql+pymysql://root@127.0.0.1:3306/"


def _pg_admin_url() -> str:
    return os.environ.get("CREDITSYNC_TEST_PG_ADMIN_URL", DEFAULT_PG_ADMIN_URL)


def _mysql_admin_url() -> str:
    return os.environ.get("CREDITSYNC_TEST_MYSQL_ADMIN_URL", DEFAULT_MYSQL_ADMIN_URL)


def _required(variable: str) -> bool:
    return os.environ.get(variable, "").strip().lower() in {"1", "true", "yes"}


def _postgres_required() -> bool:
    return _required("CREDITSYNC_REQUIRE_POSTGRES")


def _unreachable(message: str, required: bool) -> None:
    if required:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


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
        _unreachable(f"PostgreSQL not reachable at {_safe(url)}: {reason}", _postgres_required())
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


@pytest.fixture(scope="session")
def mysql_admin_engine() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the MySQL/MariaDB server (skip/fail if down)."""
    url = _mysql_admin_url()
    try:
        engine = create_engine(url, isolation_level="AUTOCOMMIT", pool_pre_ping=True)
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001 - any failure (driver missing, server down) means "not reachable"
        reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        _unreachable(f"MySQL/MariaDB not reachable at {_safe(url)}: {reason}", _required("CREDITSYNC_REQUIRE_MYSQL"))
    yield engine
    engine.dispose()


@pytest.fixture
def mysql_url(mysql_admin_engine: Engine) -> Iterator[str]:
    """SQLAlchemy URL of a fresh, empty MySQL/MariaDB database, dropped afterwards."""
    name = f"creditsync_test_{uuid.uuid4().hex[:12]}"
    with mysql_admin_engine.connect() as conn:
        conn.execute(text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_general_ci"))
    url = make_url(_mysql_admin_url()).set(database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with mysql_admin_engine.connect() as conn:
            # A connection the test left open (a killed subprocess's, say) must not hold
            # the DROP on a metadata lock.
            ids = conn.execute(
                text("SELECT id FROM information_schema.PROCESSLIST WHERE db = :name AND id <> CONNECTION_ID()"),
                {"name": name},
            ).scalars().all()
            for pid in ids:
                try:
                    conn.execute(text(f"KILL {int(pid)}"))
                except Exception:  # noqa: BLE001 - it may have ended meanwhile
                    pass
            conn.execute(text(f"DROP DATABASE IF EXISTS `{name}`"))


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """SQLAlchemy URL of a fresh SQLite file database."""
    return f"sqlite:///{tmp_path / 'app.db'}"


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
        pytest.param("mysql", id="mysql", marks=pytest.mark.mysql),
    ]
)
def db_url(request: pytest.FixtureRequest) -> str:
    """The URL of a fresh app database, once per backend."""
    fixture = {"sqlite": "sqlite_url", "postgres": "pg_url", "mysql": "mysql_url"}[request.param]
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
