"""Engines, URLs and one-line, password-free errors."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
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


@pytest.mark.parametrize(
    ("url", "expected", "secret_parts"),
    [
        ("postgresql://u:p@ss@host/db", "postgresql://u:***@host/db", ["p@ss", "ss@"]),
        ("mysql+pymysql://u:a@b@h/d", "mysql+pymysql://u:***@h/d", ["a@b", "b@"]),
        ("postgresql://u:Xq@Zw@Yv@db.example:5432/app", "postgresql://u:***@db.example:5432/app", ["Xq", "Zw", "Yv"]),
        ("postgresql://u:Sl/as?h#Qm@host/db", "postgresql://u:***@host/db", ["Sl", "Qm"]),
        ("postgresql://azure@srv:Pw@@Xk@host/db", "postgresql://azure@srv:***@host/db", ["Pw", "Xk"]),
        ("postgresql://:Nobody1@host/db", "postgresql://:***@host/db", ["Nobody1"]),
        ("postgresql://u@h/db?password=Qp@1&sslmode=require", "postgresql://u@h/db?password=***&sslmode=require", ["Qp"]),
        ("postgresql://u@h/db?sslmode=require&PASSWD=Qp2", "postgresql://u@h/db?sslmode=require&PASSWD=***", ["Qp2"]),
        ("mysql+pymysql://u@h/d?Pwd=Qp3&charset=utf8mb4", "mysql+pymysql://u@h/d?Pwd=***&charset=utf8mb4", ["Qp3"]),
        ("postgresql://u@h/db?sslPassword=Qp4", "postgresql://u@h/db?sslPassword=***", ["Qp4"]),
        ("postgresql://u:Up1@h/db?password=Qp5&pwd=Qp6", "postgresql://u:***@h/db?password=***&pwd=***", ["Up1", "Qp5", "Qp6"]),
        ("not a url ://u:hunter2@host/db", "not a url ://u:***@host/db", ["hunter2"]),
        ("sqlite:////tmp/app.db", "sqlite:////tmp/app.db", []),
        ("sqlite:///relative/a@b:c.db", "sqlite:///relative/a@b:c.db", []),
        ("postgresql://u@host/db", "postgresql://u@host/db", []),
    ],
)
def test_redact_url_leaves_no_part_of_a_password(url: str, expected: str, secret_parts: list[str]) -> None:
    redacted = redact_url(url)
    assert redacted == expected
    for part in secret_parts:
        assert part not in redacted


@pytest.mark.parametrize(
    ("url", "password"),
    [
        ("postgresql+psycopg2://alice:Xq@Zw7@127.0.0.1:1/appdb", "Xq@Zw7"),
        ("postgresql+psycopg2://alice:Xq@Zw7@Yv9@127.0.0.1:1/appdb", "Xq@Zw7@Yv9"),
    ],
)
def test_a_password_with_at_signs_reaches_the_driver_whole_and_never_a_message(url: str, password: str) -> None:
    eng = create_engine_from_url(url)
    try:
        assert (eng.url.username, eng.url.password, eng.url.host, eng.url.port) == ("alice", password, "127.0.0.1", 1)
        with pytest.raises(AppDatabaseError) as caught:
            appdb.check_connection(eng)
        with pytest.raises(AppDatabaseError) as caught_read:
            read_instances(eng)
    finally:
        eng.dispose()
    for message in (str(caught.value), str(caught_read.value)):
        assert message.startswith("app database unreachable (postgresql+psycopg2://alice:***@127.0.0.1:1/appdb)")
        for part in password.split("@"):
            assert part not in message


def test_a_query_password_never_reaches_a_message() -> None:
    secret = "Qry-S3cret"
    eng = create_engine_from_url(f"postgresql+psycopg2://alice@127.0.0.1:1/appdb?sslmode=disable&Password={secret}")
    try:
        with pytest.raises(AppDatabaseError) as caught:
            appdb.check_connection(eng)
    finally:
        eng.dispose()
    assert secret not in str(caught.value) and "Password=***" in str(caught.value)


def test_database_now_is_the_servers_clock_in_utc(engine: Engine) -> None:
    before = datetime.now(timezone.utc)
    now = appdb.database_now(engine)
    assert now.tzinfo is not None and now.utcoffset() == timedelta(0)
    # The same machine: the server's clock agrees with ours (loosely; no timing assertion).
    assert abs(now - before) < timedelta(minutes=5)
    with engine.connect() as conn:
        server = conn.execute(sa.select(sa.type_coerce(sa.func.current_timestamp(), appdb.UTCDateTime()))).scalar_one()
    assert abs(now - server) < timedelta(minutes=1)
    if engine.dialect.name == "sqlite":  # finer than SQLite's whole-second CURRENT_TIMESTAMP
        assert any(appdb.database_now(engine).microsecond for _ in range(50))


def test_database_now_on_an_unreachable_server_is_one_line() -> None:
    eng = create_engine_from_url("postgresql+psycopg2://alice:Pw-9z@127.0.0.1:1/appdb")
    try:
        with pytest.raises(AppDatabaseError) as caught:
            appdb.database_now(eng)
    finally:
        eng.dispose()
    assert "\n" not in str(caught.value) and "Pw-9z" not in str(caught.value)


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


@pytest.mark.parametrize("url", ["nonsense://user:topsecret@host/db", "nonsense://user:top@secret@host/db"])
def test_invalid_url_is_an_app_database_error(url: str) -> None:
    with pytest.raises(AppDatabaseError) as caught:
        create_engine_from_url(url)
    assert "top" not in str(caught.value) and "secret" not in str(caught.value)


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
