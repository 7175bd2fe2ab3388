"""The Stripe provider over real HTTP against the Stripe simulator: list, look-ups, faults, secrets."""

from __future__ import annotations

import logging
import time
from collections.abc import Collection, Iterator, Mapping
from datetime import date, datetime, timezone
from typing import Any

import httpx
import pandas as pd
import pytest

from creditsync_pipeline import rules
from creditsync_pipeline.billing import UNLINKED, BillingAuthError, BillingError, BillingMalformedError, BillingUnavailableError
from creditsync_pipeline.billing.generic import GenericBillingClient
from creditsync_pipeline.billing.stripe import StripeProvider, search_query
from creditsync_pipeline.simulators.generic import BillingSimulator, generate_records
from creditsync_pipeline.simulators.stripe import StripeSimulator

KEY = "sk_test_SECRET_4f1c9a7be2d04c55"
NOW = int(time.time())
DAY = 86_400
PLANS = ("free", "starter", "pro", "team")


class MemoryLinks:
    """An in-memory :class:`CustomerLinks` (the app database keeps the real ones)."""

    def __init__(self, links: Mapping[str, str] | None = None, *, fail: bool = False) -> None:
        self.links = dict(links or {})
        self.remembered: list[dict[str, str]] = []
        self.fail = fail

    def customers_of(self, instance_ids: Collection[str]) -> dict[str, str]:
        if self.fail:
            raise RuntimeError("database is down")
        return {i: self.links[i] for i in instance_ids if i in self.links}

    def instances_of(self, customer_ids: Collection[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for instance_id, customer in self.links.items():
            if customer in customer_ids:
                out.setdefault(customer, []).append(instance_id)
        return out

    def remember(self, links: Mapping[str, str]) -> None:
        if self.fail:
            raise RuntimeError("database is down")
        self.remembered.append(dict(links))
        self.links.update(links)


@pytest.fixture
def sim() -> Iterator[StripeSimulator]:
    with StripeSimulator(api_key=KEY) as s:
        yield s


@pytest.fixture
def make(sim: StripeSimulator):
    made: list[StripeProvider] = []

    def factory(**kw: Any) -> StripeProvider:
        kw.setdefault("base_url", sim.base_url)
        kw.setdefault("max_attempts", 3)
        kw.setdefault("backoff_initial", 0.0)
        kw.setdefault("backoff_max", 0.0)
        provider = StripeProvider(kw.pop("api_key", KEY), **kw)
        made.append(provider)
        return provider

    yield factory
    for p in made:
        p.close()


def customer(sim: StripeSimulator, cid: str, instance: str | None = None, **kw: Any) -> None:
    sim.put_customer(cid, metadata={"instance_id": instance} if instance else {}, **kw)


def subscription(sim: StripeSimulator, sid: str, cid: str, *, plan: str = "pro", created: int = NOW - 10 * DAY,
                 instance: str | None = None, **kw: Any) -> None:
    sim.put_subscription(sid, customer=cid, created=created, items=[{"price": f"price_{plan}", "lookup_key": plan}],
                         metadata={"instance_id": instance} if instance else {}, current_period_end=NOW + 20 * DAY, **kw)


def by_instance(snapshot) -> dict[str, list[tuple[str, str]]]:
    out: dict[str, list[tuple[str, str]]] = {}
    for r in snapshot.records.itertuples(index=False):
        out.setdefault(r.instance_id, []).append((r.plan_id, r.status))
    return {k: sorted(v) for k, v in out.items()}


# -- the full list ---------------------------------------------------------------------------


def test_full_list_every_page_every_status_and_the_metadata_either_side(sim, make) -> None:
    for n in range(25):
        cid = f"cus_{n:02d}"
        on_customer = n % 2 == 0
        customer(sim, cid, f"inst-{n:02d}" if on_customer else None)
        status = ["active", "trialing", "past_due", "canceled", "unpaid"][n % 5]
        subscription(sim, f"sub_{n:02d}", cid, plan=PLANS[1 + n % 3], created=NOW - n * 3600,
                     instance=None if on_customer else f"inst-{n:02d}", status=status,
                     ended_at=NOW - 60 if status == "canceled" else None)
    customer(sim, "cus_shop")  # the account sells something else too
    subscription(sim, "sub_tshirt", "cus_shop", plan="tshirt_club")
    links = MemoryLinks()
    snapshot = make(page_size=4, links=links).fetch_all(plan_ids=PLANS)
    assert snapshot.pages == 7  # 26 subscriptions, 4 a page
    assert snapshot.unassigned == 1
    assert len(snapshot.records) == 25 and snapshot.invalid.empty
    expected_status = {"active": "active", "trialing": "trialing", "past_due": "past_due", "canceled": "canceled", "unpaid": "expired"}
    assert by_instance(snapshot) == {
        f"inst-{n:02d}": [(PLANS[1 + n % 3], expected_status[["active", "trialing", "past_due", "canceled", "unpaid"][n % 5]])]
        for n in range(25)
    }
    # the links of every instance, remembered once, after the list completed
    assert links.remembered == [{f"inst-{n:02d}": f"cus_{n:02d}" for n in range(25)}]
    assert snapshot.requested_ids is None and snapshot.provider == "stripe"
    assert snapshot.records["observed_at"].notna().all()


def test_the_list_asks_for_every_status_with_customers_expanded(sim, make) -> None:
    """Without status=all the simulator (like Stripe) hides canceled subscriptions; without
    the expand the customer's metadata is not there: both would fail this test."""
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a", status="canceled", ended_at=NOW - DAY)
    snapshot = make().fetch_all(plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("pro", "canceled")]}


def test_the_newest_customer_is_the_remembered_link(sim, make) -> None:
    customer(sim, "cus_old", "inst-a")
    customer(sim, "cus_new", "inst-a")
    subscription(sim, "sub_old", "cus_old", created=NOW - 100 * DAY, status="canceled", ended_at=NOW - 50 * DAY)
    subscription(sim, "sub_new", "cus_new", created=NOW - 5 * DAY)
    links = MemoryLinks()
    make(links=links).fetch_all(plan_ids=PLANS)
    assert links.remembered == [{"inst-a": "cus_new"}]


def test_a_links_store_that_fails_does_not_fail_the_full_list(sim, make, caplog) -> None:
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a")
    with caplog.at_level(logging.WARNING, logger="creditsync.billing"):
        snapshot = make(links=MemoryLinks(fail=True)).fetch_all(plan_ids=PLANS)
    assert len(snapshot.records) == 1
    assert "customer link(s) could not be remembered (database is down)" in caplog.text


def test_empty_account(make) -> None:
    snapshot = make().fetch_all(plan_ids=PLANS)
    assert snapshot.records.empty and snapshot.pages == 1 and snapshot.unassigned == 0


def test_invalid_subscriptions_are_invalid_records_of_their_instance(sim, make) -> None:
    customer(sim, "cus_a", "inst-a")
    sim.put_subscription("sub_noitems", customer="cus_a", items=())
    customer(sim, "cus_b", "inst-b")
    subscription(sim, "sub_weird", "cus_b", status="on_hold")
    customer(sim, "cus_c", "inst-c")
    subscription(sim, "sub_c", "cus_c", extra={"created": "yesterday"})
    snapshot = make().fetch_all(plan_ids=PLANS)
    reasons = dict(zip(snapshot.invalid["instance_id"], snapshot.invalid["reason"]))
    assert reasons == {
        "inst-a": "missing plan_id",
        "inst-b": "unknown status 'on_hold'",
        "inst-c": "updated_at is not ISO-8601: 'yesterday'",
    }
    assert snapshot.records.empty


@pytest.mark.parametrize("bad", ["inst\x00a", "x" * 300], ids=["control-character", "too-long"])
def test_an_unusable_instance_id_in_metadata_fails_the_run(sim, make, bad) -> None:
    customer(sim, "cus_ok", "inst-ok")
    subscription(sim, "sub_ok", "cus_ok")
    customer(sim, "cus_bad")
    subscription(sim, "sub_bad", "cus_bad", instance=bad)
    links = MemoryLinks()
    with pytest.raises(BillingMalformedError, match=r"subscription 'sub_bad'.*not a usable instance id"):
        make(links=links).fetch_all(plan_ids=PLANS)
    assert links.remembered == []  # nothing remembered from a list that failed


def test_a_customer_that_is_not_expanded_fails_the_run(sim, make) -> None:
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a", extra={"customer": "cus_a"})
    with pytest.raises(BillingMalformedError, match="customer is not expanded"):
        make().fetch_all(plan_ids=PLANS)


class RewriteCursor(httpx.HTTPTransport):
    """Replaces the ``starting_after`` of the n-th list request with an id the server does not know."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at
        self.seen = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/subscriptions" and "customer" not in request.url.params:
            self.seen += 1
            if self.seen == self.at:
                request.url = request.url.copy_set_param("starting_after", "sub_gone")
        return super().handle_request(request)


def test_a_list_that_restarts_on_an_unknown_cursor_fails_instead_of_looping(sim, make) -> None:
    """The localstripe trap: an unknown starting_after silently restarts the list."""
    sim.restart_on_unknown_cursor = True
    for n in range(6):
        customer(sim, f"cus_{n}", f"inst-{n}")
        subscription(sim, f"sub_{n}", f"cus_{n}", created=NOW - n)
    with pytest.raises(BillingMalformedError, match=r"subscription 'sub_0' was listed before: the list restarted"):
        make(page_size=2, transport=RewriteCursor(at=3)).fetch_all(plan_ids=PLANS)


def test_stripes_own_answer_to_an_unknown_cursor_fails_the_run_with_its_message(sim, make) -> None:
    for n in range(6):
        customer(sim, f"cus_{n}", f"inst-{n}")
        subscription(sim, f"sub_{n}", f"cus_{n}", created=NOW - n)
    with pytest.raises(BillingError) as info:
        make(page_size=2, transport=RewriteCursor(at=2)).fetch_all(plan_ids=PLANS)
    assert str(info.value) == (
        "Stripe API refused GET /v1/subscriptions (page 2): HTTP 400 (invalid_request_error/resource_missing): "
        "No such subscription: 'sub_gone'"
    )


def test_older_api_shape_reads_the_same(sim, make) -> None:
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a", cancel_at_period_end=True)
    basil = make().fetch_all(plan_ids=PLANS)
    old = make(api_version="2024-06-20").fetch_all(plan_ids=PLANS)
    sim.legacy_periods = True
    legacy = make().fetch_all(plan_ids=PLANS)
    cols = ["instance_id", "plan_id", "status", "current_period_end", "updated_at"]
    assert basil.records[cols].equals(old.records[cols]) and basil.records[cols].equals(legacy.records[cols])
    assert basil.records["current_period_end"].notna().all()


def test_the_plan_map_maps_lookup_keys_and_price_ids(sim, make) -> None:
    customer(sim, "cus_a", "inst-a")
    sim.put_subscription("sub_a", customer="cus_a", items=[{"price": "price_addon", "lookup_key": "storage"},
                                                           {"price": "price_1Pq", "lookup_key": None}])
    customer(sim, "cus_b", "inst-b")
    sim.put_subscription("sub_b", customer="cus_b", items=[{"price": "price_x", "lookup_key": "pro_yearly"}])
    snapshot = make(plan_map={"price_1Pq": "team", "pro_yearly": "pro"}).fetch_all(plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("team", "active")], "inst-b": [("pro", "active")]}


def test_the_same_entitlements_as_the_generic_api_for_the_same_data() -> None:
    """generate_records served by both simulators: every instance is entitled to the same plan."""
    records = generate_records(1500, seed=3, anchor=date.today())
    now = datetime.now(timezone.utc)
    with StripeSimulator.from_records(records, api_key=KEY) as s, BillingSimulator(records, token="t") as g:
        with StripeProvider(KEY, base_url=s.base_url) as p, GenericBillingClient(g.base_url, "t") as c:
            stripe_snapshot = p.fetch_all(plan_ids=PLANS)
            generic_snapshot = c.fetch_all()
    assert stripe_snapshot.pages == 15

    def entitled(snapshot) -> pd.Series:
        r = snapshot.records.assign(ok=rules.entitles(snapshot.records, now))
        return r[r.ok].set_index("instance_id")["plan_id"].sort_index()

    assert len(entitled(stripe_snapshot)) > 1000
    assert entitled(stripe_snapshot).equals(entitled(generic_snapshot))
    assert sorted(stripe_snapshot.records["instance_id"]) == sorted(generic_snapshot.records["instance_id"])


# -- faults ---------------------------------------------------------------------------------


@pytest.fixture
def filled(sim: StripeSimulator) -> StripeSimulator:
    for n in range(12):
        customer(sim, f"cus_{n:02d}", f"inst-{n:02d}")
        subscription(sim, f"sub_{n:02d}", f"cus_{n:02d}", created=NOW - n)
    return sim


@pytest.mark.parametrize(
    "fault",
    [
        dict(kind="rate_limit", endpoint="list", after=1, count=2, retry_after=None),
        dict(kind="rate_limit", endpoint="list", after=1, count=1, retry_after=2),
        dict(kind="error", endpoint="list", after=2, count=2),
        dict(kind="drop", endpoint="list", after=1, count=1),
        dict(kind="slow", endpoint="list", after=1, count=1, delay=0.3),
    ],
    ids=["429-without-retry-after", "429-retry-after", "500-twice", "dropped-connection", "slow-page"],
)
def test_transient_faults_are_retried_and_the_list_completes(filled, make, fault) -> None:
    fault = dict(fault)
    filled.add_fault(fault.pop("kind"), **fault)
    provider = make(page_size=5)
    sleeps: list[float] = []
    provider.api.sleep = sleeps.append
    snapshot = provider.fetch_all(plan_ids=PLANS)
    assert len(snapshot.records) == 12 and snapshot.pages == 3
    if fault.get("retry_after") == 2:
        assert sleeps == [2.0]
    assert filled.request_count("list") >= 3


@pytest.mark.parametrize(
    "kind,expected",
    [
        ("malformed", "non-JSON body"),
        ("bad_shape", "list has no 'data' array"),
    ],
)
def test_a_malformed_page_fails_the_run(filled, make, kind, expected) -> None:
    filled.add_fault(kind, endpoint="list", after=1, count=1)
    links = MemoryLinks()
    with pytest.raises(BillingMalformedError, match=expected):
        make(page_size=5, links=links).fetch_all(plan_ids=PLANS)
    assert links.remembered == []


def test_persistent_500_fails_the_run_as_unavailable(filled, make) -> None:
    filled.add_fault("error", endpoint="list", after=1, count=None)
    provider = make(page_size=5)
    provider.api.sleep = lambda s: None
    with pytest.raises(BillingUnavailableError, match=r"Stripe API unavailable: GET /v1/subscriptions \(page 2\) failed after 3 attempts"):
        provider.fetch_all(plan_ids=PLANS)


def test_a_wrong_key_is_an_auth_error_that_never_shows_a_key(filled, make, caplog) -> None:
    wrong = "sk_test_WRONG_0123456789abcdef"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BillingAuthError) as info:
            make(api_key=wrong).fetch_all(plan_ids=PLANS)
        with pytest.raises(BillingAuthError):
            make(api_key=wrong).check_access()
    message = str(info.value)
    assert message == "Stripe API rejected the API key (HTTP 401, invalid_request_error/api_key_invalid)"
    for text in (message, caplog.text, repr(make(api_key=wrong))):
        assert wrong not in text and "sk_test_" not in text and KEY not in text


def test_the_key_never_reaches_errors_or_logs_even_when_the_server_echoes_it(sim, make, caplog) -> None:
    """A 400 whose message repeats the key (and key-like tokens) is sanitised."""

    def echo(request: httpx.Request) -> httpx.Response:
        return httpx.Response(400, json={"error": {"type": "invalid_request_error", "code": "parameter_invalid",
                                                   "message": f"bad {KEY} and rk_live_abc123 here"}})

    provider = make(transport=httpx.MockTransport(echo))
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(BillingError) as info:
            provider.fetch_all(plan_ids=PLANS)
    assert str(info.value) == (
        "Stripe API refused GET /v1/subscriptions (page 1): HTTP 400 (invalid_request_error/parameter_invalid): "
        "bad *** and *** here"
    )
    assert KEY not in caplog.text and KEY not in repr(provider)


def test_a_restricted_key_without_permission_is_an_auth_error_with_the_permissions_to_grant(make) -> None:
    def forbidden(request: httpx.Request) -> httpx.Response:
        return httpx.Response(403, json={"error": {"type": "invalid_request_error",
                                                   "message": "The provided key 'rk_test_***' does not have access"}})

    with pytest.raises(BillingAuthError, match="a restricted key needs read access to Subscriptions and Customers"):
        make(transport=httpx.MockTransport(forbidden)).check_access()


def test_check_access(filled, make) -> None:
    assert make().check_access() == f"Stripe API at {filled.base_url} answered a subscription list with the API key accepted"
    assert filled.request_count("list") == 1


def test_settings_errors_are_one_line() -> None:
    with pytest.raises(ValueError, match="STRIPE_API_KEY is empty"):
        StripeProvider(" ")
    with pytest.raises(ValueError, match="not allowed in an HTTP header"):
        StripeProvider("sk_test_é")
    with pytest.raises(ValueError, match="page_size"):
        StripeProvider(KEY, page_size=101)


# -- per instance ---------------------------------------------------------------------------


def unresolved(snapshot) -> dict[str, str]:
    return dict(zip(snapshot.unresolved["instance_id"], snapshot.unresolved["status"]))


def test_a_remembered_customer_is_listed_and_search_is_not_needed(sim, make) -> None:
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a", plan="team")
    subscription(sim, "sub_other", "cus_a", plan="pro", instance="inst-other")  # the same customer, another site
    links = MemoryLinks({"inst-a": "cus_a"})
    snapshot = make(links=links).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("team", "active")]}
    assert snapshot.requested_ids == ("inst-a",) and snapshot.lookups == 1
    assert sim.request_count("search") == 0 and sim.request_count("customer_list") == 1
    assert links.remembered == []  # nothing new


@pytest.mark.parametrize("where", ["customer", "subscription"])
def test_an_unknown_instance_is_found_with_search_and_remembered(sim, make, where) -> None:
    customer(sim, "cus_a", "inst-a" if where == "customer" else None)
    subscription(sim, "sub_a", "cus_a", instance="inst-a" if where == "subscription" else None)
    links = MemoryLinks()
    snapshot = make(links=links).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("pro", "active")]}
    assert links.remembered == [{"inst-a": "cus_a"}]


def test_search_that_lags_leaves_the_instance_alone_then_finds_it(sim, make) -> None:
    sim.search_lag = 3600
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a", status="canceled", ended_at=NOW - DAY)
    snapshot = make(links=MemoryLinks()).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert snapshot.records.empty and unresolved(snapshot) == {"inst-a": UNLINKED}
    assert "search lags or may be unavailable" in snapshot.unresolved["reason"].iloc[0]
    sim.search_lag = 0
    customer(sim, "cus_a", "inst-a")  # indexed now
    snapshot = make().fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("pro", "canceled")]} and snapshot.unresolved.empty


def test_a_server_without_search_leaves_unknown_instances_alone(sim, make) -> None:
    sim.search_enabled = False
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a")
    snapshot = make().fetch_instances(["inst-a", "inst-b"], plan_ids=PLANS)
    assert unresolved(snapshot) == {"inst-a": UNLINKED, "inst-b": UNLINKED} and snapshot.records.empty


def test_many_unlinked_instances_are_answers_not_an_outage(sim, make) -> None:
    snapshot = make().fetch_instances([f"inst-{n}" for n in range(20)], plan_ids=PLANS)
    assert set(unresolved(snapshot).values()) == {UNLINKED} and len(snapshot.unresolved) == 20
    assert snapshot.failed_lookups == 0


def test_a_stale_link_falls_back_to_search_and_is_replaced(sim, make) -> None:
    customer(sim, "cus_new", "inst-a")
    subscription(sim, "sub_new", "cus_new", plan="starter")
    links = MemoryLinks({"inst-a": "cus_deleted"})
    snapshot = make(links=links).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("starter", "active")]}
    assert links.remembered == [{"inst-a": "cus_new"}]


def test_a_second_live_subscription_under_another_customer_is_found(sim, make) -> None:
    """The remembered customer only shows a canceled subscription: search finds the live one."""
    customer(sim, "cus_old", "inst-a")
    subscription(sim, "sub_old", "cus_old", created=NOW - 90 * DAY, status="canceled", ended_at=NOW - 30 * DAY)
    customer(sim, "cus_new", "inst-a")
    subscription(sim, "sub_new", "cus_new", plan="team", created=NOW - 3 * DAY)
    links = MemoryLinks({"inst-a": "cus_old"})
    snapshot = make(links=links).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("pro", "canceled"), ("team", "active")]}
    assert links.remembered == [{"inst-a": "cus_new"}]


def test_a_remembered_customer_without_a_subscription_of_the_instance_is_unlinked(sim, make) -> None:
    """No subscription found is never 'no subscription' outside a full list."""
    customer(sim, "cus_a")
    subscription(sim, "sub_x", "cus_a", instance="inst-other")
    snapshot = make(links=MemoryLinks({"inst-a": "cus_a"})).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert unresolved(snapshot) == {"inst-a": UNLINKED} and snapshot.records.empty
    assert "customer 'cus_a' has none" in snapshot.unresolved["reason"].iloc[0]


def test_search_hits_are_compared_exactly(sim, make) -> None:
    """Stripe's search matches case-insensitively: ABC's customer is not abc's."""
    customer(sim, "cus_upper", "ABC")
    subscription(sim, "sub_upper", "cus_upper", plan="team")
    snapshot = make().fetch_instances(["abc"], plan_ids=PLANS)
    assert unresolved(snapshot) == {"abc": UNLINKED}
    assert sim.request_count("search") == 2  # both searches were asked and found ABC's


def test_search_queries_are_escaped(sim, make) -> None:
    assert search_query("instance_id", "o'brien\\x") == "metadata['instance_id']:'o\\'brien\\\\x'"
    tricky = "site' OR status:'active"
    customer(sim, "cus_t", tricky)
    subscription(sim, "sub_t", "cus_t")
    customer(sim, "cus_b", "bystander")
    subscription(sim, "sub_b", "cus_b", plan="team")
    snapshot = make().fetch_instances([tricky], plan_ids=PLANS)
    assert by_instance(snapshot) == {tricky: [("pro", "active")]}


def test_targeted_with_billing_down_raises(sim, make) -> None:
    sim.add_fault("error", endpoint="any", count=None)
    provider = make()
    provider.api.sleep = lambda s: None
    with pytest.raises(BillingUnavailableError):
        provider.fetch_instances(["inst-a"], plan_ids=PLANS)


def test_a_failing_links_store_means_search_for_targeted_look_ups(sim, make, caplog) -> None:
    customer(sim, "cus_a", "inst-a")
    subscription(sim, "sub_a", "cus_a")
    with caplog.at_level(logging.WARNING, logger="creditsync.billing"):
        snapshot = make(links=MemoryLinks(fail=True)).fetch_instances(["inst-a"], plan_ids=PLANS)
    assert by_instance(snapshot) == {"inst-a": [("pro", "active")]}
    assert "remembered customer links could not be read (database is down); searching instead" in caplog.text


def test_a_targeted_look_up_never_sends_an_id_that_is_not_usable(make) -> None:
    with pytest.raises(ValueError, match="cannot fetch instance"):
        make().fetch_instances(["bad\nid"])


# -- the pipelined walk -----------------------------------------------------------------------


def test_guess_next_reads_the_cursor_off_the_bytes_only_when_it_is_plain() -> None:
    import json

    import orjson

    from creditsync_pipeline.billing.stripe.lists import UNKNOWN, guess_next

    page = {"object": "list", "data": [
        {"id": "sub_1", "object": "subscription", "items": {"data": [{"id": "si_1", "subscription": "sub_1"}]}},
        {"id": "sub_2", "object": "subscription", "customer": {"id": "cus_2", "object": "customer"}},
    ], "has_more": True, "url": "/v1/subscriptions"}
    assert guess_next(orjson.dumps(page)) == "sub_2"
    assert guess_next(json.dumps(page, indent=2).encode()) == "sub_2"  # Stripe pretty-prints
    assert guess_next(json.dumps({**page, "has_more": False}).encode()) is None
    assert guess_next(json.dumps(page, sort_keys=True).encode()) is UNKNOWN  # localstripe's key order
    assert guess_next(b"<html>") is UNKNOWN


@pytest.mark.parametrize("restart", [False, True], ids=["stripe-400", "restarting-server"])
def test_a_wrong_guess_is_dropped_and_the_list_completes_one_page_at_a_time(sim, make, restart) -> None:
    """Metadata that looks like a subscription's start fools the guess: the pages fetched on it
    are never used, and the walk goes on from the true cursor."""
    sim.restart_on_unknown_cursor = restart
    for n in range(7):
        customer(sim, f"cus_{n}", f"inst-{n}")
        subscription(sim, f"sub_{n}", f"cus_{n}", created=NOW - n)
    sim.put_subscription("sub_1", customer="cus_1", created=NOW - 1, metadata={"id": "sub_decoy", "object": "subscription"},
                         items=[{"price": "price_pro", "lookup_key": "pro"}])
    snapshot = make(page_size=2).fetch_all(plan_ids=PLANS)
    assert sorted(snapshot.records["instance_id"]) == [f"inst-{n}" for n in range(7)]
    assert snapshot.pages == 4
    assert sim.request_count("list") > snapshot.pages  # the page asked for with the decoy was dropped
