"""What only MySQL/MariaDB has to prove: collation, time zones, sessions, the paged read.

Each test makes its own database on the server of ``mysql_url`` (skipped when there is
none, mandatory with ``CREDITSYNC_REQUIRE_MYSQL=1``). Everything the other servers share
runs here too, through the ``db_url``/``engine`` fixtures of the other test files.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from urllib.parse import quote

import pandas as pd
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from creditsync_pipeline import appdb
from creditsync_pipeline.appdb import AppDatabaseError, create_engine_from_url, init_db, read_instances
from creditsync_pipeline.appdb.dialects import mysql as mysql_dialect
from creditsync_pipeline.appdb.dialects.mysql import paged_read

from .appdb_support import NOW, ODD_IDS, T0, allow_null_created_at, by_id, corrections_frame, dump_db, instance_row, seed

pytestmark = pytest.mark.mysql


def _with_query(url: str, **params: str) -> str:
    sep = "&" if "?" in url else "?"
    return url + sep + "&".join(f"{k}={quote(v, safe='')}" for k, v in params.items())


@pytest.fixture
def mysql_engine(mysql_url: str) -> Iterator[Engine]:
    engine = create_engine_from_url(mysql_url)
    init_db(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def _portable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make read_instances take the portable path (bound SELECTs, SQLAlchemy's own decoding)."""
    monkeypatch.setattr(mysql_dialect.MySQL, "read_instances", lambda self, conn, wanted, *, ordered: None)


# ----------------------------------------------------------------------- schema


def test_text_columns_are_utf8mb4_binary_no_pad_and_tables_innodb(mysql_engine: Engine) -> None:
    with mysql_engine.connect() as conn:
        columns = conn.exec_driver_sql(
            "SELECT c.TABLE_NAME, c.COLUMN_NAME, c.CHARACTER_SET_NAME, c.COLLATION_NAME, k.PAD_ATTRIBUTE "
            "FROM information_schema.COLUMNS c JOIN information_schema.COLLATIONS k "
            "ON k.COLLATION_NAME = c.COLLATION_NAME WHERE c.TABLE_SCHEMA = DATABASE()"
        ).all() if _has_pad_attribute(conn) else None
        engines = dict(conn.exec_driver_sql(
            "SELECT TABLE_NAME, ENGINE FROM information_schema.TABLES WHERE TABLE_SCHEMA = DATABASE()"
        ).all())
        collations = conn.exec_driver_sql(
            "SELECT TABLE_NAME, COLUMN_NAME, CHARACTER_SET_NAME, COLLATION_NAME FROM information_schema.COLUMNS "
            "WHERE TABLE_SCHEMA = DATABASE() AND COLLATION_NAME IS NOT NULL"
        ).all()
    assert set(engines) >= set(appdb.metadata.tables) and set(engines.values()) == {"InnoDB"}
    keys = {(t, c) for t, c, _, _ in collations}
    assert {("instances", "instance_id"), ("instances", "plan_id"), ("plans", "plan_id"),
            ("billing_webhook_events", "event_id"), ("billing_customer_links", "customer_id")} <= keys
    for table, column, charset, collation in collations:
        assert charset == "utf8mb4", (table, column)
        assert collation in ("utf8mb4_nopad_bin", "utf8mb4_0900_bin"), (table, column, collation)
    if columns is not None:  # MySQL 8 / MariaDB 10.2+ report the pad attribute
        assert {pad for *_, pad in columns} == {"NO PAD"}


def _has_pad_attribute(conn: sa.Connection) -> bool:
    return bool(conn.exec_driver_sql(
        "SELECT COUNT(*) FROM information_schema.COLUMNS WHERE TABLE_SCHEMA = 'information_schema' "
        "AND TABLE_NAME = 'COLLATIONS' AND COLUMN_NAME = 'PAD_ATTRIBUTE'"
    ).scalar())


def test_one_free_plan_through_the_generated_marker(mysql_engine: Engine) -> None:
    appdb.upsert_plans(mysql_engine, [{"plan_id": "free", "credits": 100, "is_free": True},
                                      {"plan_id": "pro", "credits": 5000, "is_free": False},
                                      {"plan_id": "team", "credits": 20000, "is_free": False}])
    before = dump_db(mysql_engine)
    with mysql_engine.begin() as conn:  # the app's own INSERT is refused by the server, not by creditsync
        with pytest.raises(sa.exc.IntegrityError):
            conn.exec_driver_sql("INSERT INTO plans (plan_id, credits, is_free) VALUES ('gratis', 0, TRUE)")
    with pytest.raises(AppDatabaseError):  # and an upsert never rewrites the existing free plan instead
        appdb.upsert_plans(mysql_engine, [{"plan_id": "gratis", "credits": 10, "is_free": True}])
    assert dump_db(mysql_engine) == before
    with mysql_engine.connect() as conn:
        markers = dict(conn.exec_driver_sql("SELECT plan_id, free_plan_marker FROM plans").all())
    assert markers == {"free": 1, "pro": None, "team": None}


def test_init_db_releases_its_lock_and_skips_an_index_that_exists(mysql_engine: Engine) -> None:
    assert init_db(mysql_engine)[-1] == "004_audit_reverts.sql"  # the second run: CREATE INDEX skipped
    with mysql_engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT IS_FREE_LOCK('creditsync.init_db')").scalar() == 1
        index = conn.exec_driver_sql(
            "SELECT GROUP_CONCAT(COLUMN_NAME ORDER BY SEQ_IN_INDEX) FROM information_schema.STATISTICS "
            "WHERE TABLE_SCHEMA = DATABASE() AND INDEX_NAME = 'ix_credit_sync_audit_reverts'"
        ).scalar()
    assert index == "trigger,reason"


# --------------------------------------------------------------- sessions, zones


def test_utc_whatever_the_sessions_default_time_zone(mysql_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A session that starts at +05:45 (the server's or the URL's default) still stores and
    compares UTC: creditsync sets +00:00 on connect, and the DDL's defaults are UTC_TIMESTAMP."""
    odd = create_engine_from_url(_with_query(mysql_url, init_command="SET time_zone = '+05:45'"))
    try:
        init_db(odd)
        allow_null_created_at(odd)
        with odd.connect() as conn:
            assert conn.exec_driver_sql("SELECT @@SESSION.time_zone").scalar() == "+00:00"
        stamps = [
            datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=timezone.utc),
            datetime(2024, 2, 29, 23, 59, 59, 1, tzinfo=timezone(timedelta(hours=5, minutes=45))),
            datetime(2038, 1, 19, 3, 14, 8, 500000, tzinfo=timezone.utc),
            datetime(2100, 6, 30, 12, 0, 0, tzinfo=timezone(timedelta(hours=-9))),
            None,
        ]
        seed(odd, [instance_row(f"i{n}", created_at=stamps[n % 5], updated_at=stamps[(n + 1) % 5]) for n in range(15)]
             + [instance_row("by-default")])
        fast = read_instances(odd)
        _portable(monkeypatch)
        portable = read_instances(odd)
        now = appdb.database_now(odd)
    finally:
        odd.dispose()
    pd.testing.assert_frame_equal(fast, portable)
    rows = by_id(fast)
    assert rows["i1"]["created_at"] == pd.Timestamp("2024-02-29 18:14:59.000001", tz="UTC")
    assert rows["i3"]["created_at"] == pd.Timestamp("2100-06-30 21:00", tz="UTC")
    assert fast["created_at"].isna().sum() == 3
    assert abs(now - datetime.now(timezone.utc)) < timedelta(minutes=5)
    # The row's DEFAULT, stamped by the server in the +00:00 session: now, not now + 5:45.
    assert abs(rows["by-default"]["created_at"].to_pydatetime() - now) < timedelta(minutes=5)


def test_an_apps_own_session_in_another_zone_stamps_defaults_in_utc(mysql_engine: Engine) -> None:
    """DEFAULT (UTC_TIMESTAMP(6)): an app server inserting from a +09:00 session stamps UTC."""
    with mysql_engine.connect() as conn:
        conn.exec_driver_sql("SET time_zone = '+09:00'")
        conn.exec_driver_sql("INSERT INTO instances (instance_id, plan_id, credits_total) VALUES ('app-row', 'free', 100)")
        conn.commit()
    created = read_instances(mysql_engine, ["app-row"])["created_at"].iloc[0].to_pydatetime()
    assert abs(created - appdb.database_now(mysql_engine)) < timedelta(minutes=5)


def test_utc_when_the_servers_global_default_zone_is_not(mysql_admin_engine: Engine, mysql_url: str) -> None:
    """The server's own default (SET GLOBAL time_zone) for new sessions, put back afterwards."""
    with mysql_admin_engine.connect() as admin:
        saved = admin.exec_driver_sql("SELECT @@GLOBAL.time_zone").scalar()
        try:
            admin.exec_driver_sql("SET GLOBAL time_zone = '-03:30'")
        except sa.exc.DBAPIError as exc:  # no SUPER/SYSTEM_VARIABLES_ADMIN: the URL test above covers it
            pytest.skip(f"cannot change the server's default time zone: {exc.orig}")
        try:
            engine = create_engine_from_url(mysql_url)
            try:
                init_db(engine)
                seed(engine, [instance_row("x", updated_at=T0)])
                with engine.connect() as conn:
                    assert conn.exec_driver_sql("SELECT @@SESSION.time_zone").scalar() == "+00:00"
                rows = by_id(read_instances(engine))
                assert rows["x"]["updated_at"] == pd.Timestamp(T0)
                assert abs(appdb.database_now(engine) - datetime.now(timezone.utc)) < timedelta(minutes=5)
            finally:
                engine.dispose()
        finally:
            admin.exec_driver_sql(f"SET GLOBAL time_zone = '{saved}'")


def test_sessions_are_strict_even_when_the_server_is_not(mysql_url: str) -> None:
    lax = create_engine_from_url(_with_query(mysql_url, init_command="SET sql_mode = ''"))
    try:
        init_db(lax)
        with lax.connect() as conn:
            assert "STRICT_ALL_TABLES" in conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
        seed(lax, [])
        too_long = "x" * 300  # over VARCHAR(256): an error, never an id cut to another id
        with pytest.raises(AppDatabaseError, match="too long"):
            appdb.insert_instances(lax, [instance_row(too_long)])
        with pytest.raises(AppDatabaseError, match="too long"):
            appdb.land_webhook_event(lax, event_id="e" * 600, event_type="t", instance_id="x", payload=None)
        assert appdb.count_instances(lax) == 0
        assert appdb.unprocessed_webhook_events(lax) == []
    finally:
        lax.dispose()


def test_bulk_literals_survive_a_no_backslash_escapes_ansi_quotes_session(mysql_url: str) -> None:
    """The bulk INSERT escapes strings the way the session parses them; "..." may be identifiers."""
    quirky = create_engine_from_url(
        _with_query(mysql_url, init_command="SET sql_mode = 'NO_BACKSLASH_ESCAPES,ANSI_QUOTES'")
    )
    try:
        init_db(quirky)
        ids = [i for i in ODD_IDS if i] + ["back\\slash\\", "quote'\\'", "nul\0byte"]
        seed(quirky, [instance_row(i) for i in ids])
        result = appdb.apply_corrections(
            quirky, corrections_frame([{"instance_id": i, "reason": f"why {i}"} for i in ids]),
            run_id="esc", trigger="manual", now=NOW,
        )
        assert sorted(result.applied["instance_id"]) == sorted(ids)
        audit = appdb.read_audit(quirky, "esc")
        assert dict(zip(audit["instance_id"], audit["reason"])) == {i: f"why {i}" for i in ids}
        assert sorted(read_instances(quirky)["instance_id"]) == sorted(ids)  # the paged read too
        assert appdb.remember_customer_links(quirky, "stripe", {i: f"cus {i}" for i in ids}) == len(ids)
        assert appdb.land_webhook_event(quirky, event_id='e"1', event_type="t", instance_id="o'brien", payload=None).inserted
        with quirky.connect() as conn:
            assert "ANSI_QUOTES" in conn.exec_driver_sql("SELECT @@SESSION.sql_mode").scalar()
    finally:
        quirky.dispose()


def test_bare_mysql_urls_use_pymysql_and_utf8mb4(mysql_url: str) -> None:
    for scheme in ("mysql", "mariadb"):
        engine = create_engine_from_url(f"{scheme}://" + mysql_url.split("://", 1)[1])
        try:
            assert engine.dialect.driver == "pymysql"
            assert engine.url.query["charset"] == "utf8mb4"
            appdb.check_connection(engine)
        finally:
            engine.dispose()


# ------------------------------------------------------------------ the paged read


def test_paged_read_equals_the_portable_read(mysql_engine: Engine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny pages and a tiny GROUP_CONCAT limit: every page is cut and re-read in halves."""
    ids = [i for i in ODD_IDS if i] + [f"bulk-{n:05d}-" + "é" * (n % 40) for n in range(2_500)] + ["x" * 256]
    seed(mysql_engine, [instance_row(i, credits_total=n, credits_used=n % 7,
                                     updated_at=None if n % 11 == 0 else T0 + timedelta(microseconds=n))
                        for n, i in enumerate(ids)])
    monkeypatch.setattr(paged_read, "FIRST_PAGE_ROWS", 700)
    real_init = paged_read.PagedReader.__init__
    cut = {"pages": 0}

    def small_budget(self, conn, *, ordered):  # type: ignore[no-untyped-def]
        real_init(self, conn, ordered=ordered)
        self.budget = 20_000
        self.cursor.execute(f"SET SESSION group_concat_max_len = {self.budget}")

    real_page = paged_read.PagedReader._page

    def counting_page(self, where):  # type: ignore[no-untyped-def]
        page = real_page(self, where)
        cut["pages"] += page is None
        return page

    monkeypatch.setattr(paged_read.PagedReader, "__init__", small_budget)
    monkeypatch.setattr(paged_read.PagedReader, "_page", counting_page)
    fast = {ordered: read_instances(mysql_engine, ordered=ordered) for ordered in (True, False)}
    named = read_instances(mysql_engine, ids[::3] + ["absent"])
    assert cut["pages"] > 0
    monkeypatch.undo()
    _portable(monkeypatch)
    portable = read_instances(mysql_engine)
    pd.testing.assert_frame_equal(fast[True], portable)
    pd.testing.assert_frame_equal(fast[False].sort_values("instance_id").reset_index(drop=True), portable)
    pd.testing.assert_frame_equal(named, read_instances(mysql_engine, ids[::3] + ["absent"]))
    assert len(named) == len(ids[::3])


def test_a_null_plan_in_an_apps_table_falls_back_to_the_portable_read(mysql_engine: Engine) -> None:
    with mysql_engine.begin() as conn:
        conn.exec_driver_sql("ALTER TABLE instances MODIFY plan_id VARCHAR(256) NULL")
    seed(mysql_engine, [instance_row("has-plan"), instance_row("no-plan", plan_id=None)])
    frame = read_instances(mysql_engine)
    assert sorted(frame["instance_id"]) == ["has-plan", "no-plan"]
    assert pd.isna(by_id(frame)["no-plan"]["plan_id"])


# ------------------------------------------------------------------ passwords


def test_a_wrong_password_on_a_live_server_never_reaches_a_message(mysql_url: str) -> None:
    from sqlalchemy.engine import make_url

    url = make_url(mysql_url).set(username="creditsync_nobody", password="Pw@Zq9-s3cret")
    engine = create_engine_from_url(url.render_as_string(hide_password=False))
    try:
        for call in (lambda: appdb.check_connection(engine), lambda: read_instances(engine), lambda: init_db(engine)):
            with pytest.raises(AppDatabaseError) as caught:
                call()
            message = str(caught.value)
            assert "Pw@Zq9" not in message and "Zq9-s3cret" not in message and "\n" not in message
            assert "creditsync_nobody:***@" in message
    finally:
        engine.dispose()


def test_a_real_login_whose_password_holds_at_signs(mysql_admin_engine: Engine, mysql_url: str) -> None:
    """``mysql+pymysql://u:p@ss@h/d`` as an operator writes it: logs in, and no message shows it."""
    from sqlalchemy.engine import make_url

    database = make_url(mysql_url).database
    user, password = "creditsync_at_user", "p@ss@Wq9"
    with mysql_admin_engine.connect() as admin:
        try:
            admin.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        except sa.exc.DBAPIError as exc:
            pytest.skip(f"cannot create a user: {exc.orig}")
        try:
            admin.exec_driver_sql(f"GRANT ALL ON `{database}`.* TO '{user}'@'%%'")
            url = make_url(mysql_url)
            raw = f"mysql+pymysql://{user}:{password}@{url.host}:{url.port or 3306}/{database}"
            engine = create_engine_from_url(raw)
            try:
                appdb.check_connection(engine)  # the whole password reached the server
                with pytest.raises(AppDatabaseError) as caught:  # no schema yet: a server error
                    read_instances(engine)
                message = str(caught.value)
                assert f"{user}:***@" in message and "doesn't exist" in message
                assert "p@ss" not in message and "Wq9" not in message
                assert appdb.redact_url(raw) == f"mysql+pymysql://{user}:***@{url.host}:{url.port or 3306}/{database}"
            finally:
                engine.dispose()
        finally:
            admin.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")


def test_the_privileges_docs_mysql_md_lists_are_enough(mysql_admin_engine: Engine, mysql_url: str) -> None:
    """init-db with CREATE, ALTER, INDEX; everything else with SELECT, INSERT, UPDATE and
    CREATE TEMPORARY TABLES on the app's database (docs/mysql.md)."""
    from sqlalchemy.engine import make_url

    url = make_url(mysql_url)
    user, password = "creditsync_least", "Least-Pw-71"
    grant_runtime = f"SELECT, INSERT, UPDATE, CREATE TEMPORARY TABLES ON `{url.database}`.*"
    scoped = url.set(username=user, password=password).render_as_string(hide_password=False)
    with mysql_admin_engine.connect() as admin:
        try:
            admin.exec_driver_sql(f"CREATE USER '{user}'@'%%' IDENTIFIED BY '{password}'")
        except sa.exc.DBAPIError as exc:
            pytest.skip(f"cannot create a user: {exc.orig}")
        try:
            admin.exec_driver_sql(f"GRANT {grant_runtime} TO '{user}'@'%%'")
            admin.exec_driver_sql(f"GRANT CREATE, ALTER, INDEX ON `{url.database}`.* TO '{user}'@'%%'")
            engine = create_engine_from_url(scoped)
            try:
                init_db(engine)
                init_db(engine)
            finally:
                engine.dispose()
            admin.exec_driver_sql(f"REVOKE CREATE, ALTER, INDEX ON `{url.database}`.* FROM '{user}'@'%%'")
            engine = create_engine_from_url(scoped)
            try:
                seed(engine, [instance_row(f"p{n}") for n in range(5)])
                result = appdb.apply_corrections(engine, corrections_frame([{"instance_id": f"p{n}"} for n in range(5)]),
                                                 run_id="least", trigger="manual", now=NOW)
                assert len(result.applied) == 5
                landed = appdb.land_webhook_event(engine, event_id="evt-least", event_type="t", instance_id="p1",
                                                  payload="{}", lease_owner="me", lease_seconds=60)
                assert landed.inserted and landed.leased
                assert appdb.mark_webhook_events(engine, {landed.id: "corrected"}) == 1
                assert appdb.remember_customer_links(engine, "stripe", {"p1": "cus_1"}) == 1
                reverted = appdb.revert_run(engine, "least", revert_run_id="undo", now=NOW + timedelta(hours=1))
                assert len(reverted.reverted) == 5
                assert len(read_instances(engine)) == 5 and appdb.database_now(engine)
                with pytest.raises(sa.exc.OperationalError, match="DROP command denied"):  # no more than that
                    with engine.begin() as conn:
                        conn.exec_driver_sql("DROP TABLE plans")
            finally:
                engine.dispose()
        finally:
            admin.exec_driver_sql(f"DROP USER IF EXISTS '{user}'@'%%'")
