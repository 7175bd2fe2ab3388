"""The Sync credits page, ``GET /billing?instance=<token>`` (SPEC "Manual sync").

Two halves:

* HTTP checks with Starlette's TestClient on a real app database and the generic billing
  simulator: the headers, the error pages (no instance data), the access log (never the
  token), the ``CREDITSYNC_FRAME_ANCESTORS`` setting.
* A real browser: Playwright driving Debian's ``/usr/bin/chromium`` (``executable_path``;
  Playwright never downloads a browser here) against a real ``creditsync serve``
  subprocess: load, see plan and credits, click **Sync credits**, see the new plan, the
  database and the audit updated; a bad token; a rate limit; billing down; framed by an
  allowed origin and by another one. Skipped, with the reason, only when chromium (or the
  playwright package) is absent; mandatory with ``CREDITSYNC_REQUIRE_BROWSER=1`` (CI).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from creditsync_pipeline.server.app import create_app
from creditsync_pipeline.server.tokens import sign_instance_token
from creditsync_pipeline.settings import Secret, Settings, SettingsError, from_env
from creditsync_pipeline.simulators.generic import BillingSimulator

from . import helpers
from .helpers import TOKEN, audit_rows, dump_tables, end_state, seeded

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*starlette.testclient.*")
    from starlette.testclient import TestClient

APP_SECRET = "app-SECRET-page-7d1e0c"
CHROMIUM = os.environ.get("CREDITSYNC_CHROMIUM", "/usr/bin/chromium")
SECRETS = (APP_SECRET, TOKEN)


def token_for(instance_id: str, sign_date: datetime | None = None, secret: str = APP_SECRET) -> str:
    return sign_instance_token(secret, instance_id, sign_date)


def assert_clean(text: str, *tokens: str) -> None:
    for needle in (*SECRETS, *tokens):
        assert needle not in text, "a secret or token leaked"


def token_parts(token: str) -> tuple[str, ...]:
    return (token, *token.split("."))


# -- HTTP checks (no browser) --------------------------------------------------------------------


@pytest.fixture
def world(db_url):
    data = seeded(db_url)
    with BillingSimulator(data.records, token=TOKEN) as sim:
        yield data, sim


def make_settings(db_url: str, billing_url: str, **overrides) -> Settings:
    values = dict(database_url=db_url, billing_api_url=billing_url, billing_api_token=Secret(TOKEN),
                  app_secret=Secret(APP_SECRET), receiver_workers=0)
    values.update(overrides)
    return Settings(**values)


@pytest.fixture
def client(world, db_url) -> Iterator[TestClient]:
    _, sim = world
    cfg = make_settings(db_url, sim.base_url, frame_ancestors="'self' https://manage.wix.com https://www.wix.com")
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        yield c


def assert_page_headers(response, frame_ancestors: str = "'self' https://manage.wix.com https://www.wix.com") -> None:
    csp = response.headers["content-security-policy"]
    assert f"frame-ancestors {frame_ancestors}" in csp
    assert "script-src 'self'" in csp and "default-src 'none'" in csp and "'unsafe-inline'" not in csp
    assert "x-frame-options" not in response.headers  # DENY would break the marketplace iframe
    assert response.headers["referrer-policy"] == "no-referrer"
    assert response.headers["cache-control"] == "no-store"
    assert response.headers["x-content-type-options"] == "nosniff"


def test_page_shows_the_callers_plan_and_credits_and_the_button(client, world, db_url):
    data, _ = world
    used = end_state(db_url)["abc123"][2]
    before = dump_tables(db_url)
    response = client.get("/billing", params={"instance": token_for("abc123")})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert_page_headers(response)
    page = response.text
    assert '<button type="button" id="sync-credits"' in page and ">Sync credits</button>" in page
    assert 'aria-live="polite"' in page
    assert '<script src="/billing/static/billing.js"></script>' in page  # same origin: script-src 'self'
    assert "<script>" not in page and "style=" not in page  # nothing inline for the CSP to refuse
    fields = dict(re.findall(r'data-field="(\w+)">([^<]*)<', page))
    assert fields == {"instance_id": "abc123", "plan_id": "free", "credits_total": "100",
                      "credits_used": str(used), "credits_left": str(100 - used)}
    assert dump_tables(db_url) == before  # a read only: the page itself changes nothing


def test_instance_id_is_html_escaped(client, db_url, world):
    from creditsync_pipeline import appdb

    engine = appdb.create_engine_from_url(db_url)
    try:
        appdb.insert_instances(engine, [{"instance_id": "<b>x</b>&'\"", "plan_id": "free", "credits_total": 100}])
    finally:
        engine.dispose()
    page = client.get("/billing", params={"instance": token_for("<b>x</b>&'\"")}).text
    assert "<b>x</b>" not in page and "&lt;b&gt;x&lt;/b&gt;&amp;&#x27;&quot;" in page


def bad_tokens() -> list[tuple[str, dict[str, str] | None, str]]:
    good = token_for("abc123")
    stale = token_for("abc123", sign_date=datetime.now(timezone.utc) - timedelta(hours=25))
    return [
        ("missing", None, "Open this page from your dashboard"),
        ("empty", {"instance": ""}, "Open this page from your dashboard"),
        ("tampered", {"instance": good[:-2] + ("AA" if not good.endswith("AA") else "BB")}, "This link is not valid"),
        ("wrong secret", {"instance": token_for("abc123", secret="another-secret")}, "This link is not valid"),
        ("garbage", {"instance": "not-a-token"}, "This link is not valid"),
        ("stale", {"instance": stale}, "This link has expired"),
        ("in the header only", None, "Open this page from your dashboard"),
    ]


@pytest.mark.parametrize("case, params, heading", bad_tokens(), ids=[c[0] for c in bad_tokens()])
def test_a_bad_token_is_a_401_page_without_instance_data(client, db_url, case, params, heading, caplog):
    caplog.set_level(logging.DEBUG)
    before = dump_tables(db_url)
    headers = {"x-wix-instance": token_for("abc123")} if case == "in the header only" else None
    response = client.get("/billing", params=params, headers=headers)
    assert response.status_code == 401
    assert response.headers["content-type"].startswith("text/html")
    assert_page_headers(response)
    assert f"<h1>{heading}</h1>" in response.text
    for leaked in ("abc123", "data-field", "sync-credits", "billing.js", "credits_total"):
        assert leaked not in response.text
    assert dump_tables(db_url) == before
    server_side = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("creditsync"))
    assert_clean(server_side + response.text, *token_parts((params or {}).get("instance") or "none-given"))


def test_two_tokens_in_the_link_are_refused(client):
    response = client.get("/billing?instance=" + token_for("abc123") + "&instance=" + token_for("site-0002"))
    assert response.status_code == 401 and "abc123" not in response.text and "site-0002" not in response.text


def test_a_valid_token_for_an_unknown_instance_is_a_404_page(client):
    response = client.get("/billing", params={"instance": token_for("never-provisioned")})
    assert response.status_code == 404
    assert_page_headers(response)
    assert "never-provisioned" not in response.text and "sync-credits" not in response.text


def test_database_down_is_a_503_page(tmp_path):
    cfg = make_settings(f"sqlite:///{tmp_path / 'missing' / 'app.db'}", "http://127.0.0.1:9")
    with TestClient(create_app(cfg), raise_server_exceptions=False) as c:
        response = c.get("/billing", params={"instance": token_for("abc123")})
    assert response.status_code == 503
    assert "temporarily unavailable" in response.text and "abc123" not in response.text


def test_static_files_carry_the_same_headers(client):
    script = client.get("/billing/static/billing.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "/api/billing/sync-credits" in script.text and "x-wix-instance" in script.text
    assert_page_headers(script)
    style = client.get("/billing/static/billing.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert client.get("/billing/static/../app.py").status_code == 404
    assert client.get("/billing/static/nope.js").status_code == 404


def test_the_access_log_never_holds_the_token(client, caplog):
    caplog.set_level(logging.DEBUG)
    token = token_for("abc123")
    assert client.get("/billing", params={"instance": token}).status_code == 200
    assert client.get("/billing", params={"instance": token[:-3]}).status_code == 401
    access = [r.getMessage() for r in caplog.records if r.name == "creditsync.server.access"]
    assert any(" GET /billing 200 " in line for line in access), access
    assert any(" GET /billing 401 " in line for line in access), access
    server_side = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("creditsync"))
    assert_clean(server_side, *token_parts(token), *token_parts(token[:-3]))


@pytest.mark.parametrize("value, expected", [
    ("", "'self'"),
    ("'self' https://manage.wix.com https://www.wix.com", "'self' https://manage.wix.com https://www.wix.com"),
    ("  https://*.wix.com   http://127.0.0.1:8123 ", "https://*.wix.com http://127.0.0.1:8123"),
    ("'none'", "'none'"),
])
def test_frame_ancestors_setting(value, expected):
    assert from_env({"CREDITSYNC_FRAME_ANCESTORS": value}).frame_ancestors == expected


@pytest.mark.parametrize("value", [
    "*", "https:", "https://*", "*.com", "https://*.com", "'self'; script-src *", "'self',https://a.example",
    "https://a.example/path", "'unsafe-inline'", "'none' https://a.example", "javascript:alert(1)",
])
def test_frame_ancestors_setting_refuses_what_lets_anyone_frame(value):
    with pytest.raises(SettingsError, match="CREDITSYNC_FRAME_ANCESTORS"):
        from_env({"CREDITSYNC_FRAME_ANCESTORS": value})


# -- the real browser ----------------------------------------------------------------------------


def _browser_required() -> bool:
    return os.environ.get("CREDITSYNC_REQUIRE_BROWSER", "").strip().lower() in {"1", "true", "yes"}


@pytest.fixture(scope="module")
def browser():
    """Debian's chromium under Playwright (skip, or fail in CI, when absent)."""
    problem = None
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        problem = f"chromium not found at {CHROMIUM} (apt-get install -y chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        problem = problem or "the playwright package is not installed (pip install -e '.[dev]')"
    if problem:
        if _browser_required():
            pytest.fail(f"CREDITSYNC_REQUIRE_BROWSER=1 but {problem}", pytrace=False)
        pytest.skip(problem)
    os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
    with sync_playwright() as pw:
        # chromium_sandbox stays False (Playwright's default): the tests run as root in CI.
        launched = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            yield launched
        finally:
            launched.close()


@dataclass
class Served:
    base: str
    log: list[str]
    data: object
    sim: BillingSimulator
    db_url: str


@contextmanager
def creditsync_serve(db_url: str, billing_url: str, **env_overrides: str) -> Iterator[tuple[str, list[str]]]:
    """``creditsync serve`` as an operator runs it; yield its base URL and its log lines."""
    env = {
        "DATABASE_URL": db_url,
        "BILLING_API_URL": billing_url,
        "BILLING_API_TOKEN": TOKEN,
        "CREDITSYNC_APP_SECRET": APP_SECRET,
        "CREDITSYNC_RECEIVER_WORKERS": "0",
        **env_overrides,
    }
    with helpers.creditsync_serve(env) as serve:
        yield serve.base_url, serve.captured


class _Framing(BaseHTTPRequestHandler):
    """A marketplace dashboard stand-in: one page that frames the URL in ``server.frame_url``."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        body = (f'<!DOCTYPE html><html><body><h1>Dashboard</h1>'
                f'<iframe title="app" src="{self.server.frame_url}" width="800" height="600"></iframe>'  # type: ignore[attr-defined]
                f'</body></html>').encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format, *args):  # noqa: A002 - quiet
        pass


@contextmanager
def dashboard() -> Iterator[ThreadingHTTPServer]:
    """A framing page on its own origin (http://127.0.0.1:<its port>)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Framing)
    server.frame_url = "about:blank"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def allowed_dashboard() -> Iterator[ThreadingHTTPServer]:
    with dashboard() as server:
        yield server


@pytest.fixture(params=[pytest.param("sqlite", id="sqlite"),
                        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres)])
def browser_db_url(request) -> str:
    return request.getfixturevalue({"sqlite": "sqlite_url", "postgres": "pg_url"}[request.param])


def _stack(db_url: str, allowed: ThreadingHTTPServer, **env: str) -> Iterator[Served]:
    data = seeded(db_url)
    ancestors = f"'self' http://127.0.0.1:{allowed.server_address[1]}"
    with BillingSimulator(data.records, token=TOKEN) as sim, \
            creditsync_serve(db_url, sim.base_url, CREDITSYNC_FRAME_ANCESTORS=ancestors, **env) as (base, log):
        yield Served(base=base, log=log, data=data, sim=sim, db_url=db_url)


@pytest.fixture
def served(browser, browser_db_url, allowed_dashboard) -> Iterator[Served]:
    """Billing simulator + ``creditsync serve`` (limit 2 syncs per instance per minute)."""
    yield from _stack(browser_db_url, allowed_dashboard, CREDITSYNC_SYNC_RATE_LIMIT="2")


@pytest.fixture
def served_sqlite(browser, sqlite_url, allowed_dashboard) -> Iterator[Served]:
    yield from _stack(sqlite_url, allowed_dashboard, CREDITSYNC_SYNC_RATE_LIMIT="2")


@pytest.fixture
def page(browser):
    context = browser.new_context()
    tab = context.new_page()
    try:
        yield tab
    finally:
        context.close()


def page_url(served: Served, instance_id: str, **kw) -> str:
    return f"{served.base}/billing?instance={token_for(instance_id, **kw)}"


def field(page, name: str) -> str:
    return page.locator(f'[data-field="{name}"]').inner_text()


@pytest.mark.browser
@pytest.mark.slow
def test_click_sync_credits_shows_the_new_plan_and_updates_db_and_audit(page, served):
    from playwright.sync_api import expect

    used = end_state(served.db_url)["abc123"][2]
    url = page_url(served, "abc123")
    response = page.goto(url)
    assert response is not None and response.status == 200
    assert page.title() == "Billing & Credits"
    expect(page.get_by_label("Plan", exact=True)).to_have_text("free")
    expect(page.get_by_label("Credits total")).to_have_text("100")
    expect(page.get_by_label("Credits used")).to_have_text(str(used))
    button = page.get_by_role("button", name="Sync credits")
    status = page.get_by_role("status")
    expect(status).to_have_attribute("aria-live", "polite")

    button.click()
    expect(status).to_have_text("Updated: your plan changed from free (100 credits) to pro (5000 credits).")
    assert field(page, "plan_id") == "pro" and field(page, "credits_total") == "5000"
    assert field(page, "credits_left") == str(5000 - used)
    assert end_state(served.db_url)["abc123"] == ("pro", 5000, used)  # usage untouched
    audit = audit_rows(served.db_url)
    assert list(zip(audit["instance_id"], audit["trigger"], audit["old_plan_id"], audit["new_plan_id"])) == [
        ("abc123", "manual", "free", "pro")]

    expect(button).to_be_enabled()
    button.click()
    expect(status).to_have_text("Already correct: billing agrees with your plan, pro (5000 credits). Nothing changed.")
    assert len(audit_rows(served.db_url)) == 1

    page.reload()  # what the database now says, as the page renders it
    expect(page.get_by_label("Plan", exact=True)).to_have_text("pro")
    log = "".join(served.log)
    assert "Synced credits for instance abc123: 100 → 5000" in log
    assert re.search(r"GET /billing 200 ", log) and re.search(r"POST /api/billing/sync-credits 200 ", log)
    assert_clean(log, *token_parts(url.split("instance=", 1)[1]))


@pytest.mark.browser
@pytest.mark.slow
def test_a_bad_token_shows_the_error_page(page, served_sqlite):
    good = token_for("abc123")
    for token, heading in [(good[:-2] + ("AA" if not good.endswith("AA") else "BB"), "This link is not valid"),
                           (token_for("abc123", sign_date=datetime.now(timezone.utc) - timedelta(hours=30)),
                            "This link has expired")]:
        response = page.goto(f"{served_sqlite.base}/billing?instance={token}")
        assert response is not None and response.status == 401
        assert page.get_by_role("heading", level=1).inner_text() == heading
        assert page.get_by_role("button").count() == 0
        assert "abc123" not in page.content() and "free" not in page.inner_text("body")
    response = page.goto(f"{served_sqlite.base}/billing")
    assert response is not None and response.status == 401
    assert page.get_by_role("heading", level=1).inner_text() == "Open this page from your dashboard"
    assert audit_rows(served_sqlite.db_url).empty


@pytest.mark.browser
@pytest.mark.slow
def test_a_rate_limit_says_when_to_retry(page, served_sqlite):
    from playwright.sync_api import expect

    page.goto(page_url(served_sqlite, "site-0002"))
    button = page.get_by_role("button", name="Sync credits")
    status = page.get_by_role("status")
    button.click()
    expect(status).to_contain_text("Updated: your plan changed from free (100 credits)")
    expect(button).to_be_enabled()
    button.click()
    expect(status).to_contain_text("Already correct")
    expect(button).to_be_enabled()
    button.click()  # the third within a minute: over CREDITSYNC_SYNC_RATE_LIMIT=2
    expect(status).to_contain_text("Too many syncs in a row. Nothing changed. Try again in ")
    match = re.search(r"Try again in (\d+) seconds? \(at [^)]+\)\.$", status.inner_text())
    assert match and 1 <= int(match.group(1)) <= 60, status.inner_text()
    expect(button).to_be_disabled()  # until Retry-After has passed
    assert len(audit_rows(served_sqlite.db_url)) == 1


@pytest.mark.browser
@pytest.mark.slow
def test_billing_down_says_nothing_changed(page, served_sqlite):
    from playwright.sync_api import expect

    page.goto(page_url(served_sqlite, "abc123"))
    served_sqlite.sim.add_fault("error", endpoint="any", count=None)
    page.get_by_role("button", name="Sync credits").click()
    expect(page.get_by_role("status")).to_contain_text(
        "Billing is not answering right now, so nothing changed. Try again in ", timeout=60_000)
    assert field(page, "plan_id") == "free"
    assert end_state(served_sqlite.db_url)["abc123"][:2] == ("free", 100)
    assert audit_rows(served_sqlite.db_url).empty


@pytest.mark.browser
@pytest.mark.slow
def test_framed_by_the_allowed_origin_it_works_by_another_it_is_blocked(page, served_sqlite, allowed_dashboard):
    from playwright.sync_api import expect

    url = page_url(served_sqlite, "abc123")
    allowed_dashboard.frame_url = url  # type: ignore[attr-defined]
    page.goto(f"http://127.0.0.1:{allowed_dashboard.server_address[1]}/")
    frame = page.frame_locator("iframe")
    expect(frame.get_by_label("Plan", exact=True)).to_have_text("free")
    frame.get_by_role("button", name="Sync credits").click()
    expect(frame.get_by_role("status")).to_contain_text("to pro (5000 credits)")
    assert end_state(served_sqlite.db_url)["abc123"][:2] == ("pro", 5000)

    with dashboard() as other:  # same host, another port: another origin, not in frame-ancestors
        other.frame_url = page_url(served_sqlite, "site-0002")  # type: ignore[attr-defined]
        refusals: list[str] = []
        page.on("console", lambda message: refusals.append(message.text))
        page.goto(f"http://127.0.0.1:{other.server_address[1]}/")
        expect(page.get_by_role("heading", name="Dashboard")).to_be_visible()
        page.wait_for_load_state("load")
        child = page.frames[1]
        assert not child.url.startswith(served_sqlite.base), child.url  # the browser refused to render it
        assert page.frame_locator("iframe").get_by_role("button").count() == 0
        assert any("frame-ancestors" in text for text in refusals), refusals
    assert end_state(served_sqlite.db_url)["site-0002"][:2] == ("free", 100)
