"""Table-driven: a Wix Get App Instance answer -> SPEC records, and SPEC records -> Wix instances."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from creditsync_pipeline.billing.records import validate_records
from creditsync_pipeline.billing.wix import instance_records
from creditsync_pipeline.simulators.wix import instances_from_records

SEEN = datetime(2026, 11, 30, 12, 0, tzinfo=timezone.utc)
STAMP = "2026-10-01T08:00:00.000Z"


def answer(**instance):
    return {"instance": {"instanceId": "site-1", **instance}, "site": {"siteId": "s"}}


def paid(**billing):
    return answer(isFree=False, billing={"packageName": "pro", "billingCycle": "MONTHLY", "timeStamp": STAMP,
                                         "autoRenewing": True, **billing})


def rec(plan="pro", status="active", end=None, updated=STAMP, iid="site-1"):
    return {"instance_id": iid, "plan_id": plan, "status": status, "current_period_end": end, "updated_at": updated}


CASES = [
    # (name, body, plan map, expected records)
    ("free flag", answer(isFree=True), {}, ()),
    ("free flag wins over a package it contradicts", answer(isFree=True, billing={"packageName": "pro"}), {}, ()),
    ("not free but no billing", answer(isFree=False), {}, ()),
    ("no packageName", answer(isFree=False, billing={"billingCycle": "MONTHLY"}), {}, ()),
    ("empty packageName", answer(isFree=False, billing={"packageName": ""}), {}, ()),
    ("null packageName", answer(isFree=False, billing={"packageName": None}), {}, ()),
    ("monthly paid plan", paid(), {}, (rec(),)),
    ("isFree absent, package present", answer(billing={"packageName": "pro", "timeStamp": STAMP}), {}, (rec(),)),
    ("yearly: expirationDate is the period end", paid(billingCycle="YEARLY", expirationDate="2027-10-01T08:00:00.000Z"),
     {}, (rec(end="2027-10-01T08:00:00.000Z"),)),
    ("canceled, still paid through: Wix keeps the package",
     paid(autoRenewing=False, expirationDate="2026-12-24T00:00:00Z"), {}, (rec(end="2026-12-24T00:00:00Z"),)),
    ("trial in progress counts as paid", paid(freeTrialInfo={"status": "IN_PROGRESS"}), {}, (rec(status="trialing"),)),
    ("trial ended: a paid plan", paid(freeTrialInfo={"status": "ENDED", "endDate": STAMP}), {}, (rec(),)),
    ("no trial available", paid(freeTrialInfo={"status": "NOT_AVAILABLE"}), {}, (rec(),)),
    ("package name mapped", paid(packageName="com.app.pro_monthly"), {"com.app.pro_monthly": "pro"}, (rec(),)),
    ("unmapped package used as it is", paid(packageName="gold"), {"silver": "pro"}, (rec(plan="gold"),)),
    ("no timeStamp: observed time", paid(timeStamp=None), {}, (rec(updated=SEEN.isoformat()),)),
    ("empty timeStamp: observed time", paid(timeStamp=""), {}, (rec(updated=SEEN.isoformat()),)),
    ("no instanceId: the one asked for", {"instance": {"isFree": False, "billing": {"packageName": "pro", "timeStamp": STAMP}}},
     {}, (rec(),)),
    ("another instanceId is kept (invalid_record later)", answer(instanceId="site-2", isFree=False,
     billing={"packageName": "pro", "timeStamp": STAMP}), {}, (rec(iid="site-2"),)),
    ("non-string package passed on (invalid_record later)", paid(packageName=7), {}, (rec(plan=7),)),
]


@pytest.mark.parametrize("name, body, plan_map, expected", CASES, ids=[c[0] for c in CASES])
def test_instance_answer_to_records(name, body, plan_map, expected):
    assert instance_records(body, "site-1", SEEN, plan_map) == expected


def test_missing_timestamp_never_leaves_a_payer_invalid():
    """The observed time substitutes a missing timeStamp: the record validates and entitles."""
    records = instance_records(paid(timeStamp=None), "site-1", SEEN)
    valid, invalid = validate_records(list(records), ["site-1"], [(SEEN, 1)])
    assert invalid.empty and list(valid["plan_id"]) == ["pro"] and list(valid["status"]) == ["active"]


@pytest.mark.parametrize(
    "body, message",
    [
        ([], "expected an object with an 'instance' object, got array"),
        ({"items": []}, "expected an object with an 'instance' object"),
        ({"instance": "x"}, "expected an object with an 'instance' object"),
        (answer(isFree="false", billing={"packageName": "pro"}), "'isFree' is not a boolean"),
        (answer(isFree=False, billing=["pro"]), "'billing' is not an object"),
    ],
    ids=["array", "no-instance", "instance-not-object", "isFree-string", "billing-array"],
)
def test_answers_of_another_shape_are_refused(body, message):
    with pytest.raises(ValueError) as info:
        instance_records(body, "site-1", SEEN)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "body, reason",
    [
        (paid(packageName=7), "plan_id is not a string"),
        (paid(timeStamp="yesterday"), "updated_at is not ISO-8601"),
        (paid(expirationDate="soon"), "current_period_end is not ISO-8601"),
    ],
    ids=["package-number", "timestamp-garbled", "expiration-garbled"],
)
def test_garbled_fields_become_invalid_records(body, reason):
    records = instance_records(body, "site-1", SEEN)
    valid, invalid = validate_records(list(records), ["site-1"], [(SEEN, 1)])
    assert valid.empty and reason in invalid["reason"].iloc[0]


# -- SPEC records -> Wix instances (the simulator's converter) ----------------------------------

NOW = datetime(2026, 11, 30, tzinfo=timezone.utc)
FUTURE = (NOW + timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")
PAST = (NOW - timedelta(days=10)).strftime("%Y-%m-%dT%H:%M:%SZ")

CONVERSIONS = [
    ("active", rec(status="active"), {"isFree": False, "packageName": "pro", "autoRenewing": True, "trial": None}),
    ("past_due is still paid", rec(status="past_due"), {"isFree": False, "packageName": "pro", "autoRenewing": True, "trial": None}),
    ("trialing", rec(status="trialing"), {"isFree": False, "packageName": "pro", "autoRenewing": True, "trial": "IN_PROGRESS"}),
    ("canceled, paid through", rec(status="canceled", end=FUTURE),
     {"isFree": False, "packageName": "pro", "autoRenewing": False, "trial": None, "expirationDate": FUTURE}),
    ("canceled, period over", rec(status="canceled", end=PAST), {"isFree": True}),
    ("canceled, no period end", rec(status="canceled", end=None), {"isFree": True}),
    ("expired", rec(status="expired", end=PAST), {"isFree": True}),
]


@pytest.mark.parametrize("name, record, expected", CONVERSIONS, ids=[c[0] for c in CONVERSIONS])
def test_records_to_wix_instances(name, record, expected):
    instance = instances_from_records([record], now=NOW)["site-1"]
    assert instance["instanceId"] == "site-1" and instance["isFree"] is expected["isFree"]
    if expected["isFree"]:
        assert "billing" not in instance
        return
    billing = instance["billing"]
    assert billing["packageName"] == expected["packageName"]
    assert billing["autoRenewing"] is expected["autoRenewing"]
    assert billing["timeStamp"] == STAMP
    assert billing.get("expirationDate") == expected.get("expirationDate")
    assert (billing.get("freeTrialInfo") or {}).get("status") == expected["trial"]
    # and the provider reads it back to an entitling record of the same plan
    (back,) = instance_records({"instance": instance}, "site-1", SEEN)
    assert back["plan_id"] == "pro" and back["status"] == ("trialing" if expected["trial"] else "active")


def test_converter_installs_free_rows_prefers_entitling_records_and_maps_packages():
    records = [
        rec(iid="a", status="expired", end=PAST, updated="2026-11-20T00:00:00Z"),
        rec(iid="a", plan="team", status="active", updated="2026-11-01T00:00:00Z"),
        rec(iid="b", plan="starter", status="active"),
        {"instance_id": None, "plan_id": "pro"},  # no usable id: skipped
    ]
    out = instances_from_records(records, installed=["a", "b", "c"], package_names={"team": "com.app.team"}, now=NOW)
    assert set(out) == {"a", "b", "c"}
    assert out["a"]["billing"]["packageName"] == "com.app.team"
    assert out["b"]["billing"]["packageName"] == "starter"
    assert out["c"] == {"instanceId": "c", "appName": "creditsync demo", "isFree": True}
