"""The reconciliation rules as first written (row-set pandas joins), frozen as a test oracle.

``creditsync_pipeline.rules`` was rewritten for scale (one hash join, integer plan
codes, text built only for output rows); ``tests/test_rules_equivalence.py`` checks
that it still decides exactly what this version decides. Do not optimise this file.
"""

from __future__ import annotations

from datetime import datetime

import pandas as pd

from creditsync_pipeline.rules import (
    ENTITLING_STATUSES,
    KINDS,
    MISMATCH_COLUMNS,
    Decision,
    Guardrails,
    Scope,
    free_plan,
)
from creditsync_pipeline.rules import empty_frame as _empty


def entitles(records: pd.DataFrame, now: datetime) -> pd.Series:
    """Which records entitle their instance to their plan at ``now``.

    active/trialing/past_due entitle; canceled entitles only while paid
    through a period end in the future; expired never does.
    """
    status = records["status"]
    period_end = pd.to_datetime(records["current_period_end"], utc=True)
    paid_through = (status == "canceled") & period_end.notna() & (period_end > pd.Timestamp(now))
    return status.isin(ENTITLING_STATUSES) | paid_through


def expected_plans(records: pd.DataFrame, now: datetime) -> pd.DataFrame:
    """Per instance with at least one record: what billing entitles it to.

    Columns: ``instance_id``, ``entitled_plan_id`` (NA when no record
    entitles), ``basis_at`` (when billing was observed for that instance),
    ``reason``. Several entitling records: the latest ``updated_at`` wins.
    """
    if records.empty:
        return pd.DataFrame(
            {
                "instance_id": pd.Series(dtype="object"),
                "entitled_plan_id": pd.Series(dtype="object"),
                "basis_at": pd.Series(dtype="datetime64[ns, UTC]"),
                "reason": pd.Series(dtype="object"),
            }
        )
    recs = records.assign(_entitles=entitles(records, now).to_numpy())
    # One sort: per instance the last row is the latest entitling record if
    # any record entitles, else the latest record of all.
    winner = (
        recs.sort_values(["instance_id", "_entitles", "updated_at", "plan_id"], kind="stable")
        .drop_duplicates("instance_id", keep="last")
        .set_index("instance_id")
    )
    # Conservative: the earliest moment any of the instance's records was seen.
    basis = recs.groupby("instance_id", sort=False)["observed_at"].min()
    entitled = winner["_entitles"].astype(bool)
    updated = winner["updated_at"].dt.strftime("%Y-%m-%dT%H:%M:%SZ").astype("object")
    out = pd.DataFrame(
        {
            "entitled_plan_id": winner["plan_id"].astype("object").where(entitled, None),
            "basis_at": basis.reindex(winner.index),
            "reason": (
                "billing: " + winner["plan_id"].astype("object") + " (" + winner["status"].astype("object")
                + ", updated " + updated + ")"
            ).where(
                entitled,
                "no entitling subscription (latest " + winner["status"].astype("object") + ", updated "
                + updated + "): free plan",
            ),
        },
        index=winner.index,
    )
    out.index.name = "instance_id"
    return out.reset_index()[["instance_id", "entitled_plan_id", "basis_at", "reason"]]


def decide(
    *,
    plans: pd.DataFrame,
    instances: pd.DataFrame,
    records: pd.DataFrame,
    invalid: pd.DataFrame,
    absent_basis_at: datetime,
    now: datetime,
    total_instances: int,
    scope: Scope = "full",
    guardrails: Guardrails = Guardrails(),
) -> Decision:
    """Turn billing records and app rows into mismatches and corrections.

    ``instances`` holds the rows in scope (all of them for a full run, the
    named ones for a targeted run); an instance with no billing record in a
    *complete* fetch is entitled to nothing and belongs on the free plan.
    ``absent_basis_at`` is when that absence was observed (the start of the
    fetch). ``total_instances`` is the size of the whole table, the base of
    the mass-change guard.
    """
    free_plan_id, _ = free_plan(plans)
    credits_by_plan = plans.set_index("plan_id")["credits"].astype("int64")

    invalid_ids = set(invalid["instance_id"]) if not invalid.empty else set()
    inst = instances.set_index("instance_id", drop=False)
    expected = expected_plans(records, now).set_index("instance_id")

    parts: list[pd.DataFrame] = []

    # invalid_record: reported, the instance is left alone entirely.
    if invalid_ids:
        inv = invalid.drop_duplicates("instance_id").set_index("instance_id")
        cur = inst.reindex(inv.index)
        parts.append(
            pd.DataFrame(
                {
                    "instance_id": inv.index,
                    "kind": "invalid_record",
                    "current_plan_id": cur["plan_id"].to_numpy(),
                    "expected_plan_id": None,
                    "current_credits_total": cur["credits_total"].to_numpy(),
                    "expected_credits_total": None,
                    "reason": ("invalid billing record: " + inv["reason"].astype(str)).to_numpy(),
                }
            )
        )

    # missing_instance: billing entitles an id the app does not have.
    exp_entitled = expected[expected["entitled_plan_id"].notna()]
    missing_ids = exp_entitled.index.difference(inst.index)
    missing_ids = missing_ids[~missing_ids.isin(list(invalid_ids))]
    if len(missing_ids):
        miss = exp_entitled.loc[missing_ids]
        parts.append(
            pd.DataFrame(
                {
                    "instance_id": miss.index,
                    "kind": "missing_instance",
                    "current_plan_id": None,
                    "expected_plan_id": miss["entitled_plan_id"].to_numpy(),
                    "current_credits_total": None,
                    "expected_credits_total": miss["entitled_plan_id"].map(credits_by_plan).to_numpy(),
                    "reason": ("no instances row; " + miss["reason"].astype(str)).to_numpy(),
                }
            )
        )

    # Every app row in scope gets an expected plan: entitled, or free.
    rows = inst[~inst.index.isin(list(invalid_ids))]
    exp = expected.reindex(rows.index)
    expected_plan = exp["entitled_plan_id"].astype("object").where(exp["entitled_plan_id"].notna(), free_plan_id)
    basis = exp["basis_at"].where(exp["basis_at"].notna(), pd.Timestamp(absent_basis_at))
    reason = exp["reason"].where(exp["reason"].notna(), "no subscription in billing: free plan")
    expected_credits = expected_plan.map(credits_by_plan)

    unknown = expected_credits.isna()
    wrong_plan = ~unknown & (rows["plan_id"] != expected_plan)
    wrong_credits = ~unknown & ~wrong_plan & (rows["credits_total"].astype("int64") != expected_credits)

    def frame(mask: pd.Series, kind: str, why: pd.Series) -> pd.DataFrame:
        return pd.DataFrame(
            {
                "instance_id": rows.index[mask.to_numpy()],
                "kind": kind,
                "current_plan_id": rows.loc[mask, "plan_id"].to_numpy(),
                "expected_plan_id": expected_plan[mask].to_numpy(),
                "current_credits_total": rows.loc[mask, "credits_total"].to_numpy(),
                "expected_credits_total": expected_credits[mask].to_numpy(),
                "reason": why[mask].to_numpy(),
            }
        )

    if unknown.any():
        parts.append(frame(unknown, "unknown_plan", "plan not in plans table; " + reason.astype(str)))
    if wrong_plan.any():
        parts.append(frame(wrong_plan, "wrong_plan", reason))
    if wrong_credits.any():
        parts.append(frame(wrong_credits, "wrong_credits", reason))

    parts = [p for p in parts if not p.empty]
    mismatches = (
        pd.concat(parts, ignore_index=True)[MISMATCH_COLUMNS] if parts else _empty(MISMATCH_COLUMNS)
    )
    for col in ("current_credits_total", "expected_credits_total"):
        mismatches[col] = pd.array(mismatches[col], dtype="Int64")

    fix = wrong_plan | wrong_credits
    planned = pd.DataFrame(
        {
            "instance_id": rows.index[fix.to_numpy()],
            "old_plan_id": rows.loc[fix, "plan_id"].to_numpy(),
            "new_plan_id": expected_plan[fix].to_numpy(),
            "old_credits_total": rows.loc[fix, "credits_total"].astype("int64").to_numpy(),
            "new_credits_total": expected_credits[fix].astype("int64").to_numpy(),
            "reason": reason[fix].to_numpy(),
            "basis_at": pd.to_datetime(basis[fix], utc=True).to_numpy(),
        }
    )
    planned["basis_at"] = pd.to_datetime(planned["basis_at"], utc=True)
    # Never write from billing data older than the row it would overwrite.
    row_updated = pd.to_datetime(rows.loc[fix, "updated_at"], utc=True).to_numpy()
    newer_row = pd.Series(row_updated, dtype="datetime64[ns, UTC]").gt(planned["basis_at"]).to_numpy()
    stale = planned[newer_row].reset_index(drop=True)
    corrections = planned[~newer_row].reset_index(drop=True)

    refusal = None
    if scope == "full" and not guardrails.force:
        refusal = _refusal(records, invalid, instances, free_plan_id, corrections, total_instances, guardrails)

    counts = {kind: int((mismatches["kind"] == kind).sum()) for kind in KINDS}
    return Decision(
        mismatches=mismatches,
        corrections=corrections,
        stale=stale,
        refusal=refusal,
        total_instances=total_instances,
        scope=scope,
        guardrails=guardrails,
        counts=counts,
    )


def _refusal(
    records: pd.DataFrame,
    invalid: pd.DataFrame,
    instances: pd.DataFrame,
    free_plan_id: str,
    corrections: pd.DataFrame,
    total_instances: int,
    guardrails: Guardrails,
) -> str | None:
    """The guard rails of a full run; ``None`` when the run may write."""
    if records.empty and invalid.empty:
        paid = int((instances["plan_id"] != free_plan_id).sum())
        if paid:
            return (
                f"billing returned an empty subscription list while {paid} paid instance(s) exist; "
                "refusing to downgrade (run with force to override)"
            )
    limit = guardrails.max_change_ratio * total_instances
    if len(corrections) > limit:
        share = len(corrections) / total_instances if total_instances else 1.0
        return (
            f"would change {len(corrections)} of {total_instances} instances ({share:.1%}), "
            f"more than max_change_ratio {guardrails.max_change_ratio:.0%}; "
            "refusing (run with force to override)"
        )
    return None
