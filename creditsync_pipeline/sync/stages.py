"""The five stages of a run, each callable on its own: fetch, read, decide, apply, verify."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from sqlalchemy.engine import Engine
import numpy as np
import pandas as pd

from .. import appdb, rules, settings
from ..billing import BillingProvider, BillingSnapshot, provider_from_settings
from ..rules import CORRECTION_COLUMNS, Decision, Scope
from .model import AppState, DecisionTooOld, SyncOptions, utcnow


class AppDbCustomerLinks:
    """A provider's remembered instance <-> customer links, kept in the app database."""

    def __init__(self, engine: Engine, provider: str, *, read_only: bool = False) -> None:
        self.engine = engine
        self.provider = provider
        #: a dry run reads the links but writes none
        self.read_only = read_only

    def customers_of(self, instance_ids: Iterable[str]) -> dict[str, str]:
        return appdb.customer_links_for(self.engine, self.provider, list(instance_ids))

    def instances_of(self, customer_ids: Iterable[str]) -> dict[str, list[str]]:
        return appdb.instances_for_customers(self.engine, self.provider, list(customer_ids))

    def remember(self, links: dict[str, str]) -> None:
        if links and not self.read_only:
            appdb.remember_customer_links(self.engine, self.provider, links)


def open_billing(
    cfg: settings.Settings, engine: Engine | None = None, *, interactive: bool = False, remember_links: bool = True
) -> BillingProvider:
    """The billing provider ``BILLING_PROVIDER`` selects, for every entry point.

    ``engine`` (the app database) keeps a provider's remembered customer links (read
    only unless ``remember_links``: a dry run writes nothing); ``interactive`` gives the
    provider the budget of a person waiting on a button.
    """
    links = (
        AppDbCustomerLinks(engine, cfg.billing_provider, read_only=not remember_links) if engine is not None else None
    )
    return provider_from_settings(cfg, interactive=interactive, links=links)


# --- the stages ------------------------------------------------------------


def fetch_billing(
    billing: BillingProvider, engine: Engine, *, plans: pd.DataFrame | None = None, state: AppState | None = None
) -> BillingSnapshot:
    """Every billing record; raises on an incomplete list.

    A provider without a list of its own (``lists_all`` False: Wix) looks up every
    instance of ``state`` (or of the app database, read now).
    """
    if plans is None:
        plans = state.plans if state is not None else appdb.load_plans(engine)
    plan_ids = [str(p) for p in plans["plan_id"]]
    if billing.lists_all:
        return billing.fetch_all(plan_ids=plan_ids)
    instances = state.instances if state is not None else appdb.read_instances(engine, ordered=False)
    return billing.fetch_all([str(i) for i in instances["instance_id"]], plan_ids=plan_ids)


def fetch_billing_for(
    billing: BillingProvider, instance_ids: Iterable[str], *, plan_ids: Iterable[str] = ()
) -> BillingSnapshot:
    """The records of the named instances, one look-up each."""
    return billing.fetch_instances(instance_ids, plan_ids=list(plan_ids))


def read_state(engine: Engine, instance_ids: Iterable[str] | None = None, *, plans: pd.DataFrame | None = None) -> AppState:
    """Plans and the instance rows in scope (all, or the named ones)."""
    plans = appdb.load_plans(engine) if plans is None else plans
    read_started_at = utcnow()
    # The rules order their output themselves: a full read skips the ORDER BY (a sort of the table).
    instances = appdb.read_instances(
        engine, None if instance_ids is None else list(instance_ids), ordered=instance_ids is not None
    )
    total = len(instances) if instance_ids is None else appdb.count_instances(engine)
    return AppState(plans=plans, instances=instances, total_instances=total, read_started_at=read_started_at)


def decide(
    snapshot: BillingSnapshot, state: AppState, *, options: SyncOptions, now: datetime | None = None
) -> Decision:
    """Apply the rules to one snapshot and one state."""
    scope: Scope = "full" if snapshot.requested_ids is None else "targeted"
    return rules.decide(
        plans=state.plans,
        instances=state.instances,
        records=snapshot.records,
        invalid=snapshot.invalid,
        absent_basis_at=snapshot.started_at,
        now=now or utcnow(),
        total_instances=state.total_instances,
        scope=scope,
        guardrails=options.guardrails,
        left_alone=left_alone(snapshot, state),
        read_started_at=state.read_started_at,
        fetched_at=snapshot.finished_at,
    )


def left_alone(snapshot: BillingSnapshot, state: AppState) -> list[str]:
    """Instances in scope that billing could not answer for (never written, reported).

    The unresolved look-ups, and -- for a provider that looks every instance up (Wix) --
    the rows that were not looked up (created after the look-ups began).
    """
    ids = [str(i) for i in snapshot.unresolved["instance_id"]]
    if snapshot.looked_up is not None:
        covered = snapshot.looked_up
        ids.extend(str(i) for i in state.instances["instance_id"] if i not in covered)
    return ids


def apply(
    engine: Engine,
    decision: Decision,
    *,
    run_id: str,
    trigger: str,
    options: SyncOptions,
    now: datetime | None = None,
) -> appdb.ApplyResult | None:
    """Write the decision's corrections (CAS + audit, one transaction).

    Returns ``None`` when nothing may be written: a dry run or a refusal. Raises
    :class:`DecisionTooOld` when the billing data behind the decision was fetched more than
    ``rules.MAX_DECISION_AGE`` ago (a re-executed old Dagster step, say): nothing is
    written and the run must be repeated.
    """
    if options.dry_run or decision.refusal is not None:
        return None
    now = now or utcnow()
    if decision.fetched_at is not None and now - decision.fetched_at > rules.MAX_DECISION_AGE:
        minutes = (now - decision.fetched_at).total_seconds() / 60
        raise DecisionTooOld(
            f"refusing to write a decision made from billing data fetched {minutes:.0f} minute(s) ago "
            f"(at {decision.fetched_at.isoformat(timespec='seconds')}; the limit is "
            f"{rules.MAX_DECISION_AGE.total_seconds() / 60:.0f}); nothing written: run the sync again"
        )
    return appdb.apply_corrections(
        engine, decision.corrections, run_id=run_id, trigger=trigger, now=now, read_started_at=decision.read_started_at
    )


def verify(
    engine: Engine, snapshot: BillingSnapshot, decision: Decision, *, now: datetime | None = None
) -> pd.DataFrame:
    """Re-read the rows this run found wrong; return the corrections still due.

    A row changed after the billing data was read is not counted: this
    run's data is too old to judge it.
    """
    fixable = decision.mismatches[decision.mismatches["kind"].isin(rules.WRITABLE_KINDS)]
    ids = list(fixable["instance_id"])
    if not ids:
        return rules.empty_frame(CORRECTION_COLUMNS)
    state = AppState(
        plans=appdb.load_plans(engine),
        instances=appdb.read_instances(engine, ids, ordered=False),
        total_instances=decision.total_instances,
    )
    # A set lookup per record (hashes are cached by now) beats isin() against a long list.
    wanted = set(ids)
    record_ids = snapshot.records["instance_id"].to_numpy(dtype=object)
    keep = np.fromiter(map(wanted.__contains__, record_ids), dtype=bool, count=len(record_ids))
    records = snapshot.records[keep]
    again = rules.decide(
        plans=state.plans,
        instances=state.instances,
        records=records,
        invalid=snapshot.invalid.iloc[0:0],
        absent_basis_at=snapshot.started_at,
        now=now or utcnow(),
        total_instances=state.total_instances,
        scope="targeted",
    )
    return again.corrections


# --- reporting ---------------------------------------------------------------
