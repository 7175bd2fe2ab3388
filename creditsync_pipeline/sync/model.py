"""The run's vocabulary: options, the app's side, the report, the exceptions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol
import uuid

import pandas as pd

from .. import rules, settings
from ..billing.base import empty_unresolved
from ..rules import CORRECTION_COLUMNS, KINDS, MISMATCH_COLUMNS, Guardrails, Scope

#: left-alone instances listed one by one in a report's summary (all of them are in ``unresolved``)
UNRESOLVED_LISTED = 100
#: the audit triggers of a run
TRIGGERS = ("periodic", "manual", "webhook", "provisioning", "revert")


class Log(Protocol):
    """What the service needs of a logger (stdlib logging or Dagster's)."""

    def info(self, msg: str, *args: Any) -> Any: ...
    def warning(self, msg: str, *args: Any) -> Any: ...
    def error(self, msg: str, *args: Any) -> Any: ...


@dataclass(frozen=True)
class SyncOptions:
    """Knobs of one run."""

    dry_run: bool = False
    force: bool = False
    max_change_ratio: float = 0.10
    max_paid_downgrade_ratio: float = 0.10
    #: per-instance "Synced credits for instance ..." lines before summarising
    log_limit: int = 1000

    @property
    def guardrails(self) -> Guardrails:
        return Guardrails(
            max_change_ratio=self.max_change_ratio,
            max_paid_downgrade_ratio=self.max_paid_downgrade_ratio,
            force=self.force,
        )

    @classmethod
    def from_settings(cls, cfg: settings.Settings, **overrides: Any) -> SyncOptions:
        """The guard-rail settings of the environment (``CREDITSYNC_MAX_*``), plus ``overrides``."""
        values: dict[str, Any] = {
            "max_change_ratio": cfg.max_change_ratio,
            "max_paid_downgrade_ratio": cfg.max_paid_downgrade_ratio,
        }
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class AppState:
    """The app side of a run: plans, the rows in scope, the table size."""

    plans: pd.DataFrame
    instances: pd.DataFrame
    total_instances: int
    #: when the read of the rows began (a row with neither updated_at nor created_at is
    #: only overwritten by billing data observed after it)
    read_started_at: datetime | None = None


@dataclass
class SyncReport:
    """What a run found and did; each entry point renders it its own way."""

    run_id: str
    trigger: str
    scope: Scope
    dry_run: bool
    forced: bool
    total_instances: int = 0
    billing_records: int = 0
    counts: dict[str, int] = field(default_factory=lambda: {k: 0 for k in KINDS})
    mismatches: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(MISMATCH_COLUMNS))
    planned: int = 0
    applied: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(CORRECTION_COLUMNS))
    skipped_conflict: int = 0
    skipped_stale: int = 0
    refused: str | None = None
    #: the guard rails' figures (``rules.GuardReport.as_dict``): the rule that refused, if any
    guard: dict[str, Any] | None = None
    #: False when the check after the commit could not run (``remaining`` is then unknown)
    verified: bool = True
    remaining: pd.DataFrame = field(default_factory=lambda: rules.empty_frame(CORRECTION_COLUMNS))
    #: requested ids (targeted runs) that have no row in ``instances``
    unknown_instance_ids: list[str] = field(default_factory=list)
    #: instances billing could not answer for (``UNRESOLVED_COLUMNS``): left alone
    unresolved: pd.DataFrame = field(default_factory=empty_unresolved)
    #: billing records that belong to no instance (Stripe subscriptions without one)
    unassigned: int = 0
    #: per-instance look-ups made (providers without a list, targeted runs)
    lookups: int = 0
    provider: str = "generic"
    #: billing pages read (a list) and records that failed validation
    billing_pages: int = 0
    invalid_records: int = 0
    #: valid billing records per subscription status
    billing_status_counts: dict[str, int] = field(default_factory=dict)
    #: the plans table with the instances on each plan when the run read them
    #: (``plan_id``, ``credits``, ``is_free``, ``instances``)
    plans: list[dict[str, Any]] = field(default_factory=list)
    #: things that went wrong after the commit (the verify re-read, say): the run still
    #: reports what it committed
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def mismatch_count(self) -> int:
        return int(len(self.mismatches))

    @property
    def applied_count(self) -> int:
        return int(len(self.applied))

    def summary(self) -> dict[str, Any]:
        """JSON-ready counts (no per-instance rows)."""
        return {
            "run_id": self.run_id,
            "trigger": self.trigger,
            "scope": self.scope,
            "dry_run": self.dry_run,
            "forced": self.forced,
            "total_instances": self.total_instances,
            "billing_records": self.billing_records,
            "mismatch_count": self.mismatch_count,
            "counts": dict(self.counts),
            "planned": self.planned,
            "applied": self.applied_count,
            "skipped_conflict": self.skipped_conflict,
            "skipped_stale": self.skipped_stale,
            "remaining": int(len(self.remaining)),
            "refused": self.refused,
            "guard": dict(self.guard) if self.guard else None,
            "verified": self.verified,
            "unknown_instance_ids": list(self.unknown_instance_ids),
            "provider": self.provider,
            "lookups": self.lookups,
            "unresolved": self.unresolved_counts(),
            "unresolved_instances": [
                {"instance_id": str(r.instance_id), "status": str(r.status), "reason": str(r.reason)}
                for r in self.unresolved.head(UNRESOLVED_LISTED).itertuples(index=False)
            ],
            "unassigned_records": self.unassigned,
            "warnings": list(self.warnings),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }

    def unresolved_counts(self) -> dict[str, int]:
        """Left-alone instances per status (``unavailable``, ``error``, ``removed``, ``unlinked``)."""
        return {str(k): int(v) for k, v in self.unresolved["status"].value_counts().items()}


class DecisionTooOld(Exception):
    """A decision whose billing data is too old to write (SPEC: fresh decisions only)."""


class SyncRefused(Exception):
    """A guard rail refused the run; nothing was written."""

    def __init__(self, report: SyncReport) -> None:
        super().__init__(f"refused: {report.refused}")
        self.report = report


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def new_run_id() -> str:
    return uuid.uuid4().hex
