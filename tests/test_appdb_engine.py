"""Engines, URLs and one-line, password-free errors."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import (
    AppDatabaseError,
    apply_corrections,
    count_instances,
    create_engine_from_url,
    init_db,
    read_instances,
    redact_url,
)

from .appdb_support import NOW, corrections_frame


# ----------------------------------------------------------------------- errors


def test_redact_url_hides_passwords() -> None:
    assert redact_url("postgresql://postgres:hunter2@127.0.0.1:5432/x") == (
        "postgresql://postgres:***@127.0.0.1:5432/x"
    )
    assert "hunter2" not in redact_url("postgresql://u@h/db?password=hunter2&sslmode=require")
    assert "hunter2" not in redact_url("not a url ://u:hunter2@host/db")
    assert redact_url("sqlite:////tmp/app.db") == "sqlite:////tmp/app.db"


def test_unreachable_postgres_error_hides_the_password() -> None:
    secret = "s3cr3t-Pa55w0rd"
    eng = create_engine_from_url(f"postgresql+psycopg2://alice:{secret}@127.0.0.1:1/appdb")
    try:
        for call in (
            lambda: appdb.check_connection(eng),
            lambda: read_instances(eng),
            lambda: count_instances(eng),
            lambda: init_db(eng),
            lambda: apply_corrections(eng, corrections_frame([{"instance_id": "a"}]),
                                      run_id="r", trigger="manual", now=NOW),
        ):
            with pytest.raises(AppDatabaseError) as caught:
                call()
            message = str(caught.value)
            assert secret not in message
            assert "\n" not in message
            assert message.startswith("app database unreachable (postgresql+psycopg2://alice:***@127.0.0.1:1/appdb)")
    finally:
        eng.dispose()


def test_invalid_url_is_an_app_database_error() -> None:
    with pytest.raises(AppDatabaseError) as caught:
        create_engine_from_url("nonsense://user:topsecret@host/db")
    assert "topsecret" not in str(caught.value)


def test_check_connection_on_a_live_database(engine: Engine) -> None:
    appdb.check_connection(engine)
    with engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM credit_sync_audit")).scalar() == 0


@pytest.mark.parametrize("scheme", ["postgresql", "postgres"])
def test_bare_postgres_urls_use_the_shipped_driver(pg_url, scheme):
    bare = "postgresql://" + pg_url.split("://", 1)[1]
    bare = bare.replace("postgresql://", f"{scheme}://", 1)
    engine = create_engine_from_url(bare)
    try:
        assert engine.dialect.driver == "psycopg2"
        appdb.check_connection(engine)
    finally:
        engine.dispose()
