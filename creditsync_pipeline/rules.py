"""The reconciliation rules: billing records + app rows in, decisions out.

Pure: no I/O and no hidden clock (``now`` is passed in). Columnar (pandas)
so the same code decides for ten instances or a million.

Inputs
------
* ``plans``: ``plan_id``, ``credits``, ``is_free`` (exactly one free plan).
* ``instances``: the app rows in scope: ``instance_id``, ``plan_id``,
  ``credits_total``, ``updated_at`` (UTC, NaT allowed).
* ``records``: validated billing records (``billing.RECORD_COLUMNS``), and
  ``invalid``: records with a usable ``instance_id`` that failed validation.

Output: a :class:`Decision` with every mismatch, the corrections to apply
(compare-and-set values included) and, if a guard rail trips, the refusal.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import numpy as np
import pandas as pd

ENTITLING_STATUSES = ("active", "trialing", "past_due")
KINDS = ("wrong_plan", "wrong_credits", "unknown_plan", "missing_instance", "invalid_record")
#: Kinds that a run corrects; the others are reported and never written.
WRITABLE_KINDS = ("wrong_plan", "wrong_credits")

MISMATCH_COLUMNS = [
    "instance_id",
    "kind",
    "current_plan_id",
    "expected_plan_id",
    "current_credits_total",
    "expected_credits_total",
    "reason",
]
CORRECTION_COLUMNS = [
    "instance_id",
    "old_plan_id",
    "new_plan_id",
    "old_credits_total",
    "new_credits_total",
    "reason",
    "basis_at",
]

Scope = Literal["full", "targeted"]


class RulesError(Exception):
    """The inputs cannot be reconciled at all (e.g. no free plan)."""


@dataclass(frozen=True)
class Guardrails:
    """How careful a run is. ``force`` overrides the refusals, never CAS."""

    max_change_ratio: float = 0.10
    force: bool = False


@dataclass(frozen=True)
class Decision:
    """Everything a run decided, before anything is written."""

    mismatches: pd.DataFrame
    corrections: pd.DataFrame
    #: corrections withheld because the row changed after billing was read
    stale: pd.DataFrame
    refusal: str | None
    total_instances: int
    scope: Scope
    guardrails: Guardrails = Guardrails()
    counts: dict[str, int] = field(default_factory=dict)


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


def free_plan(plans: pd.DataFrame) -> tuple[str, int]:
    """The one plan with ``is_free``; anything else is a configuration error."""
    free = plans[plans["is_free"].astype(bool)]
    if len(free) != 1:
        raise RulesError(f"plans table must have exactly one free plan, found {len(free)}")
    row = free.iloc[0]
    return str(row["plan_id"]), int(row["credits"])


def entitles(records: pd.DataFrame, now: datetime) -> pd.Series:
    """Which records entitle their instance to their plan at ``now``.

    active/trialing/past_due entitle; canceled entitles only while paid
    through a period end in the future; expired never does.
    """
    status = records["status"]
    period_end = pd.to_datetime(records["current_period_end"], utc=True)
    paid_through = (status == "canceled") & period_end.notna() & (period_end > pd.Timestamp(now))
    return status.isin(ENTITLING_STATUSES) | paid_through


_NO_SUBSCRIPTION = "no subscription in billing: free plan"
_TS = "datetime64[ns, UTC]"


def _deciding_records(records: pd.DataFrame, now: datetime, duplicated: np.ndarray) -> pd.DataFrame:
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


def _reason_text(plan: pd.Series, status: pd.Series, updated: pd.Series, entitled: pd.Series) -> pd.Series:
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
    w = _deciding_records(records, now, records["instance_id"].duplicated(keep=False).to_numpy())
    out = pd.DataFrame(
        {
            "instance_id": w["instance_id"],
            "entitled_plan_id": w["plan_id"].astype("object").where(w["entitles"], None),
            "basis_at": w["basis_at"],
            "reason": _reason_text(w["plan_id"], w["status"], w["updated_at"], w["entitles"]),
        }
    )
    return out.sort_values("instance_id", kind="stable").reset_index(drop=True)


def _by_id(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``positions`` reordered so that their ``ids`` ascend (output order of every kind)."""
    if len(positions) < 2:
        return positions
    return positions[np.argsort(ids[positions], kind="stable")]


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
    left_alone: Collection[str] = (),
) -> Decision:
    """Turn billing records and app rows into mismatches and corrections.

    ``instances`` holds the rows in scope (all of them for a full run, the
    named ones for a targeted run), in any order; an instance with no billing
    record in a *complete* fetch is entitled to nothing and belongs on the free
    plan. ``absent_basis_at`` is when that absence was observed (the start of
    the fetch). ``total_instances`` is the size of the whole table, the base of
    the mass-change guard. ``left_alone`` names instances billing could not answer for
    (failed look-ups, removed or unlinked instances): never written, never reported as
    mismatches (the report lists them on their own).

    Mismatches come grouped by kind (``invalid_record``, ``missing_instance``,
    ``unknown_plan``, ``wrong_plan``, ``wrong_credits``), each ordered by
    ``instance_id``; corrections are ordered by ``instance_id``.

    Columnar: one hash join of the instance ids against the record ids, then
    array comparisons on integer plan codes; text (reasons) is built only for
    the rows that end up in the output.
    """
    free_plan_id, _ = free_plan(plans)
    plan_index = pd.Index(plans["plan_id"].to_numpy(dtype=object), dtype=object)
    plan_credits = plans["credits"].astype("int64").to_numpy()
    free_code = int(plan_index.get_indexer([free_plan_id])[0])

    n = len(instances)
    inst_ids = instances["instance_id"].to_numpy(dtype=object)
    inst_plan = instances["plan_id"].to_numpy(dtype=object)
    inst_credits_raw = instances["credits_total"]

    # -- the deciding record of each instance (a hash join on instance_id) -------------
    if records.empty:
        w = _deciding_records(records, now, np.zeros(0, dtype=bool))
        w_index = pd.Index(w["instance_id"].to_numpy(dtype=object), dtype=object)
    else:
        rec_index = pd.Index(records["instance_id"].to_numpy(dtype=object), dtype=object)
        if rec_index.is_unique:  # builds the hash table that get_indexer below reuses
            w = _deciding_records(records, now, np.zeros(len(records), dtype=bool))
            w_index = rec_index
        else:
            w = _deciding_records(records, now, rec_index.duplicated(keep=False))
            w_index = pd.Index(w["instance_id"].to_numpy(dtype=object), dtype=object)
    w_of = w_index.get_indexer(inst_ids) if n and len(w) else np.full(n, -1, dtype=np.intp)
    w_plan = w["plan_id"].to_numpy(dtype=object)
    # An entitling record without a plan entitles to nothing usable: free plan.
    w_entitled = w["entitles"].to_numpy(dtype=bool) & pd.notna(w_plan)
    w_code = plan_index.get_indexer(w_plan) if len(w) else np.zeros(0, dtype=np.intp)

    has = w_of >= 0
    wi = np.where(has, w_of, 0)
    entitled = has & w_entitled[wi] if len(w) else np.zeros(n, dtype=bool)
    exp_code = np.where(entitled, w_code[wi] if len(w) else free_code, free_code)

    # -- invalid_record: reported, the instance is left alone entirely -------------------
    parts: list[pd.DataFrame] = []
    is_invalid = np.zeros(n, dtype=bool)
    if not invalid.empty:
        inv = invalid.drop_duplicates("instance_id")
        inv_index = pd.Index(inv["instance_id"].to_numpy(dtype=object), dtype=object)
        # Which invalid id each app row carries (one probe per row into the small set).
        hit = inv_index.get_indexer(inst_ids) if n else np.zeros(0, dtype=np.intp)
        is_invalid = hit >= 0
        row_of = np.full(len(inv_index), -1, dtype=np.intp)
        row_of[hit[is_invalid]] = np.flatnonzero(is_invalid)
        known = row_of >= 0
        rows_at = np.where(known, row_of, 0)
        order = np.argsort(inv_index.to_numpy(dtype=object), kind="stable")
        cur_plan = np.where(known, inst_plan[rows_at] if n else None, None)
        cur_credits = pd.array(
            np.where(known, inst_credits_raw.to_numpy()[rows_at] if n else 0, 0), dtype="Int64"
        )
        cur_credits[~known] = pd.NA
        parts.append(
            pd.DataFrame(
                {
                    "instance_id": pd.Series(inv_index.to_numpy(dtype=object)[order], dtype="str"),
                    "kind": "invalid_record",
                    "current_plan_id": pd.Series(cur_plan[order], dtype="object"),
                    "expected_plan_id": None,
                    "current_credits_total": cur_credits[order],
                    "expected_credits_total": None,
                    "reason": ("invalid billing record: " + inv["reason"].astype(str)).to_numpy()[order],
                }
            )
        )
        invalid_ids = set(inv_index)
    else:
        invalid_ids = set()

    # -- missing_instance: billing entitles an id the app does not have ----------------
    if len(w):
        matched = np.zeros(len(w), dtype=bool)
        matched[w_of[has]] = True
        lost = np.flatnonzero(w_entitled & ~matched)
        if invalid_ids and len(lost):
            lost = lost[~pd.Index(w["instance_id"].to_numpy(dtype=object)[lost]).isin(list(invalid_ids))]
        if len(lost):
            lost = _by_id(lost, w["instance_id"].to_numpy(dtype=object))
            reason = _reason_text(
                w["plan_id"].iloc[lost], w["status"].iloc[lost], w["updated_at"].iloc[lost], w["entitles"].iloc[lost]
            )
            exp = w_plan[lost]
            codes = w_code[lost]
            parts.append(
                pd.DataFrame(
                    {
                        "instance_id": pd.Series(w["instance_id"].to_numpy(dtype=object)[lost], dtype="str"),
                        "kind": "missing_instance",
                        "current_plan_id": None,
                        "expected_plan_id": pd.Series(exp, dtype="object"),
                        "current_credits_total": None,
                        "expected_credits_total": pd.array(
                            np.where(codes >= 0, plan_credits[np.maximum(codes, 0)], 0), dtype="Int64"
                        ),
                        "reason": ("no instances row; " + reason.astype(str)).to_numpy(),
                    }
                )
            )
            missing_unknown = codes < 0
            if missing_unknown.any():
                parts[-1].loc[missing_unknown, "expected_credits_total"] = pd.NA

    # -- every app row in scope gets an expected plan: entitled, or free ---------------
    unknown = exp_code < 0
    inst_code = plan_index.get_indexer(inst_plan) if n else np.zeros(0, dtype=np.intp)
    exp_credits = plan_credits[np.maximum(exp_code, 0)] if n else np.zeros(0, dtype=np.int64)
    credits_total = inst_credits_raw.astype("int64").to_numpy()
    in_scope = ~is_invalid
    if len(left_alone) and n:
        in_scope &= ~pd.Index(inst_ids, dtype=object).isin(list(left_alone))
    wrong_plan = in_scope & ~unknown & (inst_code != exp_code)
    wrong_credits = in_scope & ~unknown & ~wrong_plan & (credits_total != exp_credits)
    unknown &= in_scope

    # Only the rows that will be reported get text: sorted by id once, then split by kind.
    out_pos = _by_id(np.flatnonzero(unknown | wrong_plan | wrong_credits), inst_ids)
    out_expected_plan = np.where(entitled[out_pos], w_plan[wi[out_pos]] if len(w) else None, free_plan_id)
    out_reason = np.full(len(out_pos), _NO_SUBSCRIPTION, dtype=object)
    out_basis = pd.Series(pd.NaT, index=range(len(out_pos)), dtype=_TS)
    with_record = has[out_pos]
    if with_record.any():
        sel = w_of[out_pos[with_record]]
        text = _reason_text(
            w["plan_id"].iloc[sel], w["status"].iloc[sel], w["updated_at"].iloc[sel], w["entitles"].iloc[sel]
        )
        # (a record whose text cannot be built reads like no record, as it always has)
        out_reason[with_record] = text.where(text.notna(), _NO_SUBSCRIPTION).to_numpy()
        seen = pd.to_datetime(w["basis_at"].iloc[sel], utc=True).astype(_TS)
        out_basis.iloc[np.flatnonzero(with_record)] = seen.array
    # When billing was observed for each row: its record's page, else the start of the fetch.
    out_basis = out_basis.where(out_basis.notna(), pd.Timestamp(absent_basis_at))

    def frame(mask: np.ndarray, kind: str, prefix: str = "") -> pd.DataFrame:
        pos = out_pos[mask]
        reason = out_reason[mask]
        if prefix:
            reason = np.array([prefix + str(r) for r in reason], dtype=object)
        known = exp_code[pos] >= 0
        expected_credits = pd.array(np.where(known, exp_credits[pos], 0), dtype="Int64")
        expected_credits[~known] = pd.NA
        return pd.DataFrame(
            {
                "instance_id": pd.Series(inst_ids[pos], dtype="str"),
                "kind": kind,
                "current_plan_id": pd.Series(inst_plan[pos], dtype="object"),
                "expected_plan_id": pd.Series(out_expected_plan[mask], dtype="object"),
                "current_credits_total": pd.array(inst_credits_raw.to_numpy()[pos], dtype="Int64"),
                "expected_credits_total": expected_credits,
                "reason": pd.Series(reason, dtype="str"),
            }
        )

    for mask, kind, prefix in (
        (unknown[out_pos], "unknown_plan", "plan not in plans table; "),
        (wrong_plan[out_pos], "wrong_plan", ""),
        (wrong_credits[out_pos], "wrong_credits", ""),
    ):
        if mask.any():
            parts.append(frame(mask, kind, prefix))

    parts = [p for p in parts if not p.empty]
    mismatches = (
        pd.concat(parts, ignore_index=True)[MISMATCH_COLUMNS] if parts else _empty(MISMATCH_COLUMNS)
    )
    for col in ("current_credits_total", "expected_credits_total"):
        mismatches[col] = pd.array(mismatches[col], dtype="Int64")

    fixing = ~unknown[out_pos]
    fix = out_pos[fixing]
    planned = pd.DataFrame(
        {
            "instance_id": pd.Series(inst_ids[fix], dtype="str"),
            "old_plan_id": pd.Series(inst_plan[fix], dtype="str"),
            "new_plan_id": pd.Series(out_expected_plan[fixing], dtype="str"),
            "old_credits_total": credits_total[fix],
            "new_credits_total": exp_credits[fix].astype("int64"),
            "reason": pd.Series(out_reason[fixing], dtype="str"),
            "basis_at": pd.to_datetime(out_basis[fixing].reset_index(drop=True), utc=True),
        }
    )
    # Never write from billing data older than the row it would overwrite.
    row_updated = pd.to_datetime(instances["updated_at"], utc=True).iloc[fix].reset_index(drop=True).astype(_TS)
    newer_row = row_updated.gt(planned["basis_at"].astype(_TS)).to_numpy()
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
