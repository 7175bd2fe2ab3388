"""The provider contract: what every billing source yields, whatever its wire format.

A provider (:class:`BillingProvider`) answers two questions with a :class:`BillingSnapshot`:

* :meth:`~BillingProvider.fetch_all` -- *every instance*: the complete list of records.
  A provider that can list its subscriptions (generic, Stripe) walks its own list
  (``lists_all = True``); one that cannot (Wix has no list of all instances) is handed the
  app's instance ids and looks each one up (``lists_all = False``). Either way an instance
  with no record in a full snapshot has no subscription (free plan), *unless* it is in
  :attr:`BillingSnapshot.unresolved`.
* :meth:`~BillingProvider.fetch_instances` -- *these instances*: one look-up each.

Every record carries ``observed_at``, when the request that returned it was sent (the rules
never let billing data overwrite app state newer than that).

``unresolved`` lists the instances billing could not answer for -- a look-up that failed
after retries, an instance the provider no longer knows (Wix: app removed), a customer it
cannot find (Stripe) -- with a status and a reason. They are left alone (never written,
never sent to the free plan) and reported. A failure of billing as a whole (credentials
refused, more than the allowed share of look-ups failing) raises instead, and the run
writes nothing.

:func:`look_up_each` is the one implementation of "look up many instances, a few at a
time" that every provider's per-instance path uses.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import pandas as pd

if TYPE_CHECKING:
    from ..settings import Settings
    from .http import HttpApi

from .errors import BillingAuthError, BillingError, BillingUnavailableError
from .records import (
    BadRecord,
    concat_frames,
    empty_invalid,
    empty_records,
    instance_id_problem,
    record_ids,
    short_repr,
    validate_records,
)

__all__ = [
    "FAILED_STATUSES",
    "HttpProvider",
    "LOOKUP_ERROR",
    "REMOVED",
    "UNAVAILABLE",
    "UNLINKED",
    "UNRESOLVED_COLUMNS",
    "BillingProvider",
    "BillingSnapshot",
    "Budget",
    "CustomerLinks",
    "Lookup",
    "check_requested_ids",
    "empty_unresolved",
    "look_up_each",
    "map_plans",
    "snapshot_from_lookups",
]

UNRESOLVED_COLUMNS = ["instance_id", "status", "reason"]
#: the look-up failed after retries because billing did not answer (5xx, timeouts, drops, 429s)
UNAVAILABLE = "unavailable"
#: the look-up of this instance got an answer that cannot be used (malformed, an unexpected 404)
LOOKUP_ERROR = "error"
#: the provider no longer knows the instance (Wix: the app was removed from that site)
REMOVED = "removed"
#: the provider cannot tell which of its customers this instance is (Stripe: no remembered link)
UNLINKED = "unlinked"
#: statuses that count as failed look-ups (the others are answers: "gone", "not linked")
FAILED_STATUSES = (UNAVAILABLE, LOOKUP_ERROR)


def empty_unresolved() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype=object) for c in UNRESOLVED_COLUMNS})


@dataclass(frozen=True, eq=False)
class BillingSnapshot:
    """What billing said, when it said it, and what it could not say."""

    records: pd.DataFrame
    invalid: pd.DataFrame
    started_at: datetime
    finished_at: datetime
    pages: int
    #: the ids of a targeted fetch; None for a full one
    requested_ids: tuple[str, ...] | None
    #: instances billing could not answer for (``UNRESOLVED_COLUMNS``): left alone, reported
    unresolved: pd.DataFrame = field(default_factory=empty_unresolved)
    #: records that belong to no instance (e.g. Stripe subscriptions without an instance id)
    unassigned: int = 0
    #: per-instance look-ups made (a provider without a list looks every instance up)
    lookups: int = 0
    provider: str = "generic"
    #: a full snapshot made of per-instance look-ups (no list): the ids looked up. Rows not
    #: among them (created after the look-ups began) are left alone, not sent to free.
    looked_up: frozenset[str] | None = None

    def __repr__(self) -> str:
        scope = "full" if self.requested_ids is None else f"{len(self.requested_ids)} requested"
        return (
            f"BillingSnapshot({self.provider}, {scope}, records={len(self.records)}, invalid={len(self.invalid)}, "
            f"unresolved={len(self.unresolved)}, pages={self.pages}, started_at={self.started_at.isoformat()})"
        )

    @property
    def failed_lookups(self) -> int:
        """Look-ups that failed (unavailable or unusable answers); removed/unlinked are answers."""
        return int(self.unresolved["status"].isin(FAILED_STATUSES).sum())

    def unresolved_counts(self) -> dict[str, int]:
        return {str(k): int(v) for k, v in self.unresolved["status"].value_counts().items()}


class BillingProvider(ABC):
    """One billing source. Subclasses: ``generic`` (the SPEC Billing API), ``wix``, ``stripe``."""

    #: the ``BILLING_PROVIDER`` value that selects this provider
    name: ClassVar[str]
    #: True: :meth:`fetch_all` lists every subscription itself; False: it needs the app's instance ids
    lists_all: ClassVar[bool] = True

    @classmethod
    @abstractmethod
    def from_settings(
        cls, cfg: Settings, *, budget: Budget, links: CustomerLinks | None = None
    ) -> BillingProvider:
        """The provider as the environment configures it (see :mod:`.providers`)."""

    @abstractmethod
    def fetch_all(
        self, instance_ids: Sequence[str] | None = None, *, plan_ids: Collection[str] = ()
    ) -> BillingSnapshot:
        """Every record. ``instance_ids`` (every id in ``instances``) is required when
        ``lists_all`` is False and ignored otherwise; ``plan_ids`` are the app's plans (a
        provider whose subscription holds several priced items picks the one the app sells)."""

    @abstractmethod
    def fetch_instances(self, instance_ids: Iterable[str], *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """The records of the named instances, one look-up each.

        Raises ValueError for an id that is not a usable instance id (never sent).
        """

    @abstractmethod
    def check_access(self, instance_ids: Sequence[str] = ()) -> str:
        """Prove the provider is reachable and accepts creditsync's credentials (``creditsync doctor``).

        ``instance_ids``: a few of the app's instances, for a provider that can only prove
        access on an instance (Wix tokens are per instance). Returns one line saying what
        was checked; raises :class:`BillingError`.
        """

    @property
    @abstractmethod
    def base_url(self) -> str:
        """The API base URL (without userinfo), for messages."""

    @abstractmethod
    def close(self) -> None:
        """Release connections (idempotent)."""

    def __enter__(self) -> BillingProvider:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class HttpProvider(BillingProvider):
    """A provider over one :class:`~.http.HttpApi` (all of them here): the plumbing they share."""

    _api: HttpApi

    @property
    def base_url(self) -> str:
        """The API base URL (without any userinfo)."""
        return self._api.base_url

    @property
    def api(self) -> HttpApi:
        """The HTTP layer (tests swap its ``sleep`` to record the pauses between attempts)."""
        return self._api

    def close(self) -> None:
        self._api.close()


# -- helpers every provider shares -------------------------------------------------------------


def map_plans(values: list[Any], plan_map: Mapping[str, str]) -> list[Any]:
    """Provider plan identifiers -> ``plans.plan_id`` (``CREDITSYNC_PLAN_MAP``); others unchanged."""
    if not plan_map:
        return values
    get = plan_map.get
    return [get(v, v) if type(v) is str else v for v in values]


def check_requested_ids(instance_ids: Iterable[str]) -> tuple[str, ...]:
    """The distinct requested ids, in order; ValueError for one that is not usable (never sent)."""
    if isinstance(instance_ids, str):
        raise TypeError("instance_ids must be an iterable of ids, not a single string")
    ids = tuple(dict.fromkeys(instance_ids))
    for value in ids:
        problem = instance_id_problem(value)
        if problem is not None:
            raise ValueError(f"cannot fetch instance {short_repr(value)}: {problem}")
    return ids


@dataclass(frozen=True)
class Lookup:
    """What one per-instance look-up found.

    ``status`` None: billing answered; ``records`` are its records for the instance (SPEC
    shape, not yet validated; none = no subscription). ``REMOVED`` / ``UNLINKED``: billing
    cannot answer for the instance (left alone, reported with ``reason``).
    """

    sent_at: datetime
    records: tuple[Any, ...] = ()
    status: str | None = None
    reason: str = ""


def look_up_each(
    ids: Sequence[str],
    look_up: Callable[[str], Lookup],
    *,
    concurrency: int,
    label: str = "billing API",
    max_failed_ratio: float | None = None,
    breaker: int = 8,
) -> tuple[dict[str, Lookup], dict[str, tuple[str, str]]]:
    """Look every id up, ``concurrency`` at a time; return (answers, failures).

    ``failures`` maps an id to ``(UNAVAILABLE | LOOKUP_ERROR, one-line reason)``: the
    look-up raised a :class:`BillingError` after its retries. Raised instead, and the rest
    not attempted:

    * :class:`BillingAuthError` -- the credentials are refused (billing as a whole);
    * :class:`BillingUnavailableError` -- ``breaker`` look-ups in a row failed as
      unavailable with no success between them (billing is down, not these instances), or,
      with ``max_failed_ratio`` (full runs), more than that share of all ids failed;
    * any other exception (a bug) as it is.

    Workers pull ids from one shared iterator, so memory stays flat at any N.
    """
    answers: dict[str, Lookup] = {}
    failures: dict[str, tuple[str, str]] = {}
    if not ids:
        return answers, failures
    budget = None if max_failed_ratio is None else max_failed_ratio * len(ids)
    lock = threading.Lock()
    stop = threading.Event()
    source = iter(ids)
    fatal: list[BaseException] = []
    streak = [0]

    def give_up(exc: BaseException) -> None:
        if not fatal:
            fatal.append(exc)
        stop.set()

    def work() -> None:
        while not stop.is_set():
            with lock:
                instance_id = next(source, None)
            if instance_id is None:
                return
            try:
                found = look_up(instance_id)
            except BillingAuthError as exc:
                with lock:
                    give_up(exc)
                return
            except BillingError as exc:
                status = UNAVAILABLE if isinstance(exc, BillingUnavailableError) else LOOKUP_ERROR
                with lock:
                    failures[instance_id] = (status, str(exc))
                    streak[0] = streak[0] + 1 if status == UNAVAILABLE else 0
                    if streak[0] >= breaker:
                        give_up(BillingUnavailableError(
                            f"{label} unavailable: {streak[0]} look-ups in a row failed; last: {exc}"
                        ))
                    elif budget is not None and len(failures) > budget:
                        give_up(BillingUnavailableError(
                            f"{label}: more than {max_failed_ratio:.0%} of {len(ids)} look-ups failed "
                            f"({len(failures)} so far; last: {exc}); billing looks down, not the customers"
                        ))
                continue
            except BaseException as exc:  # noqa: BLE001 - a bug: stop everything, re-raise in the caller
                with lock:
                    give_up(exc)
                return
            with lock:
                answers[instance_id] = found
                streak[0] = 0

    workers = [
        threading.Thread(target=work, name=f"billing-lookup-{n}", daemon=True)
        for n in range(max(1, min(concurrency, len(ids))))
    ]
    if len(workers) == 1:
        work()
    else:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    if fatal:
        raise fatal[0]
    if failures and not answers and all(status == UNAVAILABLE for status, _ in failures.values()):
        # Not one answer: billing is down (a single look-up of the button included).
        raise BillingUnavailableError(next(iter(failures.values()))[1])
    return answers, failures


def snapshot_from_lookups(
    ids: tuple[str, ...],
    answers: Mapping[str, Lookup],
    failures: Mapping[str, tuple[str, str]],
    *,
    started_at: datetime,
    finished_at: datetime,
    provider: str,
    full: bool,
    malformed: Callable[[str, str], BillingError],
) -> BillingSnapshot:
    """Validate the look-ups' records and assemble the snapshot (ids in request order).

    A record whose ``instance_id`` is not usable makes that instance's look-up an error
    (``LOOKUP_ERROR``, left alone); a record naming another instance is an
    ``invalid_record`` of the requested one.
    """
    bodies: list[Any] = []
    body_ids: list[str] = []
    observed: list[tuple[datetime, int]] = []
    other: list[tuple[str, str]] = []
    unresolved: list[tuple[str, str, str]] = []
    for instance_id in ids:
        if instance_id in failures:
            status, reason = failures[instance_id]
            unresolved.append((instance_id, status, reason))
            continue
        found = answers.get(instance_id)
        if found is None:  # not attempted (cannot happen without a raise); be safe
            unresolved.append((instance_id, LOOKUP_ERROR, "not looked up"))
            continue
        if found.status is not None:
            unresolved.append((instance_id, found.status, found.reason))
            continue
        try:
            found_ids = record_ids(list(found.records))
        except BadRecord as exc:
            unresolved.append((instance_id, LOOKUP_ERROR, str(malformed(f"instance {short_repr(instance_id)}", f"unusable record: {exc}"))))
            continue
        mine = [i for i, r in zip(found_ids, found.records) if i == instance_id]
        if len(mine) != len(found_ids):
            others = sorted({i for i in found_ids if i != instance_id})
            other.append((instance_id, f"billing returned a record for another instance ({short_repr(others[0])})"))
            continue
        bodies.extend(found.records)
        body_ids.extend(found_ids)
        if found.records:
            observed.append((found.sent_at, len(found.records)))
    records, invalid = validate_records(bodies, body_ids, observed)
    if other:
        extra = pd.DataFrame(
            {"instance_id": pd.Series([o[0] for o in other], dtype=object), "reason": pd.Series([o[1] for o in other], dtype=object)}
        )
        invalid = concat_frames([invalid, extra], empty_invalid)
    return BillingSnapshot(
        records=records if len(records) else empty_records(),
        invalid=invalid,
        started_at=started_at,
        finished_at=finished_at,
        pages=sum(1 for a in answers.values() if a.records),
        requested_ids=None if full else ids,
        unresolved=pd.DataFrame(
            {c: pd.Series([u[k] for u in unresolved], dtype=object) for k, c in enumerate(UNRESOLVED_COLUMNS)}
        ),
        lookups=len(answers) + len(failures),
        provider=provider,
        looked_up=frozenset(ids) if full else None,
    )



# -- what a provider is built with --------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How long a provider may try: per-request timeout, attempts, longest pauses."""

    timeout: float = 30.0
    max_attempts: int = 5
    backoff_max: float = 30.0
    max_retry_after: float = 120.0

    def http_options(self) -> dict[str, float]:
        """The budget as :class:`~.http.HttpApi` keyword arguments."""
        return {"timeout": self.timeout, "max_attempts": self.max_attempts,
                "backoff_max": self.backoff_max, "max_retry_after": self.max_retry_after}

    def interactive(self) -> Budget:
        """A budget fit for a person waiting on a button: a slow billing API gives a quick 503.

        At most 3 attempts, 10 s per request, pauses of at most 2 s, a 429's ``Retry-After``
        honoured up to 5 s.
        """
        return Budget(
            timeout=min(self.timeout, 10.0),
            max_attempts=min(self.max_attempts, 3),
            backoff_max=2.0,
            max_retry_after=5.0,
        )


class CustomerLinks(Protocol):
    """The remembered instance <-> customer links of a provider whose customers carry the
    instance id (Stripe); kept by the app database (``appdb.customer links``), handed in by
    :func:`creditsync_pipeline.sync.open_billing`."""

    def customers_of(self, instance_ids: Collection[str]) -> dict[str, str]:
        """instance id -> customer id, for the ids with a remembered link."""

    def instances_of(self, customer_ids: Collection[str]) -> dict[str, list[str]]:
        """customer id -> the instance ids linked to it."""

    def remember(self, links: Mapping[str, str]) -> None:
        """Store instance id -> customer id links (upsert)."""
