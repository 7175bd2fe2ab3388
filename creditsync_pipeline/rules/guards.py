"""The guard rails of a full run: when a run refuses and writes nothing (unless forced).

SPEC "Reconciliation rules" -- a full run refuses when it

* would change more than ``max(10, max_change_ratio x all instances)`` instances
  (``mass_change``; the floor keeps a small app's single cancellation from being refused);
* would move more paid instances (rows whose current plan is not the free one) to the free
  plan than ``max(10, max_paid_downgrade_ratio x paid instances)`` (``paid_downgrade``: a
  truncated or filtered billing list in a freemium app stays under the first rule but never
  under this one);
* sees an empty billing list while paid instances exist (``empty_list``).

A targeted run looks every instance up on its own, so no truncated list can make it
downgrade anyone: the rails are for full runs. :class:`GuardReport` carries the figures
of every rule whether or not one tripped, so reports and the UI can show how close a run
came.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

__all__ = ["GuardReport", "Guardrails", "MIN_LIMIT", "guard_rails"]

#: the smallest limit either ratio rule allows (SPEC: max(10, ...))
MIN_LIMIT = 10


@dataclass(frozen=True)
class Guardrails:
    """How careful a run is. ``force`` overrides the refusals, never compare-and-set."""

    max_change_ratio: float = 0.10
    max_paid_downgrade_ratio: float = 0.10
    force: bool = False
    #: the floor of both ratio limits
    min_limit: int = MIN_LIMIT


@dataclass(frozen=True)
class GuardReport:
    """The figures of every rail, and which one refused (``rule`` None: the run may write)."""

    rule: str | None
    message: str | None
    changes: int
    change_limit: int
    total_instances: int
    paid_to_free: int
    paid_limit: int
    paid_instances: int
    billing_records: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _limit(ratio: float, base: int, floor: int) -> int:
    """``max(floor, ratio x base)`` as a whole number of instances (rounded down)."""
    return max(floor, math.floor(ratio * base + 1e-9))


def guard_rails(
    *,
    changes: int,
    paid_to_free: int,
    paid_instances: int,
    total_instances: int,
    billing_records: int,
    guardrails: Guardrails,
) -> GuardReport:
    """Judge a full run's planned corrections; the first rail that trips refuses."""
    change_limit = _limit(guardrails.max_change_ratio, total_instances, guardrails.min_limit)
    paid_limit = _limit(guardrails.max_paid_downgrade_ratio, paid_instances, guardrails.min_limit)
    rule = message = None
    if billing_records == 0 and paid_instances:
        rule = "empty_list"
        message = (
            f"billing returned an empty subscription list while {paid_instances} paid instance(s) exist; "
            "refusing to downgrade (run with force to override)"
        )
    elif paid_to_free > paid_limit:
        share = paid_to_free / paid_instances if paid_instances else 1.0
        rule = "paid_downgrade"
        message = (
            f"paid-downgrade guard: would move {paid_to_free} of {paid_instances} paid instance(s) ({share:.1%}) "
            f"to the free plan, more than the limit of {paid_limit} "
            f"(max({guardrails.min_limit}, max_paid_downgrade_ratio {guardrails.max_paid_downgrade_ratio:.0%} "
            f"of {paid_instances})); refusing (run with force to override)"
        )
    elif changes > change_limit:
        share = changes / total_instances if total_instances else 1.0
        rule = "mass_change"
        message = (
            f"mass-change guard: would change {changes} of {total_instances} instances ({share:.1%}), "
            f"more than the limit of {change_limit} "
            f"(max({guardrails.min_limit}, max_change_ratio {guardrails.max_change_ratio:.0%} of {total_instances})); "
            "refusing (run with force to override)"
        )
    return GuardReport(
        rule=rule, message=message, changes=changes, change_limit=change_limit, total_instances=total_instances,
        paid_to_free=paid_to_free, paid_limit=paid_limit, paid_instances=paid_instances, billing_records=billing_records,
    )
