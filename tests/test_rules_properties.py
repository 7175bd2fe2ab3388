"""Properties of the rules over random apps, random billing lists and random truncations of them.

* A run that is not forced never moves more paid instances to the free plan than the
  paid-downgrade rail allows (``max(10, ratio x paid)``), however the list was cut.
* No run, forced or not, ever writes an instance whose billing evidence is an error: an
  invalid record, a look-alike id it resembles, or a look-up that failed.
"""

from __future__ import annotations

import math
from datetime import datetime, timedelta, timezone

import pandas as pd
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from creditsync_pipeline import rules
from creditsync_pipeline.ids import resemblance
from creditsync_pipeline.rules import Guardrails

NOW = datetime(2026, 11, 25, 12, 0, tzinfo=timezone.utc)
OBSERVED = NOW - timedelta(minutes=3)
ROW_TIME = NOW - timedelta(days=5)
PLANS = pd.DataFrame(
    [
        {"plan_id": "free", "credits": 100, "is_free": True},
        {"plan_id": "pro", "credits": 5000, "is_free": False},
        {"plan_id": "team", "credits": 20000, "is_free": False},
    ]
)
CREDITS = dict(zip(PLANS["plan_id"], PLANS["credits"]))


def _frame(rows: list[dict], columns: list[str], times: tuple[str, ...]) -> pd.DataFrame:
    df = pd.DataFrame(rows, columns=columns)
    for col in times:
        df[col] = pd.to_datetime(df[col], utc=True).astype("datetime64[ns, UTC]")
    return df


@st.composite
def worlds(draw):
    n = draw(st.integers(0, 160))
    paid_share = draw(st.sampled_from([0.0, 0.06, 0.3, 0.9]))
    instances, records, invalid, left_alone = [], [], [], []
    for i in range(n):
        iid = f"i{i:04d}"
        paid = draw(st.floats(0, 1)) < paid_share
        plan = draw(st.sampled_from(["pro", "team"])) if paid else "free"
        instances.append({"instance_id": iid, "plan_id": plan, "credits_total": CREDITS[plan], "credits_used": 0,
                          "updated_at": ROW_TIME})
        truth = draw(st.sampled_from(["same", "same", "same", "other_paid", "expired", "none"]))
        if truth == "same" and plan != "free":
            records.append({"instance_id": iid, "plan_id": plan, "status": "active"})
        elif truth == "other_paid":
            records.append({"instance_id": iid, "plan_id": draw(st.sampled_from(["pro", "team"])), "status": "active"})
        elif truth == "expired":
            records.append({"instance_id": iid, "plan_id": "pro", "status": "expired"})
        evidence = draw(st.sampled_from(["ok"] * 8 + ["invalid", "lookalike", "unresolved"]))
        if evidence == "invalid":
            invalid.append({"instance_id": iid, "reason": "unknown status 'paused'"})
        elif evidence == "lookalike":
            invalid.append({"instance_id": iid + " ", "reason": "instance_id has leading or trailing whitespace"})
        elif evidence == "unresolved":
            left_alone.append(iid)
    # The list billing actually returned: the complete one cut at random, or filtered.
    cut = draw(st.sampled_from(["complete", "prefix", "sample", "only_first"]))
    if cut == "prefix":
        records = records[: draw(st.integers(0, len(records)))]
    elif cut == "sample":
        keep = draw(st.lists(st.booleans(), min_size=len(records), max_size=len(records)))
        records = [r for r, k in zip(records, keep) if k]
    elif cut == "only_first":
        records = records[:1]
    return instances, records, invalid, left_alone


def _decide(instances, records, invalid, left_alone, guard):
    recs = _frame(
        [{**r, "current_period_end": None, "updated_at": NOW - timedelta(days=1), "observed_at": OBSERVED} for r in records],
        ["instance_id", "plan_id", "status", "current_period_end", "updated_at", "observed_at"],
        ("current_period_end", "updated_at", "observed_at"),
    )
    inst = _frame(instances, ["instance_id", "plan_id", "credits_total", "credits_used", "updated_at"], ("updated_at",))
    inst["credits_total"] = inst["credits_total"].astype("int64")
    return rules.decide(
        plans=PLANS, instances=inst, records=recs, invalid=pd.DataFrame(invalid, columns=["instance_id", "reason"]),
        absent_basis_at=OBSERVED, now=NOW, total_instances=len(inst), scope="full", guardrails=guard,
        left_alone=left_alone,
    )


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(world=worlds(), ratio=st.sampled_from([0.05, 0.10, 0.25]), force=st.booleans())
def test_no_unforced_run_downgrades_more_payers_than_allowed_and_none_writes_on_bad_evidence(world, ratio, force):
    instances, records, invalid, left_alone = world
    guard = Guardrails(max_change_ratio=1.0, max_paid_downgrade_ratio=ratio, force=force)
    d = _decide(instances, records, invalid, left_alone, guard)
    writes = d.corrections if d.refusal is None else d.corrections.iloc[0:0]

    paid = sum(1 for r in instances if r["plan_id"] != "free")
    paid_to_free = int(((writes["old_plan_id"] != "free") & (writes["new_plan_id"] == "free")).sum())
    if not force:
        assert paid_to_free <= max(10, math.floor(ratio * paid + 1e-9))

    bad = {r["instance_id"] for r in invalid} | {resemblance(r["instance_id"]) for r in invalid} | set(left_alone)
    assert not set(writes["instance_id"]) & bad
    assert not set(d.stale["instance_id"]) & bad  # not even planned
