"""Table-driven tests of the pure reconciliation rules."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pandas as pd
import pytest

from creditsync_pipeline import rules
from creditsync_pipeline.rules import Guardrails, RulesError

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
OBSERVED = NOW - timedelta(minutes=1)
ROW_TIME = NOW - timedelta(days=1)

PLANS = pd.DataFrame(
    [
        {"plan_id": "free", "credits": 100, "is_free": True},
        {"plan_id": "pro", "credits": 5000, "is_free": False},
        {"plan_id": "team", "credits": 20000, "is_free": False},
    ]
)


def rec(iid: str, plan: str, status: str = "active", *, period_end=None, updated="2026-11-01T00:00:00Z",
        observed: datetime = OBSERVED) -> dict:
    return {
        "instance_id": iid,
        "plan_id": plan,
        "status": status,
        "current_period_end": period_end,
        "updated_at": updated,
        "observed_at": observed,
    }


def records_frame(rows: list[dict]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=["instance_id", "plan_id", "status", "current_period_end", "updated_at", "observed_at"])
    for col in ("current_period_end", "updated_at", "observed_at"):
        df[col] = pd.to_datetime(df[col], utc=True)
    return df


def instances_frame(rows: list[tuple]) -> pd.DataFrame:
    df = pd.DataFrame(
        [
            {"instance_id": r[0], "plan_id": r[1], "credits_total": r[2], "credits_used": 0,
             "updated_at": r[3] if len(r) > 3 else ROW_TIME}
            for r in rows
        ],
        columns=["instance_id", "plan_id", "credits_total", "credits_used", "updated_at"],
    )
    df["updated_at"] = pd.to_datetime(df["updated_at"], utc=True)
    return df


def invalid_frame(rows: list[tuple[str, str]] = ()) -> pd.DataFrame:
    return pd.DataFrame(list(rows), columns=["instance_id", "reason"])


def run(instances, records, invalid=(), *, scope="full", guard=Guardrails(max_change_ratio=1.0), total=None):
    inst = instances_frame(instances)
    return rules.decide(
        plans=PLANS,
        instances=inst,
        records=records_frame(records),
        invalid=invalid_frame(invalid),
        absent_basis_at=OBSERVED,
        now=NOW,
        total_instances=len(inst) if total is None else total,
        scope=scope,
        guardrails=guard,
    )


FUTURE = (NOW + timedelta(days=3)).isoformat()
PAST = (NOW - timedelta(days=3)).isoformat()


@pytest.mark.parametrize(
    "status, period_end, expected",
    [
        ("active", None, True),
        ("trialing", None, True),
        ("past_due", None, True),
        ("canceled", FUTURE, True),
        ("canceled", PAST, False),
        ("canceled", None, False),
        ("expired", FUTURE, False),
        ("expired", None, False),
    ],
)
def test_entitlement(status, period_end, expected):
    df = records_frame([rec("a", "pro", status, period_end=period_end)])
    assert bool(rules.entitles(df, NOW).iloc[0]) is expected


@pytest.mark.parametrize(
    "row, records, kind, expected_plan, expected_credits",
    [
        # the product's raison d'etre: paid 5000, stuck on the free 100
        (("a", "free", 100), [rec("a", "pro")], "wrong_plan", "pro", 5000),
        (("a", "pro", 100), [rec("a", "pro")], "wrong_credits", "pro", 5000),
        (("a", "pro", 5000), [rec("a", "pro")], None, None, None),
        (("a", "pro", 5000), [rec("a", "pro", "canceled", period_end=FUTURE)], None, None, None),
        (("a", "pro", 5000), [rec("a", "pro", "canceled", period_end=PAST)], "wrong_plan", "free", 100),
        (("a", "pro", 5000), [rec("a", "pro", "expired")], "wrong_plan", "free", 100),
        (("a", "pro", 5000), [], "wrong_plan", "free", 100),  # no subscription at all
        (("a", "free", 100), [], None, None, None),
        (("a", "free", 7), [], "wrong_credits", "free", 100),
        (("a", "free", 100), [rec("a", "gold")], "unknown_plan", "gold", None),
        (("a", "free", 100), [rec("a", "team", "past_due")], "wrong_plan", "team", 20000),
        (("a", "free", 100), [rec("a", "team", "trialing")], "wrong_plan", "team", 20000),
    ],
)
def test_single_instance_rules(row, records, kind, expected_plan, expected_credits):
    d = run([row], records)
    if kind is None:
        assert d.mismatches.empty
        assert d.corrections.empty
        return
    assert list(d.mismatches["kind"]) == [kind]
    m = d.mismatches.iloc[0]
    assert m["instance_id"] == "a"
    assert m["current_plan_id"] == row[1]
    assert m["current_credits_total"] == row[2]
    assert m["expected_plan_id"] == expected_plan
    if expected_credits is None:
        assert pd.isna(m["expected_credits_total"])
        assert d.corrections.empty  # unknown plans are reported, never written
    else:
        assert m["expected_credits_total"] == expected_credits
        c = d.corrections.iloc[0]
        assert (c["old_plan_id"], c["new_plan_id"]) == (row[1], expected_plan)
        assert (c["old_credits_total"], c["new_credits_total"]) == (row[2], expected_credits)
        assert c["basis_at"] == pd.Timestamp(OBSERVED)


@pytest.mark.parametrize(
    "records, expected_plan",
    [
        # the latest entitling record wins
        ([rec("a", "pro", updated="2026-10-01T00:00:00Z"), rec("a", "team", updated="2026-11-01T00:00:00Z")], "team"),
        ([rec("a", "team", updated="2026-11-01T00:00:00Z"), rec("a", "pro", updated="2026-10-01T00:00:00Z")], "team"),
        # a newer non-entitling record does not hide an older entitling one
        ([rec("a", "pro", updated="2026-10-01T00:00:00Z"), rec("a", "team", "expired", updated="2026-11-20T00:00:00Z")], "pro"),
        # nothing entitles: free
        ([rec("a", "pro", "expired"), rec("a", "team", "canceled", period_end=PAST)], "free"),
    ],
)
def test_several_records_per_instance(records, expected_plan):
    d = run([("a", "nothing", 0)], records)
    assert list(d.mismatches["expected_plan_id"]) == [expected_plan]


def test_missing_instance_reported_never_written():
    d = run([("a", "pro", 5000)], [rec("a", "pro"), rec("ghost", "pro"), rec("old-ghost", "pro", "expired")])
    assert list(d.mismatches["instance_id"]) == ["ghost"]
    assert list(d.mismatches["kind"]) == ["missing_instance"]
    assert d.mismatches.iloc[0]["expected_credits_total"] == 5000
    assert d.corrections.empty


def test_invalid_record_leaves_instance_alone():
    d = run([("a", "free", 100), ("b", "free", 100)], [rec("a", "pro"), rec("b", "pro")], [("a", "unknown status 'paused'")])
    kinds = dict(zip(d.mismatches["instance_id"], d.mismatches["kind"]))
    assert kinds == {"a": "invalid_record", "b": "wrong_plan"}
    assert list(d.corrections["instance_id"]) == ["b"]
    assert "paused" in d.mismatches.set_index("instance_id").loc["a", "reason"]
    assert d.counts["invalid_record"] == 1 and d.counts["wrong_plan"] == 1


def test_row_newer_than_billing_observation_is_withheld():
    newer = OBSERVED + timedelta(seconds=5)
    d = run([("a", "free", 100, newer), ("b", "free", 100)], [rec("a", "pro"), rec("b", "pro")])
    assert list(d.stale["instance_id"]) == ["a"]
    assert list(d.corrections["instance_id"]) == ["b"]
    assert set(d.mismatches["instance_id"]) == {"a", "b"}  # still reported


def test_absence_uses_the_fetch_start_as_basis():
    d = rules.decide(
        plans=PLANS, instances=instances_frame([("a", "pro", 5000, OBSERVED + timedelta(seconds=1))]),
        records=records_frame([]), invalid=invalid_frame(), absent_basis_at=OBSERVED, now=NOW,
        total_instances=1, guardrails=Guardrails(force=True),
    )
    assert d.corrections.empty and list(d.stale["instance_id"]) == ["a"]


@pytest.mark.parametrize(
    "n_wrong, total, ratio, force, refused",
    [
        (10, 100, 0.10, False, False),  # exactly the limit is allowed
        (11, 100, 0.10, False, True),
        (11, 100, 0.10, True, False),
        (11, 100, 0.20, False, False),
        (1, 1, 0.10, False, False),  # the floor of 10: a tiny app's single change is allowed
        (10, 10, 0.10, False, False),
        (11, 11, 0.10, False, True),
        (150, 1000, 0.10, False, True),
    ],
)
def test_max_change_ratio(n_wrong, total, ratio, force, refused):
    rows = [(f"i{n}", "free", 100) for n in range(total)]
    recs = [rec(f"i{n}", "pro") for n in range(n_wrong)]
    d = run(rows, recs, guard=Guardrails(max_change_ratio=ratio, force=force))
    assert (d.refusal is not None) is refused
    assert len(d.corrections) == n_wrong  # planned either way; the service decides to apply
    if refused:
        assert "max_change_ratio" in d.refusal and d.guard.rule == "mass_change"
        assert f"would change {n_wrong} of {total} instances" in d.refusal


def test_a_small_app_can_apply_one_cancellation_without_force():
    """Five instances, one cancellation: max(10, 10 % of 5) = 10 allows it (0.5 refused it before)."""
    rows = [("a", "pro", 5000)] + [(f"f{n}", "free", 100) for n in range(4)]
    recs = [rec("a", "pro", "expired", period_end="2026-01-01T00:00:00Z")]
    d = run(rows, recs, guard=Guardrails())
    assert d.refusal is None
    assert d.corrections[["instance_id", "new_plan_id"]].values.tolist() == [["a", "free"]]
    assert (d.guard.changes, d.guard.change_limit, d.guard.paid_to_free, d.guard.paid_limit) == (1, 10, 1, 10)


def _freemium(paid: int, free: int, billing_keeps: int) -> tuple[list[tuple], list[dict]]:
    """A freemium app; billing's list lost every paid instance's record but ``billing_keeps``."""
    rows = [(f"p{n:03d}", "pro", 5000) for n in range(paid)] + [(f"f{n:04d}", "free", 100) for n in range(free)]
    recs = [rec(f"p{n:03d}", "pro") for n in range(billing_keeps)]
    return rows, recs


def test_a_truncated_list_in_a_freemium_app_is_refused_by_the_paid_downgrade_guard():
    """6 % paid: one record left would downgrade 59 of 60 payers and stay under the 10 % mass rule."""
    rows, recs = _freemium(paid=60, free=940, billing_keeps=1)
    d = run(rows, recs, guard=Guardrails())
    assert len(d.corrections) == 59 and d.guard.changes <= d.guard.change_limit  # 59 <= 100: the first rule passes
    assert d.refusal is not None and d.guard.rule == "paid_downgrade"
    assert "would move 59 of 60 paid instance(s)" in d.refusal and "limit of 10" in d.refusal
    assert (d.guard.paid_to_free, d.guard.paid_instances, d.guard.paid_limit) == (59, 60, 10)
    forced = run(rows, recs, guard=Guardrails(force=True))
    assert forced.refusal is None and len(forced.corrections) == 59


@pytest.mark.parametrize(
    "paid, ratio, downgraded, refused",
    [
        (60, 0.10, 10, False),  # max(10, 6) = 10: exactly the limit
        (60, 0.10, 11, True),
        (300, 0.10, 30, False),  # 10 % of 300 = 30
        (300, 0.10, 31, True),
        (300, 0.50, 150, False),
        (5, 0.10, 4, False),  # the floor: with fewer than 10 payers, 4 of 5 may cancel
    ],
)
def test_max_paid_downgrade_ratio(paid, ratio, downgraded, refused):
    rows, recs = _freemium(paid=paid, free=5000, billing_keeps=paid - downgraded)
    d = run(rows, recs, guard=Guardrails(max_change_ratio=1.0, max_paid_downgrade_ratio=ratio))
    assert d.guard.paid_to_free == downgraded
    assert (d.refusal is not None) is refused
    if refused:
        assert d.guard.rule == "paid_downgrade" and "max_paid_downgrade_ratio" in d.refusal


def test_the_paid_guard_counts_only_paid_to_free_moves():
    # 40 free instances upgraded and 40 payers moving between paid plans: no paid -> free move.
    rows = [(f"f{n}", "free", 100) for n in range(40)] + [(f"p{n}", "pro", 5000) for n in range(40)]
    recs = [rec(f"f{n}", "pro") for n in range(40)] + [rec(f"p{n}", "team") for n in range(40)]
    d = run(rows, recs, guard=Guardrails(max_change_ratio=1.0))
    assert d.refusal is None and d.guard.paid_to_free == 0 and len(d.corrections) == 80


def test_targeted_scope_is_not_ratio_guarded():
    d = run([("a", "free", 100)], [rec("a", "pro")], scope="targeted", guard=Guardrails(max_change_ratio=0.1), total=2)
    assert d.refusal is None and len(d.corrections) == 1


@pytest.mark.parametrize(
    "rows, force, refused",
    [
        ([("a", "pro", 5000), ("b", "free", 100)], False, True),
        ([("a", "pro", 5000), ("b", "free", 100)], True, False),
        ([("a", "free", 100), ("b", "free", 100)], False, False),  # nobody to downgrade
    ],
)
def test_empty_billing_list_with_paid_instances_refuses(rows, force, refused):
    d = run(rows, [], guard=Guardrails(max_change_ratio=1.0, force=force))
    assert (d.refusal is not None) is refused
    if refused:
        assert "empty subscription list" in d.refusal


def test_exactly_one_free_plan_required():
    plans = pd.concat([PLANS, pd.DataFrame([{"plan_id": "free2", "credits": 10, "is_free": True}])])
    with pytest.raises(RulesError, match="exactly one free plan"):
        rules.free_plan(plans)
    with pytest.raises(RulesError):
        rules.free_plan(PLANS[~PLANS["is_free"]])


def test_odd_ids_and_converged_state():
    ids = ["a/b", "100%", "quo'te\"", "ünï cødé", "sp ace"]
    d = run([(i, "free", 100) for i in ids], [rec(i, "pro") for i in ids])
    assert sorted(d.corrections["instance_id"]) == sorted(ids)
    # after applying, the same billing data finds nothing
    d2 = run([(i, "pro", 5000) for i in ids], [rec(i, "pro") for i in ids])
    assert d2.mismatches.empty and sum(d2.counts.values()) == 0
