"""The reconciliation rules: billing records + app rows in, decisions out.

Pure: no I/O and no hidden clock (``now`` is passed in). Columnar (pandas) so the same
code decides for ten instances or a million.

* :mod:`.entitlement` -- which record decides an instance, what it entitles it to;
* :mod:`.decide` -- :func:`decide`, in named steps (entitlement, expected plan, kinds,
  freshness, guard rails);
* :mod:`.guards` -- the guard rails of a full run;
* :mod:`.model` -- the kinds, the frames' columns, :class:`Decision`.

Inputs of :func:`decide`
------------------------
* ``plans``: ``plan_id``, ``credits``, ``is_free`` (exactly one free plan).
* ``instances``: the app rows in scope: ``instance_id``, ``plan_id``, ``credits_total``,
  ``updated_at`` and optionally ``created_at`` (UTC, NaT allowed).
* ``records``: validated billing records (``billing.RECORD_COLUMNS``), and ``invalid``:
  records with a usable ``instance_id`` that failed validation.
"""

from __future__ import annotations

from datetime import timedelta

from .decide import decide, free_plan
from .entitlement import ENTITLING_STATUSES, entitles, expected_plans
from .guards import MIN_LIMIT, GuardReport, Guardrails
from .model import CORRECTION_COLUMNS, KINDS, MISMATCH_COLUMNS, WRITABLE_KINDS, Decision, RulesError, Scope, empty_frame

#: the longest a decision may wait between the end of its billing fetch and its write (SPEC)
MAX_DECISION_AGE = timedelta(minutes=15)

__all__ = [
    "CORRECTION_COLUMNS",
    "ENTITLING_STATUSES",
    "KINDS",
    "MAX_DECISION_AGE",
    "MIN_LIMIT",
    "MISMATCH_COLUMNS",
    "WRITABLE_KINDS",
    "Decision",
    "GuardReport",
    "Guardrails",
    "RulesError",
    "Scope",
    "decide",
    "empty_frame",
    "entitles",
    "expected_plans",
    "free_plan",
]
