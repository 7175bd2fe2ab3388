"""The blocking side of ``POST /api/billing/sync-credits`` and the receivers (run in Starlette's thread pool).

:class:`ManualSync` syncs the caller's own instance with the one targeted sync
(:func:`creditsync_pipeline.sync.run_targeted_sync`) and turns every outcome into an
HTTP status and JSON body; it also lands webhook rows and answers the health check.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine
from starlette.responses import JSONResponse

from .. import appdb, settings, sync
from ..billing import BillingAuthError, BillingError, BillingProvider, BillingUnavailableError
from ..rules import WRITABLE_KINDS, RulesError
from . import webhooks

logger = logging.getLogger("creditsync.server")
#: the sync service's operator lines ("[CreditSync] ...") go to the usual logger
sync_logger = logging.getLogger("creditsync")
#: Retry-After sent when billing or the database is unavailable
UNAVAILABLE_RETRY_AFTER = 30


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


def plain(value: Any) -> Any:
    """A pandas/numpy scalar as a JSON-ready Python value (NA -> None)."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


@dataclass
class Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


class ManualSync:
    """The blocking side of the app (called in the thread pool)."""

    def __init__(self, cfg: settings.Settings, engine: Engine, billing: BillingProvider) -> None:
        self.cfg = cfg
        self.engine = engine
        self.billing = billing

    def _current(self, instance_id: str) -> dict[str, Any] | None:
        rows = appdb.read_instances(self.engine, [instance_id])
        if rows.empty:
            return None
        row = rows.iloc[0]
        return {"plan_id": plain(row["plan_id"]), "credits_total": plain(row["credits_total"])}

    @staticmethod
    def _unknown(instance_id: str) -> Outcome:
        return Outcome(404, {
            "error": "unknown_instance",
            "message": f"instance {instance_id} is not provisioned in the app database; nothing changed",
        })

    @staticmethod
    def _database_unavailable() -> Outcome:
        return Outcome(
            503,
            {"error": "database_unavailable", "message": "the app database is unavailable; nothing changed, try again later"},
            {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
        )

    @staticmethod
    def _unresolved(status: str, instance_id: str) -> Outcome:
        """Billing could not answer for this instance: nothing changed, say why in words."""
        if status == "unavailable":
            return Outcome(
                503,
                {"error": "billing_unavailable", "message": "the billing API is unavailable; nothing changed, try again later"},
                {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
            )
        if status == "error":
            return Outcome(
                502, {"error": "billing_error", "message": "the billing API answered something unusable; nothing changed"}
            )
        # removed / unlinked: billing does not know this instance (yet); it is never downgraded for that
        return Outcome(200, {
            "instance_id": instance_id,
            "changed": False,
            "outcome": "not_found_in_billing",
            "message": "billing does not know this instance yet; nothing changed, try again in a minute",
        })

    def sync_instance(self, instance_id: str) -> Outcome:
        """Run the targeted sync of one instance and render the answer."""
        try:
            # Cheap existence check first: an unknown instance costs no billing call.
            known = self._current(instance_id) is not None
        except appdb.AppDatabaseError as exc:
            sync_logger.error("[CreditSync] Error running credit sync task: %s", sync.one_line(exc))
            return self._database_unavailable()
        if not known:
            logger.info("[CreditSync] Manual sync for unknown instance %s: nothing to do", instance_id)
            return self._unknown(instance_id)
        # The sync service logs any failure as "[CreditSync] Error running credit sync task: ...";
        # the caller gets a one-line message without internals.
        try:
            report = sync.run_targeted_sync(
                self.engine,
                self.billing,
                [instance_id],
                trigger="manual",
                run_id=sync.new_run_id(),
                options=sync.SyncOptions.from_settings(self.cfg),
                log=sync_logger,
            )
        except BillingUnavailableError:
            return Outcome(
                503,
                {"error": "billing_unavailable", "message": "the billing API is unavailable; nothing changed, try again later"},
                {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
            )
        except BillingAuthError:
            return Outcome(
                502, {"error": "billing_error", "message": "the billing API refused creditsync's credentials; nothing changed"}
            )
        except BillingError:
            return Outcome(
                502, {"error": "billing_error", "message": "the billing API answered something unusable; nothing changed"}
            )
        except appdb.AppDatabaseError:
            return self._database_unavailable()
        except RulesError:
            return Outcome(
                503, {"error": "sync_failed", "message": "the sync cannot run with the current plans; nothing changed"}
            )

        if report.refused:
            return Outcome(503, {"error": "sync_refused", "message": "a guard rail refused the sync; nothing changed"})
        if instance_id in report.unknown_instance_ids:
            return self._unknown(instance_id)
        unresolved = report.unresolved[report.unresolved["instance_id"] == instance_id]
        if len(unresolved):
            return self._unresolved(str(unresolved.iloc[0]["status"]), instance_id)
        body: dict[str, Any] = {"instance_id": instance_id, "run_id": report.run_id}
        applied = report.applied[report.applied["instance_id"] == instance_id]
        if len(applied):
            row = applied.iloc[0]
            body.update(
                changed=True,
                outcome="updated",
                old={"plan_id": plain(row["old_plan_id"]), "credits_total": plain(row["old_credits_total"])},
                new={"plan_id": plain(row["new_plan_id"]), "credits_total": plain(row["new_credits_total"])},
            )
            if report.warnings:
                body["warnings"] = list(report.warnings)
            return Outcome(200, body)
        try:
            current = self._current(instance_id)
        except appdb.AppDatabaseError:  # nothing was applied: "nothing changed" holds
            return self._database_unavailable()
        if current is None:  # deleted while we synced
            return self._unknown(instance_id)
        mine = report.mismatches[report.mismatches["instance_id"] == instance_id]
        kinds = [str(k) for k in mine["kind"]]
        if not kinds:
            outcome = "already_correct"
        elif any(k in WRITABLE_KINDS for k in kinds):
            outcome = "skipped"  # changed meanwhile (compare-and-set) or newer than billing
        else:
            outcome = "needs_attention"  # unknown_plan / invalid_record: reported, never written
            body["kind"] = kinds[0]
        body.update(changed=False, outcome=outcome, old=dict(current), new=dict(current))
        return Outcome(200, body)

    def land(self, event: webhooks.WebhookEvent, lease_owner: str | None = None) -> appdb.LandedEvent:
        """Land (and commit) the event's row; leased to ``lease_owner`` when given."""
        return appdb.land_webhook_event(
            self.engine,
            event_id=event.event_id,
            event_type=event.event_type,
            instance_id=event.instance_id,
            payload=event.payload,
            lease_owner=lease_owner,
            lease_seconds=appdb.DEFAULT_LEASE_SECONDS if lease_owner else None,
        )

    def health(self) -> None:
        appdb.check_connection(self.engine)
