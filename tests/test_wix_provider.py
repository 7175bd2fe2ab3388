"""The Wix provider over real HTTP against the Wix simulator (tokens, look-ups, faults, secrets)."""

from __future__ import annotations

import json
import logging
import threading

import httpx
import pytest

from creditsync_pipeline import settings
from creditsync_pipeline.billing import BillingAuthError, BillingUnavailableError, provider_from_settings
from creditsync_pipeline.billing.base import LOOKUP_ERROR, REMOVED, UNAVAILABLE
from creditsync_pipeline.billing.wix import TokenCache, WixProvider, shared_cache
from creditsync_pipeline.simulators.wix import WixSimulator

APP_ID = "wix-app-5e1d"
SECRET = "wix-SECRET-7c1f0a9e55d2"
IDS = [f"site-{i:03d}" for i in range(40)]
PLANS = ("starter", "pro", "team")


def instances(ids=IDS):
    """Every third instance free, the others on a paid package."""
    out = {}
    for n, iid in enumerate(ids):
        if n % 3 == 0:
            out[iid] = {"instanceId": iid, "isFree": True}
        else:
            out[iid] = {"instanceId": iid, "isFree": False, "billing": {
                "packageName": PLANS[n % 3], "billingCycle": "MONTHLY",
                "timeStamp": "2026-10-01T08:00:00.000Z", "autoRenewing": True}}
    return out


PAID = {iid: PLANS[n % 3] for n, iid in enumerate(IDS) if n % 3}


@pytest.fixture
def sim():
    with WixSimulator(instances(), app_id=APP_ID, app_secret=SECRET) as s:
        yield s


def make(sim, secret=SECRET, **kw):
    kw.setdefault("tokens", TokenCache())
    return WixProvider(APP_ID, secret, api_base=sim.base_url, backoff_initial=0.01, backoff_max=0.05,
                       max_retry_after=2.0, **kw)


def unresolved(snap):
    return {str(r.instance_id): (str(r.status), str(r.reason)) for r in snap.unresolved.itertuples(index=False)}


def plans(snap):
    return dict(zip(snap.records["instance_id"], snap.records["plan_id"]))


def test_full_run_looks_up_every_instance_once(sim):
    with make(sim) as wix:
        snap = wix.fetch_all(IDS)
    assert plans(snap) == PAID
    assert set(snap.records["status"]) == {"active"}
    assert snap.unresolved.empty and snap.lookups == len(IDS) and snap.looked_up == frozenset(IDS)
    assert snap.provider == "wix" and snap.requested_ids is None
    assert sim.request_count("token") == sim.request_count("instance") == sim.tokens_granted == len(IDS)


def test_fetch_all_needs_the_instance_ids(sim):
    with make(sim) as wix, pytest.raises(ValueError, match="no list of all instances"):
        wix.fetch_all()


def test_plan_map_and_trial(sim):
    sim.set_instance("site-001", {"instanceId": "site-001", "isFree": False, "billing": {
        "packageName": "com.app.pro_monthly", "timeStamp": "2026-10-01T08:00:00Z", "freeTrialInfo": {"status": "IN_PROGRESS"}}})
    with make(sim, plan_map={"com.app.pro_monthly": "pro"}) as wix:
        snap = wix.fetch_instances(["site-001"])
    assert snap.records[["plan_id", "status"]].values.tolist() == [["pro", "trialing"]]


def test_tokens_are_cached_until_shortly_before_expiry():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    calls = []

    def fetch():
        calls.append(now[0])
        return f"t{len(calls)}", 1000.0  # margin: min(300, 100) = 100 s

    assert cache.get("a", fetch) == "t1"
    now[0] += 899.9
    assert cache.get("a", fetch) == "t1"
    now[0] += 0.1
    assert cache.get("a", fetch) == "t2"
    assert cache.get("b", lambda: ("no-ttl", None)) == "no-ttl" and len(cache) == 1  # no lifetime: never cached
    assert cache.granted == 3 and cache.hits == 1


def test_cache_is_bounded_lru():
    cache = TokenCache(max_entries=3)
    for iid in "abcd":
        cache.get(iid, lambda iid=iid: (f"tok-{iid}", 14400))
    cache.get("b", lambda: pytest.fail("b is cached"))
    cache.get("e", lambda: ("tok-e", 14400))
    assert len(cache) == 3
    fetched = []
    cache.get("c", lambda: (fetched.append("c") or "tok-c2", 14400))
    assert fetched == ["c"]  # c was the least recently used: evicted


def test_a_second_look_up_reuses_the_token(sim):
    with make(sim) as wix:
        wix.fetch_instances(["site-001"])
        wix.fetch_instances(["site-001"])
    assert sim.tokens_granted == 1 and sim.request_count("instance") == 2


def test_token_cache_is_shared_per_app_and_secret(sim):
    a = WixProvider(APP_ID, SECRET, api_base=sim.base_url)
    b = WixProvider(APP_ID, SECRET, api_base=sim.base_url + "/")
    wrong = WixProvider(APP_ID, "not-" + SECRET, api_base=sim.base_url)
    try:
        assert a.tokens is b.tokens is shared_cache(sim.base_url, APP_ID, SECRET)
        a.fetch_instances(["site-001"])
        b.fetch_instances(["site-001"])
        assert sim.tokens_granted == 1
        # a provider with another secret never sees those tokens: the wrong secret shows at once
        assert wrong.tokens is not a.tokens
        with pytest.raises(BillingAuthError):
            wrong.fetch_instances(["site-001"])
    finally:
        for p in (a, b, wrong):
            p.close()


def test_one_token_request_per_instance_under_concurrency(sim):
    sim.add_fault("slow", endpoint="token", count=1, delay=0.5)
    cache = TokenCache()
    wixes = [make(sim, tokens=cache) for _ in range(8)]
    barrier = threading.Barrier(len(wixes))
    results = []

    def go(wix):
        barrier.wait()
        results.append(plans(wix.fetch_instances(["site-001"])))

    threads = [threading.Thread(target=go, args=(w,)) for w in wixes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for w in wixes:
        w.close()
    assert results == [{"site-001": "pro"}] * 8
    assert sim.request_count("token") == 1 and sim.tokens_granted == 1


def test_a_refusal_reaches_every_waiting_thread():
    cache = TokenCache()
    release = threading.Event()
    calls = []

    def fetch():
        calls.append(1)
        release.wait(5)
        from creditsync_pipeline.billing.wix.tokens import TokenRefused
        from creditsync_pipeline.billing.http import utcnow
        raise TokenRefused(utcnow(), "refused")

    errors = []

    def go():
        try:
            cache.get("a", fetch)
        except Exception as exc:  # noqa: BLE001
            errors.append(type(exc).__name__)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    while len(calls) < 1:
        pass
    release.set()
    for t in threads:
        t.join()
    assert calls == [1] and errors == ["TokenRefused"] * 4


def test_token_expired_mid_run_is_replaced_once(sim):
    with make(sim) as wix:
        wix.fetch_instances(["site-001"])
        sim.expire_tokens()  # the cached token is now refused (401)
        snap = wix.fetch_instances(["site-001"])
        assert plans(snap) == {"site-001": "pro"}
        assert sim.tokens_granted == 2 and sim.request_count("instance") == 3
        sim.reset_counts()
        sim.expire_next_tokens(4)  # four tokens die between grant and use during a full run
        snap = wix.fetch_all(IDS)
    assert plans(snap) == PAID and snap.unresolved.empty
    assert sim.request_count("instance") == len(IDS) + 4


def test_a_fresh_token_refused_too_is_a_failed_look_up(sim):
    sim.set_failure("site-001", 401, endpoint="instance")  # every token of site-001 is refused
    with make(sim) as wix:
        snap = wix.fetch_instances(["site-001", "site-002"])
    status, reason = unresolved(snap)["site-001"]
    assert status == LOOKUP_ERROR and "freshly granted access token" in reason and "OauthNG" not in reason
    assert plans(snap) == {"site-002": "team"}
    assert sim.tokens_granted == 3  # site-001: the first token and one replacement


@pytest.mark.parametrize("removed_status", [400, 403, 404, 401])
def test_removed_instances_are_left_alone_not_failed(removed_status):
    with WixSimulator(instances(), app_id=APP_ID, app_secret=SECRET, removed_status=removed_status) as sim:
        sim.remove_instance("site-004")
        sim.delete_instance("site-007")
        with make(sim) as wix:
            snap = wix.fetch_all(IDS)
    gone = unresolved(snap)
    assert set(gone) == {"site-004", "site-007"}
    assert all(s == REMOVED and "no longer installed" in r and f"HTTP {removed_status}" in r for s, r in gone.values())
    assert snap.failed_lookups == 0
    assert plans(snap) == {i: p for i, p in PAID.items() if i not in gone}


def test_removed_after_its_token_was_cached(sim):
    with make(sim) as wix:
        wix.fetch_instances(["site-001"])
        sim.remove_instance("site-001")  # the app is uninstalled: its tokens are revoked
        snap = wix.fetch_instances(["site-001"])
    assert unresolved(snap)["site-001"][0] == REMOVED


def test_wrong_secret_is_systemic_never_mass_removal(sim, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-" + SECRET
    with make(sim, secret=wrong) as wix, pytest.raises(BillingAuthError) as info:
        wix.fetch_all(IDS)
    message = str(info.value)
    assert "invalid_client" in message and "WIX_APP_SECRET" in message
    assert wrong not in message and wrong not in caplog.text and SECRET not in caplog.text
    assert sim.request_count("instance") == 0 and sim.request_count("token") <= 16


def test_a_full_run_granted_no_token_fails_instead_of_removing_everyone(sim):
    """A Wix that answered a bad secret like an uninstall: a full run still raises."""
    sim.set_instances({})
    with make(sim) as wix:
        with pytest.raises(BillingAuthError, match="granted none"):
            wix.fetch_all(IDS[:5])
        # one instance cannot be compared with others: removed
        assert unresolved(wix.fetch_all(IDS[:1]))["site-000"][0] == REMOVED
        # targeted runs (a webhook for an uninstalled site) report removed, never systemic
        assert {s for s, _ in unresolved(wix.fetch_instances(IDS[:3])).values()} == {REMOVED}


def test_no_grant_stops_a_long_full_run_early():
    many = [f"gone-{i:04d}" for i in range(400)]
    with WixSimulator({}, app_id=APP_ID, app_secret=SECRET) as sim, make(sim) as wix:
        with pytest.raises(BillingAuthError, match="granted none"):
            wix.fetch_all(many)
        assert sim.request_count("token") < 300


@pytest.mark.parametrize(
    "fault",
    [
        dict(kind="error", endpoint="token", after=3, count=2),
        dict(kind="drop", endpoint="token", after=5, count=1),
        dict(kind="rate_limit", endpoint="token", after=2, count=2, retry_after=0.05),
        dict(kind="error", endpoint="instance", after=3, count=2),
        dict(kind="drop", endpoint="instance", after=5, count=1),
        dict(kind="rate_limit", endpoint="instance", after=2, count=3, retry_after=0.05),
        dict(kind="slow", endpoint="instance", after=1, count=1, delay=1.5),
    ],
    ids=["token-500", "token-drop", "token-429", "instance-500", "instance-drop", "instance-429", "instance-slow"],
)
def test_transient_faults_are_retried(sim, fault):
    sim.add_fault(**fault)
    with make(sim, timeout=0.5) as wix:
        snap = wix.fetch_all(IDS)
    assert plans(snap) == PAID and snap.unresolved.empty


def test_retry_after_is_honoured_per_worker(sim):
    sim.add_fault("rate_limit", endpoint="instance", after=4, count=1, retry_after=1.5)
    waits = []
    with make(sim, concurrency=4) as wix:
        wix.api.sleep = waits.append
        snap = wix.fetch_all(IDS)
    assert waits == [1.5] and plans(snap) == PAID


def test_per_instance_rate_limit_gives_up_as_unavailable(sim):
    sim.set_rate_limit(2)  # two requests a minute per instance: a token and one instance call
    waits = []
    with make(sim, max_attempts=3) as wix:
        wix.api.sleep = waits.append
        assert plans(wix.fetch_instances(["site-001"])) == {"site-001": "pro"}
        snap = wix.fetch_instances(["site-001", "site-002"])  # site-001's third request is over the limit
    assert unresolved(snap) == {"site-001": (UNAVAILABLE, unresolved(snap)["site-001"][1])}
    assert "HTTP 429" in unresolved(snap)["site-001"][1] and plans(snap) == {"site-002": "team"}
    assert waits == [2.0, 2.0]  # Retry-After (the rest of the minute) capped by the budget


def test_a_few_failed_look_ups_are_left_alone(sim):
    for iid in ("site-001", "site-002", "site-005"):
        sim.set_failure(iid, 500, endpoint="instance" if iid == "site-002" else "token")
    with make(sim, max_attempts=2) as wix:
        snap = wix.fetch_all(IDS)
    failed = unresolved(snap)
    assert set(failed) == {"site-001", "site-002", "site-005"}
    assert {s for s, _ in failed.values()} == {UNAVAILABLE} and snap.failed_lookups == 3
    assert plans(snap) == {i: p for i, p in PAID.items() if i not in failed}


def test_more_than_ten_percent_failed_fails_the_full_run(sim):
    for iid in IDS[1:6]:  # 5 of 40 = 12.5 %
        sim.set_failure(iid, 503)
    with make(sim, max_attempts=2) as wix:
        with pytest.raises(BillingUnavailableError, match="more than 10% of 40 look-ups failed"):
            wix.fetch_all(IDS)
        # a targeted run has no such budget: it reports each
        snap = wix.fetch_instances(IDS[:8])
    assert len(unresolved(snap)) == 5


def test_billing_down_for_every_look_up_raises(sim):
    sim.add_fault("error", count=None)
    with make(sim, max_attempts=2) as wix, pytest.raises(BillingUnavailableError):
        wix.fetch_instances(["site-001"])


@pytest.mark.parametrize(
    "fault, reason",
    [
        (dict(kind="bad_shape", endpoint="instance", count=1), "expected an object with an 'instance' object"),
        (dict(kind="malformed", endpoint="instance", count=1), "non-JSON body"),
        (dict(kind="bad_shape", endpoint="token", count=1), "no usable 'access_token'"),
        (dict(kind="malformed", endpoint="token", count=1), "non-JSON body"),
    ],
    ids=["instance-shape", "instance-html", "token-shape", "token-html"],
)
def test_malformed_answers_leave_that_instance_alone(sim, fault, reason):
    sim.add_fault(**fault)
    with make(sim) as wix:
        snap = wix.fetch_instances(["site-001", "site-002"])
    (status, why), = unresolved(snap).values()
    assert status == LOOKUP_ERROR and reason in why


def test_wrong_base_url_is_not_an_uninstall(sim):
    with WixProvider(APP_ID, SECRET, api_base=sim.base_url + "/nope", tokens=TokenCache()) as wix:
        snap = wix.fetch_instances(["site-001"])
        assert unresolved(snap)["site-001"][0] == LOOKUP_ERROR and "WIX_API_BASE" in unresolved(snap)["site-001"][1]
        with pytest.raises(BillingUnavailableError, match="more than 10%"):
            wix.fetch_all(IDS)


def test_missing_permission_is_systemic(sim):
    sim.set_failure("site-001", 403, endpoint="instance")
    with make(sim) as wix, pytest.raises(BillingAuthError, match="Manage Your App"):
        wix.fetch_instances(["site-001"])


def test_unusable_app_rows_are_not_sent(sim):
    with make(sim) as wix:
        snap = wix.fetch_all(["site-001", "bad\x00id"])
        assert unresolved(snap)["bad\x00id"] == (LOOKUP_ERROR, unresolved(snap)["bad\x00id"][1])
        assert "not sent to Wix" in unresolved(snap)["bad\x00id"][1]
        assert sim.request_count("token") == 1
        with pytest.raises(ValueError, match="control characters"):
            wix.fetch_instances(["bad\x00id"])


def test_check_access(sim):
    sim.remove_instance("site-001")
    with make(sim) as wix:
        assert "not checked" in wix.check_access([])
        wix.fetch_instances(["site-002"])  # cached ...
        line = wix.check_access(["site-001", "site-002"])
        assert "site-002" in line and "granted an access token" in line
        assert sim.tokens_granted == 2  # ... yet the check asks for a fresh token
        with pytest.raises(BillingAuthError, match="each of 1 instance"):
            wix.check_access(["site-001"])
    with make(sim, secret="nope") as wix, pytest.raises(BillingAuthError, match="invalid_client"):
        wix.check_access(["site-002"])


def test_progress_is_logged_every_tenth(caplog):
    ids = [f"s{i:04d}" for i in range(1000)]
    caplog.set_level(logging.INFO, logger="creditsync.billing")
    with WixSimulator(instances(ids), app_id=APP_ID, app_secret=SECRET) as sim, make(sim) as wix:
        snap = wix.fetch_all(ids)
    assert len(snap.records) == 666
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("Wix: looked up")]
    assert lines[:-1] == [f"Wix: looked up {k * 100} of 1000 instance(s)" for k in range(1, 11)]
    assert lines[-1].startswith("Wix: looked up 1000 instance(s) in ") and lines[-1].endswith(
        ": 666 paid, 334 free, 0 removed, 0 failed")


def test_the_summary_counts_removed_and_failed(sim, caplog):
    sim.remove_instance("site-004")
    sim.set_failure("site-005", 500)
    caplog.set_level(logging.INFO, logger="creditsync.billing")
    with make(sim, max_attempts=1) as wix:
        wix.fetch_all(IDS)
    summary = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("Wix: looked up 40 "))
    assert summary.endswith(": 24 paid, 14 free, 1 removed, 1 failed")


def _echo_transport(token: str) -> httpx.MockTransport:
    """A rare edge no real server should do: an error body that repeats the access token."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/oauth2/token":
            return httpx.Response(200, json={"access_token": token, "expires_in": 14400})
        return httpx.Response(418, json={"error": request.headers["Authorization"]})

    return httpx.MockTransport(handler)


@pytest.mark.parametrize("token", ["OauthNG.JWS.abc-DEF_123", "plain-token-42xyz"])
def test_tokens_and_secret_never_reach_a_message(token, caplog):
    caplog.set_level(logging.DEBUG)
    with WixProvider(APP_ID, SECRET, api_base="http://wix.invalid", transport=_echo_transport(token),
                     tokens=TokenCache()) as wix:
        snap = wix.fetch_instances(["site-001"])
        text = " ".join([str(snap.unresolved.to_dict()), repr(wix), repr(wix.tokens), caplog.text])
    assert "refused" in unresolved(snap)["site-001"][1] and "***" in unresolved(snap)["site-001"][1]
    assert token not in text and SECRET not in text


def test_secret_never_in_repr_or_request_errors(sim, caplog):
    caplog.set_level(logging.DEBUG)
    sim.set_failure("site-001", 500)
    with make(sim, max_attempts=2) as wix:
        snap = wix.fetch_all(IDS)
        text = repr(wix) + json.dumps(snap.unresolved.to_dict()) + caplog.text
    assert SECRET not in text and "OauthNG" not in text


def test_from_settings():
    cfg = settings.from_env({
        "BILLING_PROVIDER": "wix", "WIX_APP_ID": APP_ID, "WIX_APP_SECRET": SECRET,
        "WIX_API_BASE": "http://127.0.0.1:9", "WIX_CONCURRENCY": "7", "CREDITSYNC_PLAN_MAP": '{"a": "b"}',
    })
    with provider_from_settings(cfg) as wix:
        assert isinstance(wix, WixProvider) and wix.lists_all is False
        assert wix.base_url == "http://127.0.0.1:9" and "concurrency=7" in repr(wix) and SECRET not in repr(wix)
    with pytest.raises(settings.SettingsError, match="WIX_APP_SECRET is not set"):
        provider_from_settings(settings.from_env({"BILLING_PROVIDER": "wix", "WIX_APP_ID": APP_ID}))
