"""The real-time nets' service: webhook rows and new instances -> targeted syncs.

A webhook row or a new instance is a *poke*, never the truth: every instance
named is synced with :func:`creditsync_pipeline.sync.run_targeted_sync`
(``GET /v1/subscriptions/{id}``, the same rules, compare-and-set writes and
audit as the full sync). This module only decides *which* instances, runs
that sync (a few rounds, isolating a poisoned instance), and turns the
reports into per-row outcomes on ``billing_webhook_events``. The webhook sensor's
runs and the HTTP receivers (:mod:`creditsync_pipeline.server.receiver`) both settle
rows through :func:`run_batch`; a lease on each row keeps them from syncing one row
twice at the same time.

Outcomes (``billing_webhook_events.outcome``):

=================== ============ ==================================================
outcome             processed_at meaning
=================== ============ ==================================================
``corrected``       set          the instance was corrected (audited)
``already_correct`` set          billing and the app already agreed
``unknown_instance``set          no such row in ``instances`` (the provisioning net
                                 syncs it once it appears)
``unknown_plan``    set          entitled to a plan missing from ``plans`` (never written)
``invalid_record``  set          billing's record for it fails validation (left alone)
``removed``         set          the provider no longer knows the instance (Wix: the app
                                 was removed from the site); left alone
``duplicate_event`` set          an earlier row carries the same ``event_id``
``unreadable``      set          no usable instance id in the row (column or payload)
``error``           null         the last attempt failed for this instance (an unusable
                                 answer, a bug); the sensor retries it, counting attempts
``waiting``         null         billing or the database was down as a whole: the attempt
                                 was given back; the sensor retries once it recovers
``failed``          null         gave up after :data:`MAX_ATTEMPTS` attempts; the periodic
                                 full sync still covers the instance (reset ``attempts``
                                 to 0 to retry)
=================== ============ ==================================================
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.engine import Engine

from . import appdb, rules, sync
from .billing import REMOVED, UNAVAILABLE, BillingProvider, is_systemic
from .ids import instance_id_problem, log_safe

CORRECTED = "corrected"
ALREADY_CORRECT = "already_correct"
UNKNOWN_INSTANCE = "unknown_instance"
UNKNOWN_PLAN = "unknown_plan"
INVALID_RECORD = "invalid_record"
DUPLICATE_EVENT = "duplicate_event"
REMOVED_INSTANCE = "removed"
UNREADABLE = "unreadable"
ERROR = "error"
WAITING = "waiting"
FAILED = "failed"

#: Audit triggers of targeted runs.
TARGETED_TRIGGERS = ("manual", "webhook", "provisioning")

#: Attempts (claims by a run) before a webhook row / a provisioning batch is given up.
MAX_ATTEMPTS = 8
#: Sync rounds inside one run for instances skipped by compare-and-set (changed meanwhile).
SYNC_ROUNDS = 3
#: One-by-one fallback: stop after this many consecutive failures (billing is down, not one record).
MAX_CONSECUTIVE_FAILURES = 3
#: Retry backoff: RETRY_BASE_SECONDS * 3**(attempts-1), capped.
RETRY_BASE_SECONDS = 5.0
RETRY_MAX_SECONDS = 3600.0

_PAYLOAD_ID_KEYS = ("instance_id", "instanceId")


def retry_delay(attempts: int) -> float:
    """Seconds to wait before the next attempt after ``attempts`` failed ones."""
    exponent = max(0, int(attempts) - 1)
    return min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 3 ** min(exponent, 20))


def event_instance_id(instance_id: Any, payload: Any) -> tuple[str | None, str | None]:
    """The instance a webhook row names: ``(instance_id, None)`` or ``(None, why unreadable)``.

    The ``instance_id`` column wins; the payload is read only when the column
    is empty (``instance_id`` or ``instanceId`` at the top level, under
    ``data`` or under ``data.object``). The payload is never used as data.
    """
    if isinstance(instance_id, str) and not instance_id.strip():
        instance_id = None
    if instance_id is not None:
        problem = instance_id_problem(instance_id)
        return (None, f"unusable instance_id: {problem}") if problem else (instance_id, None)
    if payload is None or not str(payload).strip():
        return None, "no instance_id and no payload"
    try:
        doc = json.loads(payload)
    except (TypeError, ValueError, RecursionError):
        return None, "no instance_id and the payload is not JSON"
    scopes: list[Any] = [doc]
    if isinstance(doc, dict) and isinstance(doc.get("data"), dict):
        scopes.append(doc["data"])
        if isinstance(doc["data"].get("object"), dict):
            scopes.append(doc["data"]["object"])
    for scope in scopes:
        if not isinstance(scope, dict):
            continue
        for key in _PAYLOAD_ID_KEYS:
            value = scope.get(key)
            if value is None:
                continue
            problem = instance_id_problem(value)
            return (None, f"unusable instance id in payload: {problem}") if problem else (value, None)
    return None, "no instance_id in the row or its payload"


def classify(report: sync.SyncReport, instance_ids: Iterable[str]) -> tuple[dict[str, str], list[str]]:
    """Per-instance outcome of one targeted report: (settled outcomes, ids to sync again).

    An instance with a writable mismatch that was not applied was changed by
    someone else between read and write (compare-and-set) or is newer than
    this run's billing data; a fresh fetch settles it.
    """
    unknown = set(report.unknown_instance_ids)
    unresolved = {str(i): str(s) for i, s in zip(report.unresolved["instance_id"], report.unresolved["status"])}
    applied = {str(i) for i in report.applied["instance_id"]}
    kinds: dict[str, set[str]] = {}
    for iid, kind in zip(report.mismatches["instance_id"], report.mismatches["kind"]):
        kinds.setdefault(str(iid), set()).add(str(kind))
    settled: dict[str, str] = {}
    again: list[str] = []
    for iid in instance_ids:
        found = kinds.get(iid, set())
        if unresolved.get(iid) == REMOVED:
            settled[iid] = REMOVED_INSTANCE  # the provider no longer knows it (app removed): left alone
        elif iid in unresolved:
            continue  # billing could not answer for it: not settled (the caller reports why)
        if iid in unknown:
            settled[iid] = UNKNOWN_INSTANCE
        elif iid in applied:
            settled[iid] = CORRECTED
        elif "invalid_record" in found:
            settled[iid] = INVALID_RECORD
        elif "unknown_plan" in found:
            settled[iid] = UNKNOWN_PLAN
        elif found & set(rules.WRITABLE_KINDS):
            again.append(iid)
        else:
            settled[iid] = ALREADY_CORRECT
    return settled, again


def _unresolved_errors(report: sync.SyncReport) -> tuple[dict[str, str], set[str]]:
    """(instance id -> why billing could not answer for it, the ids where billing was down)."""
    errors = {
        str(r.instance_id): f"billing could not answer for it ({r.status}): {r.reason}"
        for r in report.unresolved.itertuples(index=False)
        if r.status != REMOVED
    }
    down = {str(r.instance_id) for r in report.unresolved.itertuples(index=False) if r.status == UNAVAILABLE}
    return errors, down


def is_outage(exc: BaseException) -> bool:
    """A failure of billing or the app database as a whole (not of one instance's data)."""
    return is_systemic(exc) or isinstance(exc, appdb.AppDatabaseError)


@dataclass
class InstanceResults:
    """What the targeted syncs of one batch settled, and what they could not."""

    outcomes: dict[str, str] = field(default_factory=dict)
    #: instance_id -> one-line reason it is not settled (retry later)
    errors: dict[str, str] = field(default_factory=dict)
    #: the errored instances whose failure was billing's or the database's as a whole (an
    #: outage must not use up a webhook row's retry budget)
    outage: set[str] = field(default_factory=set)
    reports: list[sync.SyncReport] = field(default_factory=list)

    @property
    def applied(self) -> int:
        return sum(r.applied_count for r in self.reports)

    def settle(self, report: sync.SyncReport, ids: Sequence[str]) -> list[str]:
        """Take one report's outcomes in; return the ids to sync again."""
        self.reports.append(report)
        settled, again = classify(report, ids)
        self.outcomes.update(settled)
        errors, down = _unresolved_errors(report)
        self.errors.update(errors)
        self.outage |= down
        return again

    def fail(self, ids: Iterable[str], why: str, *, outage: bool) -> None:
        ids = list(ids)
        self.errors.update({i: why for i in ids})
        if outage:
            self.outage.update(ids)


def sync_instances(
    engine: Engine,
    billing: BillingProvider,
    instance_ids: Sequence[str],
    *,
    trigger: str,
    run_id: str,
    log: sync.Log,
    rounds: int = SYNC_ROUNDS,
) -> InstanceResults:
    """Targeted-sync ``instance_ids``; never raises for a sync failure.

    One :func:`sync.run_targeted_sync` call for the batch (billing answers or fails for
    each instance on its own); instances skipped by compare-and-set get up to
    ``rounds - 1`` fresh calls. An outage (billing unreachable or refusing the
    credentials, the database down) fails the rest of the batch at once, marked as an
    outage. Any other failure of the batch call (a bug, a rules error) is retried one
    instance at a time so the others still settle; after :data:`MAX_CONSECUTIVE_FAILURES`
    failures in a row the rest are not attempted.
    """
    results = InstanceResults()
    pending = list(dict.fromkeys(instance_ids))
    for round_no in range(1, max(1, rounds) + 1):
        if not pending:
            break
        if round_no > 1:
            log.info("[CreditSync] Re-checking %d instance(s) changed during the sync", len(pending))
        try:
            report = sync.run_targeted_sync(engine, billing, pending, trigger=trigger, run_id=run_id, log=log)
        except Exception as exc:  # noqa: BLE001 - every failure is reported per instance
            if len(pending) == 1 or is_outage(exc):
                results.fail(pending, sync.one_line(exc), outage=is_outage(exc))
                return results
            log.warning(
                "[CreditSync] The batch of %d instance(s) failed (%s); syncing them one by one",
                len(pending), sync.one_line(exc),
            )
            pending = _one_by_one(engine, billing, pending, results, trigger=trigger, run_id=run_id, log=log)
            continue
        pending = results.settle(report, pending)
    for iid in pending:
        results.errors[iid] = "changed by another writer during every attempt (compare-and-set); retried later"
    return results


def _one_by_one(
    engine: Engine,
    billing: BillingProvider,
    ids: list[str],
    results: InstanceResults,
    *,
    trigger: str,
    run_id: str,
    log: sync.Log,
) -> list[str]:
    """Sync each id alone; record outcomes and errors; return the ids to sync again."""
    again: list[str] = []
    consecutive = 0
    for position, iid in enumerate(ids):
        try:
            report = sync.run_targeted_sync(engine, billing, [iid], trigger=trigger, run_id=run_id, log=log)
        except Exception as exc:  # noqa: BLE001
            results.fail([iid], sync.one_line(exc), outage=is_outage(exc))
            consecutive += 1
            if consecutive >= MAX_CONSECUTIVE_FAILURES or is_outage(exc):
                rest = ids[position + 1 :]
                why = f"not attempted after {consecutive} consecutive failure(s): {sync.one_line(exc)}"
                results.fail(rest, why, outage=is_outage(exc))
                return again
            continue
        consecutive = 0
        again.extend(results.settle(report, [iid]))
    return again


@dataclass
class BatchResult:
    """One targeted run: instance results and the webhook rows it settled."""

    instances: InstanceResults
    #: webhook row id -> outcome written
    rows: dict[int, str] = field(default_factory=dict)
    #: webhook rows named by the run that another run had processed, or another process holds
    already_processed: list[int] = field(default_factory=list)
    #: config instance ids that are not usable ids (never sent to billing)
    invalid_ids: dict[str, str] = field(default_factory=dict)

    @property
    def failed(self) -> bool:
        return bool(self.instances.errors or self.invalid_ids)

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for outcome in self.rows.values():
            out[outcome] = out.get(outcome, 0) + 1
        return out

    def failure_summary(self, limit: int = 5) -> str:
        problems = [f"{i}: {why}" for i, why in self.invalid_ids.items()]
        problems += [f"{log_safe(i, 80)}: {why}" for i, why in self.instances.errors.items()]
        shown = "; ".join(problems[:limit])
        more = f"; and {len(problems) - limit} more" if len(problems) > limit else ""
        return f"{len(problems)} instance(s) not synced: {shown}{more}"


def run_batch(
    engine: Engine,
    billing: BillingProvider,
    *,
    instance_ids: Sequence[str] = (),
    webhook_event_ids: Sequence[int] = (),
    trigger: str,
    run_id: str,
    log: sync.Log,
    max_attempts: int | None = None,
    lease_owner: str | None = None,
) -> BatchResult:
    """Sync the named instances and settle the named webhook rows.

    Webhook rows are *claimed* first: leased to ``lease_owner`` (default: this run) and
    ``attempts + 1`` on each row still unprocessed; a row another run already processed,
    or that another process holds (a receiver syncing it right now), is skipped, and so is
    its instance unless something else names it. Each claimed row gets its instance's
    outcome; ``processed_at`` is set only once that instance's sync has committed (or found
    it already correct). A row whose sync failed because billing or the database was down
    as a whole gets its attempt back (outcome ``waiting``): an outage never uses up a
    row's retry budget.
    """
    max_attempts = MAX_ATTEMPTS if max_attempts is None else max_attempts
    owner = lease_owner or f"run:{run_id}"
    claimed: list[appdb.WebhookEvent] = []
    unclaimed_names: set[str] = set()
    result = BatchResult(instances=InstanceResults())
    if webhook_event_ids:
        claimed = appdb.claim_webhook_events(
            engine, webhook_event_ids, owner=owner, lease_seconds=appdb.DEFAULT_LEASE_SECONDS
        )
        taken = {row.id for row in claimed}
        result.already_processed = sorted({int(i) for i in webhook_event_ids} - taken)
        if result.already_processed:
            log.info("[CreditSync] %d webhook row(s) already processed or held by another process; skipped",
                     len(result.already_processed))
            for row in appdb.webhook_events_by_id(engine, result.already_processed):
                name, _ = event_instance_id(row.instance_id, row.payload)
                if name is not None:
                    unclaimed_names.add(name)

    junk: dict[int, str] = {}
    row_instance: dict[int, str] = {}
    for row in claimed:
        if row.duplicate:
            junk[row.id] = DUPLICATE_EVENT
            continue
        name, problem = event_instance_id(row.instance_id, row.payload)
        if name is None:
            junk[row.id] = UNREADABLE
            log.warning("[CreditSync] Webhook row %d (%s) is unreadable: %s", row.id, log_safe(row.event_id), problem)
        else:
            row_instance[row.id] = name
    if junk:
        appdb.mark_webhook_events(engine, junk)
        result.rows.update(junk)

    named_by_rows = set(row_instance.values())
    targets: list[str] = []
    for iid in list(instance_ids) + list(row_instance.values()):
        if iid in unclaimed_names and iid not in named_by_rows:
            continue
        problem = instance_id_problem(iid)
        if problem is not None:
            result.invalid_ids[repr(iid)[:80]] = problem
            continue
        targets.append(iid)
    targets = list(dict.fromkeys(targets))

    if targets:
        result.instances = sync_instances(engine, billing, targets, trigger=trigger, run_id=run_id, log=log)

    done: dict[int, str] = {}
    retry: dict[int, str] = {}
    waiting: dict[int, str] = {}
    for row in claimed:
        iid = row_instance.get(row.id)
        if iid is None:
            continue
        outcome = result.instances.outcomes.get(iid)
        if outcome is not None:
            done[row.id] = outcome
        elif iid in result.instances.outage:
            waiting[row.id] = WAITING
        else:
            retry[row.id] = FAILED if row.attempts >= max_attempts else ERROR
    if done:
        appdb.mark_webhook_events(engine, done)
    if waiting:
        appdb.mark_webhook_events(engine, waiting, processed=False, refund_attempt=True)
        log.warning(
            "[CreditSync] Billing or the app database is down: %d webhook row(s) wait for it to recover "
            "(their retry budget is not used)", len(waiting),
        )
    if retry:
        appdb.mark_webhook_events(engine, retry, processed=False)
        gave_up = sorted(i for i, o in retry.items() if o == FAILED)
        if gave_up:
            log.error(
                "[CreditSync] Gave up on %d webhook row(s) after %d attempts (ids %s); "
                "the periodic full sync still covers their instances",
                len(gave_up), max_attempts, ", ".join(map(str, gave_up[:20])),
            )
    result.rows.update(done)
    result.rows.update(waiting)
    result.rows.update(retry)
    return result
