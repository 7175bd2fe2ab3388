"""Entitlement: which billing record decides an instance, and what it entitles it to.

SPEC "Reconciliation rules": a record entitles its instance to ``plan_id`` when its status
is ``active``, ``trialing`` or ``past_due``, or ``canceled`` with a ``current_period_end``
still in the future; several records for one instance: the entitling one with the latest
``updated_at`` (else the latest of all).
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

__all__ = ["ENTITLING_STATUSES", "NO_SUBSCRIPTION", "deciding_records", "entitles", "expected_plans", "reason_text"]

ENTITLING_STATUSES = ("active", "trialing", "past_due")
NO_SUBSCRIPTION = "no subscription in billing: free plan"
TS = "datetime64[ns, UTC]"


def entitles(records: pd.DataFrame, now: datetime) -> pd.Series:
    """Which records entitle their instance to their plan at ``now``.

    active/trialing/past_due entitle; canceled entitles only while paid
    through a period end in the future; expired never does.
    """
    status = records["status"]
    period_end = pd.to_datetime(records["current_period_end"], utc=True)
    paid_through = (status == "canceled") & period_end.notna() & (period_end > pd.Timestamp(now))
    return status.isin(ENTITLING_STATUSES) | paid_through


def deciding_records(records: pd.DataFrame, now: datetime, duplicated: np.ndarray) -> pd.DataFrame:
    """The record that decides each instance: one row per ``instance_id``.

    Columns ``instance_id``, ``plan_id``, ``status``, ``updated_at``, ``entitles``
    (bool), ``basis_at``. An id with one record keeps it (no sort, no grouping:
    the common case at scale). Ids with several records (``duplicated``) get the
    latest entitling one, else the latest of all (ties: the larger ``plan_id``,
    then the later record), and the earliest moment any of them was observed.
    """
    ent = entitles(records, now).to_numpy(dtype=bool)
    cols = ["instance_id", "plan_id", "status", "updated_at"]
    if not duplicated.any():
        return pd.DataFrame(
            {
                **{c: records[c].reset_index(drop=True) for c in cols},
                "entitles": ent,
                "basis_at": records["observed_at"].reset_index(drop=True),
            }
        )
    single = records.loc[~duplicated, cols].assign(
        entitles=ent[~duplicated], basis_at=records["observed_at"].loc[~duplicated]
    )
    recs = records.loc[duplicated].assign(_entitles=ent[duplicated])
    # One sort: per instance the last row is the latest entitling record if
    # any record entitles, else the latest record of all.
    winner = recs.sort_values(["instance_id", "_entitles", "updated_at", "plan_id"], kind="stable").drop_duplicates(
        "instance_id", keep="last"
    )
    # Conservative: the earliest moment any of the instance's records was seen.
    basis = recs.groupby("instance_id", sort=False)["observed_at"].min()
    several = winner[cols].assign(
        entitles=winner["_entitles"].astype(bool).to_numpy(),
        basis_at=basis.reindex(winner["instance_id"]).set_axis(winner.index),
    )
    return pd.concat([single, several], ignore_index=True)


def reason_text(plan: pd.Series, status: pd.Series, updated: pd.Series, entitled: pd.Series) -> pd.Series:
    """Why billing says what it says (NaN where a part is missing)."""
    plan = pd.Series(plan, dtype="object").reset_index(drop=True)
    status = pd.Series(status, dtype="object").reset_index(drop=True)
    text = _iso_seconds(pd.Series(updated).reset_index(drop=True))
    entitled = pd.Series(entitled, dtype=bool).reset_index(drop=True)
    return ("billing: " + plan + " (" + status + ", updated " + text + ")").where(
        entitled,
        "no entitling subscription (latest " + status + ", updated " + text + "): free plan",
    )


def _iso_seconds(updated: pd.Series) -> pd.Series:
    """``updated.dt.strftime("%Y-%m-%dT%H:%M:%SZ")`` in C (NaT stays missing), as objects."""
    utc = pd.to_datetime(updated, utc=True).dt.tz_localize(None).to_numpy(dtype="datetime64[ns]")
    text = np.char.add(np.datetime_as_string(utc.astype("datetime64[s]"), unit="s"), "Z").astype(object)
    text[np.isnat(utc)] = np.nan
    return pd.Series(text, dtype="object")


def expected_plans(records: pd.DataFrame, now: datetime) -> pd.DataFrame:
    """Per instance with at least one record: what billing entitles it to.

    Columns: ``instance_id``, ``entitled_plan_id`` (NA when no record
    entitles), ``basis_at`` (when billing was observed for that instance),
    ``reason``; ordered by ``instance_id``. Several entitling records: the
    latest ``updated_at`` wins.
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
    w = deciding_records(records, now, records["instance_id"].duplicated(keep=False).to_numpy())
    out = pd.DataFrame(
        {
            "instance_id": w["instance_id"],
            "entitled_plan_id": w["plan_id"].astype("object").where(w["entitles"], None),
            "basis_at": w["basis_at"],
            "reason": reason_text(w["plan_id"], w["status"], w["updated_at"], w["entitles"]),
        }
    )
    return out.sort_values("instance_id", kind="stable").reset_index(drop=True)
