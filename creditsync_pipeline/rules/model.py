"""The rules' vocabulary: mismatch kinds, the frames' columns, the decision."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal

import pandas as pd

from .guards import GuardReport, Guardrails

__all__ = [
    "CORRECTION_COLUMNS", "KINDS", "MISMATCH_COLUMNS", "WRITABLE_KINDS",
    "Decision", "RulesError", "Scope", "empty_frame",
]

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


def empty_frame(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="object") for c in columns})


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
    #: the figures of every guard rail (and the one that refused, if any)
    guard: GuardReport | None = None
    #: when the billing data behind this decision was fetched (its end): a decision older
    #: than ``MAX_DECISION_AGE`` at write time refuses to be written
    fetched_at: datetime | None = None
    #: when the run started reading the rows (the compare-and-set's stamp of a row with
    #: neither updated_at nor created_at)
    read_started_at: datetime | None = None
