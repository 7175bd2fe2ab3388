"""SPEC-shaped generic records -> Wix instances (the demo's and the benchmark's data).

An instance with an entitling record (the rules' own :func:`creditsync_pipeline.rules.entitles`)
is a paid installation with that plan as ``packageName``; every other one is a free
installation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import pandas as pd

from ...rules import entitles

if TYPE_CHECKING:
    from ...demo import DemoData

__all__ = ["demo_instances", "instances_from_records"]

def instances_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    installed: Iterable[str] = (),
    package_names: Mapping[str, str] | None = None,
    now: datetime | None = None,
    app_name: str = "creditsync demo",
) -> dict[str, dict[str, Any]]:
    """Wix instances for SPEC-shaped generic records (instance id -> instance object).

    An instance with an entitling record (the rules' own :func:`~creditsync_pipeline.rules.entitles`
    at ``now``; several: the latest ``updated_at``) has the paid ``packageName`` (its
    ``plan_id``, or ``package_names[plan_id]``): ``trialing`` -> a free trial in progress,
    ``canceled`` paid through -> ``autoRenewing`` false, a period end -> a yearly plan with
    that ``expirationDate``. Every other record's instance, and every id in ``installed``
    (the app rows), is a free installation.
    """
    frame = pd.DataFrame(
        [r for r in records if isinstance(r, Mapping) and isinstance(r.get("instance_id"), str)],
        columns=["instance_id", "plan_id", "status", "current_period_end", "updated_at"],
    )
    out: dict[str, dict[str, Any]] = {i: _free(i, app_name) for i in installed}
    if frame.empty:
        return out
    judged = pd.DataFrame({
        "status": frame["status"],
        "current_period_end": pd.to_datetime(frame["current_period_end"], utc=True, errors="coerce", format="ISO8601"),
    })
    frame["entitled"] = entitles(judged, now or datetime.now(timezone.utc)).to_numpy()
    frame = frame.sort_values(["entitled", "updated_at"], kind="stable", na_position="first")
    names = package_names or {}
    for r in frame.drop_duplicates("instance_id", keep="last").itertuples(index=False):
        if not r.entitled:
            out[r.instance_id] = _free(r.instance_id, app_name)
            continue
        end = r.current_period_end if isinstance(r.current_period_end, str) else None
        billing: dict[str, Any] = {
            "packageName": names.get(r.plan_id, r.plan_id) if isinstance(r.plan_id, str) else r.plan_id,
            "billingCycle": "YEARLY" if end else "MONTHLY",
            "timeStamp": r.updated_at,
            "autoRenewing": r.status != "canceled",
        }
        if end:
            billing["expirationDate"] = end
        if r.status == "trialing":
            billing["freeTrialInfo"] = {"status": "IN_PROGRESS"}
        out[r.instance_id] = {"instanceId": r.instance_id, "appName": app_name, "isFree": False, "billing": billing}
    return out


def _free(instance_id: str, app_name: str) -> dict[str, Any]:
    return {"instanceId": instance_id, "appName": app_name, "isFree": True}


def demo_instances(data: DemoData, *, now: datetime | None = None) -> dict[str, dict[str, Any]]:
    """The Wix side of the demo data set: every app row installed, paid where billing entitles.

    (``deleted-site-9``, the demo's purchase for an instance the app never provisioned,
    is a Wix instance too; a Wix full run only looks up app rows, so it never shows.)
    """
    return instances_from_records(data.records, installed=[r["instance_id"] for r in data.instances], now=now)
