"""Stripe subscription -> SPEC record: every case of the mapping, table-driven, then through the rules."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pandas as pd
import pytest

from creditsync_pipeline import rules
from creditsync_pipeline.billing.records import validate_fields
from creditsync_pipeline.billing.stripe.subscriptions import (
    PageFields,
    SubscriptionMapper,
    entitles_at,
    instance_of,
    item_identifier,
    iso_seconds,
)

KEY = "instance_id"
NOW = 1_800_000_000  # 2027-01-15T08:00:00Z
DAY = 86_400
T_CREATED = NOW - 40 * DAY
T_END = NOW + 10 * DAY


def iso(ts: int | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def item(lookup_key: str | None = "pro_monthly", price_id: str | None = "price_pro", *, plan_id: str | None = None,
         period_end: int | None = T_END) -> dict[str, Any]:
    doc: dict[str, Any] = {"id": "si_1", "object": "subscription_item"}
    if price_id is not None or lookup_key is not None:
        doc["price"] = {"id": price_id, "lookup_key": lookup_key}
    if plan_id is not None:
        doc["plan"] = {"id": plan_id}
    if period_end is not None:
        doc["current_period_end"] = period_end
    return doc


def sub(status: str = "active", *, items: list[dict[str, Any]] | None = None, metadata: dict[str, Any] | None = None,
        customer: Any = None, **fields: Any) -> dict[str, Any]:
    return {
        "id": "sub_1", "object": "subscription", "status": status, "created": T_CREATED,
        "metadata": {KEY: "inst-1"} if metadata is None else metadata,
        "customer": {"id": "cus_1", "object": "customer", "metadata": {}} if customer is None else customer,
        "items": {"object": "list", "data": [item()] if items is None else items, "has_more": False},
        "cancel_at_period_end": False, "cancel_at": None, "canceled_at": None, "ended_at": None,
        **fields,
    }


def mapped(subscription: dict[str, Any], plan_map: dict[str, str] | None = None,
           plan_ids: tuple[str, ...] = ("free", "starter", "pro", "team")) -> dict[str, Any] | None:
    out = PageFields.empty()
    if not SubscriptionMapper(KEY, plan_map, plan_ids).add(subscription, out):
        assert out.unassigned == 1
        return None
    (record,) = out.records()
    return record


STATUS_CASES = [
    # (name, subscription, expected status, expected current_period_end)
    ("active", sub("active"), "active", T_END),
    ("trialing", sub("trialing"), "trialing", T_END),
    ("past_due", sub("past_due"), "past_due", T_END),
    ("active, cancel at period end: entitled until then", sub("active", cancel_at_period_end=True), "canceled", T_END),
    ("trialing, cancel at period end", sub("trialing", cancel_at_period_end=True), "canceled", T_END),
    ("past_due, cancel at period end", sub("past_due", cancel_at_period_end=True), "canceled", T_END),
    ("active, cancel_at set: until cancel_at", sub("active", cancel_at=NOW + 3 * DAY), "canceled", NOW + 3 * DAY),
    ("active, cancel_at in the past (Stripe lagging)", sub("active", cancel_at=NOW - DAY), "canceled", NOW - DAY),
    ("active, cancel at period end, no period end known: stays active",
     sub("active", cancel_at_period_end=True, items=[item(period_end=None)]), "active", None),
    ("canceled: ends at ended_at whatever the period end",
     sub("canceled", ended_at=NOW - DAY, canceled_at=NOW - 5 * DAY), "canceled", NOW - DAY),
    ("canceled without ended_at: canceled_at", sub("canceled", canceled_at=NOW - 2 * DAY), "canceled", NOW - 2 * DAY),
    ("canceled with neither: no end (never entitles)", sub("canceled"), "canceled", None),
    ("unpaid", sub("unpaid"), "expired", T_END),
    ("incomplete", sub("incomplete"), "expired", T_END),
    ("incomplete_expired", sub("incomplete_expired"), "expired", T_END),
    ("paused", sub("paused"), "expired", T_END),
    ("paused with cancel at period end stays expired", sub("paused", cancel_at_period_end=True), "expired", T_END),
    ("an unknown status passes through (invalid_record)", sub("on_hold"), "on_hold", T_END),
]


@pytest.mark.parametrize("subscription,status,period_end", [c[1:] for c in STATUS_CASES], ids=[c[0] for c in STATUS_CASES])
def test_status_and_period_end(subscription: dict[str, Any], status: str, period_end: int | None) -> None:
    record = mapped(subscription)
    assert record == {
        "instance_id": "inst-1", "plan_id": "pro_monthly", "status": status,
        "updated_at": iso(T_CREATED), "current_period_end": iso(period_end),
    }


ENTITLED_CASES = [
    # (name, subscription, entitled at NOW)
    ("active", sub("active"), True),
    ("trialing", sub("trialing"), True),
    ("past_due", sub("past_due"), True),
    ("cancel at period end, period ahead", sub("active", cancel_at_period_end=True), True),
    ("cancel at period end, period over", sub("active", cancel_at_period_end=True, items=[item(period_end=NOW - 1)]), False),
    ("canceled although its period runs on", sub("canceled", ended_at=NOW - 60, items=[item(period_end=NOW + 20 * DAY)]), False),
    ("unpaid", sub("unpaid"), False),
    ("incomplete", sub("incomplete"), False),
    ("incomplete_expired", sub("incomplete_expired"), False),
    ("paused", sub("paused"), False),
]


@pytest.mark.parametrize("subscription,entitled", [c[1:] for c in ENTITLED_CASES], ids=[c[0] for c in ENTITLED_CASES])
def test_entitlement_through_the_rules(subscription: dict[str, Any], entitled: bool) -> None:
    """What the one set of rules decides from the mapped record (and the look-up's own check agrees)."""
    record = mapped(subscription)
    frame, invalid = validate_fields(
        [record["instance_id"]], [record["plan_id"]], [record["status"]], [record["updated_at"]],
        [record["current_period_end"]], [(datetime.now(timezone.utc), 1)],
    )
    assert invalid.empty
    now = datetime.fromtimestamp(NOW, timezone.utc)
    assert bool(rules.entitles(frame, now).iloc[0]) is entitled
    out = PageFields.empty()
    SubscriptionMapper(KEY).add(subscription, out)
    assert entitles_at(out.statuses[0], out.periods[0], NOW) is entitled


INSTANCE_CASES = [
    ("subscription metadata", sub(metadata={KEY: "a"}), "a"),
    ("subscription metadata wins over the customer's",
     sub(metadata={KEY: "a"}, customer={"id": "cus_1", "metadata": {KEY: "b"}}), "a"),
    ("customer metadata", sub(metadata={}, customer={"id": "cus_1", "metadata": {KEY: "b"}}), "b"),
    ("empty subscription value falls back to the customer",
     sub(metadata={KEY: ""}, customer={"id": "cus_1", "metadata": {KEY: "b"}}), "b"),
    ("other keys only: no instance", sub(metadata={"order": "7"}, customer={"id": "cus_1", "metadata": {"x": "1"}}), None),
    ("a deleted customer carries none", sub(metadata={}, customer={"id": "cus_1", "deleted": True}), None),
    ("a customer that is only an id carries none", sub(metadata={}, customer="cus_1"), None),
    ("a non-string value is returned as it is (validated later)", sub(metadata={KEY: 7}), 7),
]


@pytest.mark.parametrize("subscription,expected", [c[1:] for c in INSTANCE_CASES], ids=[c[0] for c in INSTANCE_CASES])
def test_instance_of(subscription: dict[str, Any], expected: Any) -> None:
    assert instance_of(subscription, KEY) == expected


def test_a_subscription_without_an_instance_is_counted_not_mapped() -> None:
    out = PageFields.empty()
    mapper = SubscriptionMapper(KEY)
    assert mapper.add(sub(metadata={}), out) is False
    assert mapper.add(sub(metadata={}, customer="cus_9"), out) is False
    assert (out.unassigned, out.ids) == (2, [])


IDENTIFIER_CASES = [
    ("lookup key", item("pro_monthly", "price_1"), "pro_monthly"),
    ("price id when no lookup key", item(None, "price_1"), "price_1"),
    ("empty lookup key: price id", item("", "price_1"), "price_1"),
    ("legacy plan only (test servers)", {"id": "si", "plan": {"id": "plan_pro"}}, "plan_pro"),
    ("price beats the legacy plan", item(None, "price_1", plan_id="plan_old"), "price_1"),
    ("nothing usable", {"id": "si"}, None),
    ("not an object", "si_1", None),
]


@pytest.mark.parametrize("it,expected", [c[1:] for c in IDENTIFIER_CASES], ids=[c[0] for c in IDENTIFIER_CASES])
def test_item_identifier(it: Any, expected: str | None) -> None:
    assert item_identifier(it) == expected


PLAN_CASES = [
    # (name, items, plan map, app plans, expected plan_id)
    ("the lookup key as it is", [item("pro")], {}, ("pro",), "pro"),
    ("mapped lookup key", [item("pro_monthly")], {"pro_monthly": "pro"}, ("pro",), "pro"),
    ("mapped price id", [item(None, "price_123")], {"price_123": "team"}, ("team",), "team"),
    ("the first item whose mapped plan the app sells",
     [item("addon_storage", "price_a"), item("pro_monthly", "price_b")], {"pro_monthly": "pro"}, ("free", "pro"), "pro"),
    ("none sold: the first item's",
     [item("addon_storage"), item("seats")], {}, ("free", "pro"), "addon_storage"),
    ("the first matching item, not the last",
     [item("starter"), item("pro")], {}, ("starter", "pro"), "starter"),
    ("an item without an identifier is skipped", [{"id": "si_x"}, item("pro")], {}, ("pro",), "pro"),
    ("no items: no plan (invalid_record)", [], {}, ("pro",), None),
    ("period end from the chosen item", [item("addon", period_end=NOW + DAY), item("pro", period_end=T_END)], {}, ("pro",), "pro"),
]


@pytest.mark.parametrize("items,plan_map,plan_ids,expected", [c[1:] for c in PLAN_CASES], ids=[c[0] for c in PLAN_CASES])
def test_plan_of(items: list[dict[str, Any]], plan_map: dict[str, str], plan_ids: tuple[str, ...], expected: str | None) -> None:
    record = mapped(sub(items=items), plan_map, plan_ids)
    assert record is not None and record["plan_id"] == expected
    if expected == "pro" and len(items) == 2 and items[1].get("current_period_end") == T_END:
        assert record["current_period_end"] == iso(T_END)


PERIOD_CASES = [
    ("on the item (API 2025-03-31 and later)", sub(items=[item(period_end=T_END)]), T_END),
    ("on the subscription (older versions, test servers)",
     sub(items=[item(period_end=None)], current_period_end=T_END + DAY), T_END + DAY),
    ("the item wins when both are there", sub(items=[item(period_end=T_END)], current_period_end=T_END + DAY), T_END),
    ("neither", sub(items=[item(period_end=None)]), None),
]


@pytest.mark.parametrize("subscription,expected", [c[1:] for c in PERIOD_CASES], ids=[c[0] for c in PERIOD_CASES])
def test_period_end_location(subscription: dict[str, Any], expected: int | None) -> None:
    record = mapped(subscription)
    assert record is not None and record["current_period_end"] == iso(expected)


def test_iso_seconds_pages_and_odd_values() -> None:
    assert iso_seconds([]) == []
    assert iso_seconds([0, 1_800_000_000]) == ["1970-01-01T00:00:00Z", "2027-01-15T08:00:00Z"]
    assert iso_seconds([None, "x", 1.5, 86_400]) == [None, "x", 1.5, "1970-01-02T00:00:00Z"]


def test_the_most_recently_created_entitling_subscription_wins() -> None:
    """Several subscriptions of one instance: updated_at = created, so the rules pick the newest
    entitling one -- not a newer canceled one, not an older active one."""
    subs = [
        {**sub("active", items=[item("starter")]), "id": "sub_old", "created": NOW - 90 * DAY},
        {**sub("active", items=[item("team")]), "id": "sub_new", "created": NOW - 10 * DAY},
        {**sub("canceled", items=[item("pro")], ended_at=NOW - DAY), "id": "sub_newest", "created": NOW - 2 * DAY},
    ]
    out = PageFields.empty()
    mapper = SubscriptionMapper(KEY)
    for s in subs:
        mapper.add(s, out)
    records, invalid = validate_fields(*out.columns(), [(datetime.now(timezone.utc), len(subs))])
    assert invalid.empty
    plans = pd.DataFrame({"plan_id": ["free", "starter", "pro", "team"], "credits": [100, 1000, 5000, 20000],
                          "is_free": [True, False, False, False]})
    instances = pd.DataFrame({"instance_id": ["inst-1"], "plan_id": ["free"], "credits_total": [100],
                              "updated_at": pd.Series([pd.NaT], dtype="datetime64[ns, UTC]")})
    decision = rules.decide(
        plans=plans, instances=instances, records=records, invalid=invalid,
        absent_basis_at=datetime.now(timezone.utc), now=datetime.fromtimestamp(NOW, timezone.utc),
        total_instances=1, scope="full", guardrails=rules.Guardrails(),
    )
    (row,) = decision.mismatches.itertuples(index=False)
    assert (row.instance_id, row.kind, row.expected_plan_id) == ("inst-1", "wrong_plan", "team")
    # and the link remembered for the instance is the newest subscription's customer
    assert out.links == {"inst-1": (NOW - 2 * DAY, "cus_1")}
