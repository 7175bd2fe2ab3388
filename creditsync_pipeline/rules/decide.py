"""``decide``: billing records + app rows in, mismatches and corrections out.

One function, in named steps, each rule in one place:

1. :func:`_deciding` -- *entitlement*: the record that decides each app row (one hash join);
2. :func:`_expected` -- *expected plan*: the entitled plan, else the free plan;
3. :func:`_invalid_rows` / :func:`_missing_rows` -- the *kinds* that are reported and never
   written (``invalid_record`` incl. app rows that resemble a refused billing id,
   ``missing_instance``); :func:`_kinds` -- ``unknown_plan``, ``wrong_plan``, ``wrong_credits``;
4. :func:`_freshness` -- never overwrite app state newer than the billing data;
5. :mod:`.guards` -- the *guard rails* of a full run.

Columnar throughout (integer plan codes, array comparisons; text only for reported rows),
so the same code decides for ten instances or a million.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd

from ..ids import lookalike_problem, resemblance
from .entitlement import NO_SUBSCRIPTION, TS, deciding_records, reason_text
from .guards import Guardrails, guard_rails
from .model import CORRECTION_COLUMNS, KINDS, MISMATCH_COLUMNS, Decision, RulesError, Scope, empty_frame

__all__ = ["decide", "free_plan"]


def free_plan(plans: pd.DataFrame) -> tuple[str, int]:
    """The one plan with ``is_free``; anything else is a configuration error."""
    free = plans[plans["is_free"].astype(bool)]
    if len(free) != 1:
        raise RulesError(f"plans table must have exactly one free plan, found {len(free)}")
    row = free.iloc[0]
    return str(row["plan_id"]), int(row["credits"])


def _by_id(positions: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """``positions`` reordered so that their ``ids`` ascend (output order of every kind)."""
    if len(positions) < 2:
        return positions
    return positions[np.argsort(ids[positions], kind="stable")]


@dataclass(frozen=True)
class _Plans:
    free_id: str
    index: pd.Index
    credits: np.ndarray
    free_code: int

    @classmethod
    def of(cls, plans: pd.DataFrame) -> _Plans:
        free_id, _ = free_plan(plans)
        index = pd.Index(plans["plan_id"].to_numpy(dtype=object), dtype=object)
        return cls(free_id, index, plans["credits"].astype("int64").to_numpy(), int(index.get_indexer([free_id])[0]))


@dataclass(frozen=True)
class _Rows:
    """The app rows in scope, as arrays."""

    ids: np.ndarray
    plan: np.ndarray
    credits_raw: pd.Series
    #: what "older than the state it overwrites" compares with: updated_at, else created_at,
    #: else the moment the run started reading the rows (SPEC)
    stamp: pd.Series

    @classmethod
    def of(cls, instances: pd.DataFrame, read_started_at: datetime) -> _Rows:
        updated = pd.to_datetime(instances["updated_at"], utc=True).astype(TS).reset_index(drop=True)
        if "created_at" in instances.columns:
            created = pd.to_datetime(instances["created_at"], utc=True).astype(TS).reset_index(drop=True)
            updated = updated.where(updated.notna(), created)
        stamp = updated.where(updated.notna(), pd.Timestamp(read_started_at))
        return cls(
            instances["instance_id"].to_numpy(dtype=object),
            instances["plan_id"].to_numpy(dtype=object),
            instances["credits_total"],
            stamp,
        )

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class _Deciding:
    """Step 1 + 2: the deciding record of each row and the plan it expects."""

    w: pd.DataFrame  # deciding_records(): one row per billing instance id
    w_of: np.ndarray  # per app row: its position in w, -1 when billing has no record
    w_plan: np.ndarray
    w_entitled: np.ndarray  # per w row: entitles to a usable plan
    w_code: np.ndarray  # per w row: plan code (-1: not in plans)
    has: np.ndarray  # per app row: billing has a record
    wi: np.ndarray  # per app row: w position, 0 where none
    entitled: np.ndarray  # per app row
    exp_code: np.ndarray  # per app row: expected plan code (-1: unknown plan)


def _deciding(records: pd.DataFrame, ids: np.ndarray, now: datetime, plans: _Plans) -> _Deciding:
    n = len(ids)
    if records.empty:
        w = deciding_records(records, now, np.zeros(0, dtype=bool))
        w_index = pd.Index(w["instance_id"].to_numpy(dtype=object), dtype=object)
    else:
        rec_index = pd.Index(records["instance_id"].to_numpy(dtype=object), dtype=object)
        if rec_index.is_unique:  # builds the hash table that get_indexer below reuses
            w = deciding_records(records, now, np.zeros(len(records), dtype=bool))
            w_index = rec_index
        else:
            w = deciding_records(records, now, rec_index.duplicated(keep=False))
            w_index = pd.Index(w["instance_id"].to_numpy(dtype=object), dtype=object)
    w_of = w_index.get_indexer(ids) if n and len(w) else np.full(n, -1, dtype=np.intp)
    w_plan = w["plan_id"].to_numpy(dtype=object)
    # An entitling record without a plan entitles to nothing usable: free plan.
    w_entitled = w["entitles"].to_numpy(dtype=bool) & pd.notna(w_plan)
    w_code = plans.index.get_indexer(w_plan) if len(w) else np.zeros(0, dtype=np.intp)
    has = w_of >= 0
    wi = np.where(has, w_of, 0)
    entitled = has & w_entitled[wi] if len(w) else np.zeros(n, dtype=bool)
    exp_code = np.where(entitled, w_code[wi] if len(w) else plans.free_code, plans.free_code)
    return _Deciding(w, w_of, w_plan, w_entitled, w_code, has, wi, entitled, exp_code)


def _with_lookalikes(invalid: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
    """``invalid`` plus the app rows that resemble a refused look-alike billing id (SPEC ids rule)."""
    if invalid.empty or not len(ids):
        return invalid
    extra: dict[str, str] = {}
    for billing_id in invalid["instance_id"].drop_duplicates():
        billing_id = str(billing_id)
        problem = lookalike_problem(billing_id)
        if problem is None:
            continue
        twin = resemblance(billing_id)
        if twin and twin != billing_id and twin not in extra:
            extra[twin] = f"billing id {billing_id!r} resembles this instance ({problem}); left alone"
    if not extra:
        return invalid
    already = set(invalid["instance_id"])
    present = pd.Index(ids, dtype=object).get_indexer(list(extra)) >= 0 if pd.Index(ids, dtype=object).is_unique else None
    if present is None:
        present = pd.Index(list(extra), dtype=object).isin(list(ids))
    rows = [(i, r) for (i, r), here in zip(extra.items(), present) if here and i not in already]
    if not rows:
        return invalid
    return pd.concat([invalid, pd.DataFrame(rows, columns=["instance_id", "reason"])], ignore_index=True)


def _invalid_rows(invalid: pd.DataFrame, rows: _Rows) -> tuple[pd.DataFrame | None, np.ndarray, set[str]]:
    """Step 3a: ``invalid_record`` -- reported, the instance is left alone entirely."""
    n = len(rows)
    if invalid.empty:
        return None, np.zeros(n, dtype=bool), set()
    inv = invalid.drop_duplicates("instance_id")
    inv_index = pd.Index(inv["instance_id"].to_numpy(dtype=object), dtype=object)
    # Which invalid id each app row carries (one probe per row into the small set).
    hit = inv_index.get_indexer(rows.ids) if n else np.zeros(0, dtype=np.intp)
    is_invalid = hit >= 0
    row_of = np.full(len(inv_index), -1, dtype=np.intp)
    row_of[hit[is_invalid]] = np.flatnonzero(is_invalid)
    known = row_of >= 0
    rows_at = np.where(known, row_of, 0)
    order = np.argsort(inv_index.to_numpy(dtype=object), kind="stable")
    cur_plan = np.where(known, rows.plan[rows_at] if n else None, None)
    cur_credits = pd.array(np.where(known, rows.credits_raw.to_numpy()[rows_at] if n else 0, 0), dtype="Int64")
    cur_credits[~known] = pd.NA
    frame = pd.DataFrame(
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
    return frame, is_invalid, set(inv_index)


def _missing_rows(d: _Deciding, plans: _Plans, invalid_ids: set[str]) -> pd.DataFrame | None:
    """Step 3b: ``missing_instance`` -- billing entitles an id the app does not have."""
    w = d.w
    if not len(w):
        return None
    matched = np.zeros(len(w), dtype=bool)
    matched[d.w_of[d.has]] = True
    lost = np.flatnonzero(d.w_entitled & ~matched)
    if invalid_ids and len(lost):
        lost = lost[~pd.Index(w["instance_id"].to_numpy(dtype=object)[lost]).isin(list(invalid_ids))]
    if not len(lost):
        return None
    lost = _by_id(lost, w["instance_id"].to_numpy(dtype=object))
    reason = reason_text(w["plan_id"].iloc[lost], w["status"].iloc[lost], w["updated_at"].iloc[lost], w["entitles"].iloc[lost])
    codes = d.w_code[lost]
    frame = pd.DataFrame(
        {
            "instance_id": pd.Series(w["instance_id"].to_numpy(dtype=object)[lost], dtype="str"),
            "kind": "missing_instance",
            "current_plan_id": None,
            "expected_plan_id": pd.Series(d.w_plan[lost], dtype="object"),
            "current_credits_total": None,
            "expected_credits_total": pd.array(np.where(codes >= 0, plans.credits[np.maximum(codes, 0)], 0), dtype="Int64"),
            "reason": ("no instances row; " + reason.astype(str)).to_numpy(),
        }
    )
    unknown = codes < 0
    if unknown.any():
        frame.loc[unknown, "expected_credits_total"] = pd.NA
    return frame


def _kinds(rows: _Rows, d: _Deciding, plans: _Plans, in_scope: np.ndarray) -> dict[str, np.ndarray]:
    """Step 3c: per app row in scope, ``unknown_plan`` / ``wrong_plan`` / ``wrong_credits``."""
    n = len(rows)
    unknown = d.exp_code < 0
    inst_code = plans.index.get_indexer(rows.plan) if n else np.zeros(0, dtype=np.intp)
    exp_credits = plans.credits[np.maximum(d.exp_code, 0)] if n else np.zeros(0, dtype=np.int64)
    credits_total = rows.credits_raw.astype("int64").to_numpy()
    wrong_plan = in_scope & ~unknown & (inst_code != d.exp_code)
    wrong_credits = in_scope & ~unknown & ~wrong_plan & (credits_total != exp_credits)
    return {
        "unknown_plan": unknown & in_scope,
        "wrong_plan": wrong_plan,
        "wrong_credits": wrong_credits,
        "_exp_credits": exp_credits,
        "_credits_total": credits_total,
    }


def _reported(
    rows: _Rows, d: _Deciding, plans: _Plans, kinds: dict[str, np.ndarray], absent_basis_at: datetime
) -> tuple[list[pd.DataFrame], pd.DataFrame]:
    """The mismatch frames of step 3c and the corrections they plan (reason, basis)."""
    unknown, wrong_plan, wrong_credits = kinds["unknown_plan"], kinds["wrong_plan"], kinds["wrong_credits"]
    exp_credits, credits_total = kinds["_exp_credits"], kinds["_credits_total"]
    w = d.w
    # Only the rows that will be reported get text: sorted by id once, then split by kind.
    out_pos = _by_id(np.flatnonzero(unknown | wrong_plan | wrong_credits), rows.ids)
    out_expected_plan = np.where(d.entitled[out_pos], d.w_plan[d.wi[out_pos]] if len(w) else None, plans.free_id)
    out_reason = np.full(len(out_pos), NO_SUBSCRIPTION, dtype=object)
    out_basis = pd.Series(pd.NaT, index=range(len(out_pos)), dtype=TS)
    with_record = d.has[out_pos]
    if with_record.any():
        sel = d.w_of[out_pos[with_record]]
        text = reason_text(w["plan_id"].iloc[sel], w["status"].iloc[sel], w["updated_at"].iloc[sel], w["entitles"].iloc[sel])
        # (a record whose text cannot be built reads like no record, as it always has)
        out_reason[with_record] = text.where(text.notna(), NO_SUBSCRIPTION).to_numpy()
        seen = pd.to_datetime(w["basis_at"].iloc[sel], utc=True).astype(TS)
        out_basis.iloc[np.flatnonzero(with_record)] = seen.array
    # When billing was observed for each row: its record's page, else the start of the fetch.
    out_basis = out_basis.where(out_basis.notna(), pd.Timestamp(absent_basis_at))

    def frame(mask: np.ndarray, kind: str, prefix: str = "") -> pd.DataFrame:
        pos = out_pos[mask]
        reason = out_reason[mask]
        if prefix:
            reason = np.array([prefix + str(r) for r in reason], dtype=object)
        known = d.exp_code[pos] >= 0
        expected_credits = pd.array(np.where(known, exp_credits[pos], 0), dtype="Int64")
        expected_credits[~known] = pd.NA
        return pd.DataFrame(
            {
                "instance_id": pd.Series(rows.ids[pos], dtype="str"),
                "kind": kind,
                "current_plan_id": pd.Series(rows.plan[pos], dtype="object"),
                "expected_plan_id": pd.Series(out_expected_plan[mask], dtype="object"),
                "current_credits_total": pd.array(rows.credits_raw.to_numpy()[pos], dtype="Int64"),
                "expected_credits_total": expected_credits,
                "reason": pd.Series(reason, dtype="str"),
            }
        )

    parts = [
        frame(mask, kind, prefix)
        for mask, kind, prefix in (
            (unknown[out_pos], "unknown_plan", "plan not in plans table; "),
            (wrong_plan[out_pos], "wrong_plan", ""),
            (wrong_credits[out_pos], "wrong_credits", ""),
        )
        if mask.any()
    ]
    fixing = ~unknown[out_pos]
    fix = out_pos[fixing]
    planned = pd.DataFrame(
        {
            "instance_id": pd.Series(rows.ids[fix], dtype="str"),
            "old_plan_id": pd.Series(rows.plan[fix], dtype="str"),
            "new_plan_id": pd.Series(out_expected_plan[fixing], dtype="str"),
            "old_credits_total": credits_total[fix],
            "new_credits_total": exp_credits[fix].astype("int64"),
            "reason": pd.Series(out_reason[fixing], dtype="str"),
            "basis_at": pd.to_datetime(out_basis[fixing].reset_index(drop=True), utc=True),
            "_row": fix,
        }
    )
    return parts, planned


def _freshness(planned: pd.DataFrame, rows: _Rows) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Step 4: never write from billing data older than the row it would overwrite."""
    stamp = rows.stamp.iloc[planned["_row"].to_numpy()].reset_index(drop=True)
    newer_row = stamp.gt(planned["basis_at"].astype(TS)).to_numpy()
    planned = planned.drop(columns="_row")
    return planned[~newer_row].reset_index(drop=True), planned[newer_row].reset_index(drop=True)


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
    read_started_at: datetime | None = None,
    fetched_at: datetime | None = None,
) -> Decision:
    """Turn billing records and app rows into mismatches and corrections.

    ``instances`` holds the rows in scope (all of them for a full run, the named ones for a
    targeted run), in any order, with ``updated_at`` and (optionally) ``created_at``; an
    instance with no billing record in a *complete* fetch is entitled to nothing and belongs
    on the free plan. ``absent_basis_at`` is when that absence was observed (the start of
    the fetch). ``total_instances`` is the size of the whole table, the base of the
    mass-change guard. ``left_alone`` names instances billing could not answer for (failed
    look-ups, removed or unlinked instances): never written, never reported as mismatches
    (the report lists them on their own). ``read_started_at``: when the run started reading
    the rows (a row with neither ``updated_at`` nor ``created_at`` is only overwritten by
    billing data observed after it; default ``now``). ``fetched_at``: when the billing
    fetch ended (kept on the decision: a stale decision refuses to be written).

    Mismatches come grouped by kind (``invalid_record``, ``missing_instance``,
    ``unknown_plan``, ``wrong_plan``, ``wrong_credits``), each ordered by ``instance_id``;
    corrections are ordered by ``instance_id``.
    """
    plan_codes = _Plans.of(plans)
    rows = _Rows.of(instances, read_started_at or now)
    n = len(rows)
    d = _deciding(records, rows.ids, now, plan_codes)  # steps 1 + 2

    invalid_part, is_invalid, invalid_ids = _invalid_rows(_with_lookalikes(invalid, rows.ids), rows)
    missing_part = _missing_rows(d, plan_codes, invalid_ids)
    in_scope = ~is_invalid
    if len(left_alone) and n:
        in_scope &= ~pd.Index(rows.ids, dtype=object).isin(list(left_alone))
    kinds = _kinds(rows, d, plan_codes, in_scope)
    kind_parts, planned = _reported(rows, d, plan_codes, kinds, absent_basis_at)
    corrections, stale = _freshness(planned, rows)  # step 4

    parts = [p for p in (invalid_part, missing_part, *kind_parts) if p is not None and not p.empty]
    mismatches = pd.concat(parts, ignore_index=True)[MISMATCH_COLUMNS] if parts else empty_frame(MISMATCH_COLUMNS)
    for col in ("current_credits_total", "expected_credits_total"):
        mismatches[col] = pd.array(mismatches[col], dtype="Int64")

    # step 5: the guard rails (figures always; a refusal only for an unforced full run)
    paid_rows = rows.plan != plan_codes.free_id
    guard = guard_rails(
        changes=len(corrections),
        paid_to_free=int(((corrections["old_plan_id"] != plan_codes.free_id) & (corrections["new_plan_id"] == plan_codes.free_id)).sum()),
        paid_instances=int(paid_rows.sum()),
        total_instances=total_instances,
        billing_records=int(len(records) + len(invalid)),
        guardrails=guardrails,
    )
    refusal = guard.message if scope == "full" and not guardrails.force else None
    return Decision(
        mismatches=mismatches,
        corrections=corrections[CORRECTION_COLUMNS],
        stale=stale[CORRECTION_COLUMNS],
        refusal=refusal,
        total_instances=total_instances,
        scope=scope,
        guardrails=guardrails,
        counts={kind: int((mismatches["kind"] == kind).sum()) for kind in KINDS},
        guard=guard,
        fetched_at=fetched_at,
        read_started_at=read_started_at,
    )
