"""One ``GET /apps/v1/instance`` answer -> the SPEC records of that instance (pure).

Wix answers ``{"instance": {"instanceId", "isFree", "billing": {"packageName",
"billingCycle", "timeStamp", "expirationDate", "autoRenewing", "freeTrialInfo"}}}``;
``billing`` is there only when ``isFree`` is false.

* ``isFree`` true, or no (or an empty) ``packageName``: no subscription, free plan.
  ``isFree`` wins over a ``packageName`` it contradicts.
* Otherwise one record: ``plan_id`` = ``packageName`` mapped by ``CREDITSYNC_PLAN_MAP``;
  ``status`` ``trialing`` while ``freeTrialInfo.status`` is ``IN_PROGRESS`` (Wix counts
  a trial as paid), else ``active`` (Wix keeps ``packageName`` until a canceled plan
  expires, so a present package always entitles); ``current_period_end`` =
  ``expirationDate`` (yearly and multi-year plans only; absent is null);
  ``updated_at`` = ``timeStamp``, or the time the request was sent when Wix gives none
  (``updated_at`` only ranks several records of one instance; the rule "never older
  than the state it overwrites" uses the observation time), so a paying customer is
  never left at free for want of a purchase date.
* Fields are passed on as Wix gave them: a ``packageName`` that is not a string, or a
  date that is not ISO-8601, makes the record an ``invalid_record`` in validation
  (reported, left alone). An answer that is not of this shape raises ValueError.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from ..http import json_type

__all__ = ["TRIAL_IN_PROGRESS", "instance_records"]

#: ``billing.freeTrialInfo.status`` of a trial that is running
TRIAL_IN_PROGRESS = "IN_PROGRESS"


def instance_records(
    body: Any, instance_id: str, observed_at: datetime, plan_map: Mapping[str, str] | None = None
) -> tuple[dict[str, Any], ...]:
    """The SPEC records of one ``GET /apps/v1/instance`` answer: none (free) or one.

    Raises ValueError (one line) for an answer that is not of Wix's shape.
    """
    if not isinstance(body, dict) or not isinstance(body.get("instance"), dict):
        raise ValueError(f"expected an object with an 'instance' object, got {json_type(body)}")
    instance = body["instance"]
    is_free = instance.get("isFree")
    if is_free is not None and not isinstance(is_free, bool):
        raise ValueError(f"'isFree' is not a boolean ({json_type(is_free)})")
    billing = instance.get("billing")
    if billing is not None and not isinstance(billing, dict):
        raise ValueError(f"'billing' is not an object ({json_type(billing)})")
    package = billing.get("packageName") if billing else None
    if is_free or package is None or package == "":
        return ()
    trial = billing.get("freeTrialInfo")
    trialing = isinstance(trial, dict) and trial.get("status") == TRIAL_IN_PROGRESS
    stamp = billing.get("timeStamp")
    if stamp is None or stamp == "":
        stamp = observed_at.isoformat()
    found = instance.get("instanceId")
    if plan_map and isinstance(package, str):
        package = plan_map.get(package, package)
    return (
        {
            "instance_id": instance_id if found is None else found,
            "plan_id": package,
            "status": "trialing" if trialing else "active",
            "current_period_end": billing.get("expirationDate"),
            "updated_at": stamp,
        },
    )
