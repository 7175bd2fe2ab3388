"""The Stripe provider: the full list, per-instance look-ups, the access check.

See :mod:`creditsync_pipeline.billing.stripe` for the semantics; the HTTP side of Stripe's
lists is :mod:`.lists`, the mapping of a subscription :mod:`.subscriptions`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from contextlib import closing
from datetime import datetime
from typing import Any

import httpx
import pandas as pd

from ...settings import DEFAULT_STRIPE_API_BASE, DEFAULT_STRIPE_METADATA_KEY, Settings
from ..base import (
    UNLINKED,
    HttpProvider,
    BillingSnapshot,
    Budget,
    CustomerLinks,
    Lookup,
    check_requested_ids,
    look_up_each,
    snapshot_from_lookups,
)
from ..http import HttpApi, utcnow
from ..records import concat_frames, empty_invalid, empty_records, instance_id_problem, short_repr, validate_fields
from .lists import (
    CUSTOMER_SEARCH_PATH,
    LIST_PATH,
    MAX_PAGE_SIZE,
    SUBSCRIPTION_SEARCH_PATH,
    NoSuchCustomer,
    StripeLists,
    search_query,
)
from .subscriptions import API_VERSION, PageFields, SubscriptionMapper, entitles_at, instance_of

__all__ = ["StripeProvider"]

logger = logging.getLogger("creditsync.billing")

_VALIDATE_BATCH = 20_000

class StripeProvider(HttpProvider):
    """Stripe's subscriptions as SPEC records (``BILLING_PROVIDER=stripe``)."""

    name = "stripe"
    lists_all = True

    def __init__(
        self,
        api_key: str,
        *,
        base_url: str = DEFAULT_STRIPE_API_BASE,
        metadata_key: str = DEFAULT_STRIPE_METADATA_KEY,
        plan_map: Mapping[str, str] | None = None,
        links: CustomerLinks | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        page_size: int = MAX_PAGE_SIZE,
        concurrency: int = 4,
        api_version: str = API_VERSION,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not isinstance(api_key, str) or not api_key.strip():
            raise ValueError("STRIPE_API_KEY is empty")
        api_key = api_key.strip()
        if not (api_key.isascii() and api_key.isprintable()):
            raise ValueError("STRIPE_API_KEY contains characters not allowed in an HTTP header")
        if not 1 <= page_size <= MAX_PAGE_SIZE:
            raise ValueError(f"page_size must be between 1 and {MAX_PAGE_SIZE}")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if not metadata_key or len(metadata_key) > 40:
            raise ValueError("the instance metadata key must be 1 to 40 characters")
        self._api = HttpApi(
            base_url,
            label="Stripe API",
            url_setting="STRIPE_API_BASE",
            credentials="the API key",
            headers={"Authorization": f"Bearer {api_key}", "Stripe-Version": api_version},
            secrets=[api_key],
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            max_connections=concurrency + 1,
            transport=transport,
        )
        self._key = metadata_key
        self._plan_map = dict(plan_map or {})
        self._links = links
        self._lists = StripeLists(self._api, page_size)
        self._concurrency = concurrency

    @classmethod
    def from_settings(cls, cfg: Settings, *, budget: Budget, links: CustomerLinks | None = None) -> StripeProvider:
        return cls(
            cfg.stripe.require_api_key(),
            base_url=cfg.stripe.api_base,
            metadata_key=cfg.stripe.instance_metadata_key,
            plan_map=cfg.plan_map,
            links=links,
            **budget.http_options(),
        )

    def __repr__(self) -> str:
        return f"StripeProvider(base_url={self.base_url!r}, metadata_key={self._key!r})"

    # -- the contract ---------------------------------------------------------------------

    def check_access(self, instance_ids: Sequence[str] = ()) -> str:
        """A one-record list call: Stripe reachable, the API key accepted, a list of the right shape."""
        what = f"GET {LIST_PATH} (access check)"
        for _ in self._lists.walk(LIST_PATH, {"status": "all", "limit": 1}, what, pages=1):
            pass
        return f"Stripe API at {self.base_url} answered a subscription list with the API key accepted"

    def fetch_all(self, instance_ids: Sequence[str] | None = None, *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Every subscription (``status=all``, customers expanded), one record each.

        A subscription listed twice (a server that restarts the list on a cursor it does not
        know) or a page of the wrong shape fails the run. Subscriptions without an instance
        are counted (``unassigned``). The instance -> customer links seen are remembered
        once, after the list completed.
        """
        started_at = utcnow()
        mapper = SubscriptionMapper(self._key, self._plan_map, plan_ids)
        params = {"status": "all", "limit": self._lists.page_size, "expand[]": "data.customer"}
        what = f"GET {LIST_PATH}"
        seen: set[str] = set()
        frames: list[pd.DataFrame] = []
        invalid_frames: list[pd.DataFrame] = []
        links: dict[str, tuple[int, str]] = {}
        unassigned = 0
        pages = 0
        batch = PageFields.empty()
        observed: list[tuple[datetime, int]] = []

        def flush() -> None:
            nonlocal batch, unassigned
            valid, invalid = validate_fields(*batch.columns(), observed)
            frames.append(valid)
            invalid_frames.append(invalid)
            for instance_id, link in batch.links.items():
                known = links.get(instance_id)
                if known is None or link[0] >= known[0]:
                    links[instance_id] = link
            unassigned += batch.unassigned
            batch = PageFields.empty()
            observed.clear()

        walk = self._lists.pipelined(LIST_PATH, params, what)
        with closing(walk):
            for data, sent_at, page_what in walk:
                pages += 1
                before = len(batch.ids)
                for subscription in data:
                    self._add_listed(subscription, page_what, seen, mapper, batch)
                if len(batch.ids) > before:
                    observed.append((sent_at, len(batch.ids) - before))
                if len(batch.ids) >= _VALIDATE_BATCH:
                    flush()
        flush()
        snapshot = BillingSnapshot(
            records=concat_frames(frames, empty_records),
            invalid=concat_frames(invalid_frames, empty_invalid),
            started_at=started_at,
            finished_at=utcnow(),
            pages=pages,
            requested_ids=None,
            unassigned=unassigned,
            provider=self.name,
        )
        logger.info(
            "Stripe API: fetched %d subscription record(s) (%d invalid, %d without an instance) in %d page(s)",
            len(snapshot.records), len(snapshot.invalid), unassigned, pages,
        )
        self._remember({i: c for i, (_, c) in links.items()})
        return snapshot

    def fetch_instances(self, instance_ids: Iterable[str], *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Each instance's subscriptions, listed by its customer.

        The customer is the remembered link, else found with Stripe's search. An instance
        none of whose subscriptions can be found is ``UNLINKED`` (left alone, reported):
        only a full list may send a paid instance to free for lack of a subscription.
        """
        ids = check_requested_ids(instance_ids)
        started_at = utcnow()
        known = self._known_links(ids)
        mapper = SubscriptionMapper(self._key, self._plan_map, plan_ids)
        found: dict[str, str] = {}
        lock = threading.Lock()

        def look_up(instance_id: str) -> Lookup:
            lookup, customer = self._look_up(instance_id, known.get(instance_id), mapper)
            if customer is not None and customer != known.get(instance_id):
                with lock:
                    found[instance_id] = customer
            return lookup

        answers, failures = look_up_each(ids, look_up, concurrency=self._concurrency, label=self._api.label)
        self._remember(found)
        return snapshot_from_lookups(
            ids, answers, failures, started_at=started_at, finished_at=utcnow(),
            provider=self.name, full=False, malformed=self._api.malformed,
        )

    # -- the full list --------------------------------------------------------------------

    def _add_listed(
        self, subscription: dict[str, Any], what: str, seen: set[str], mapper: SubscriptionMapper, out: PageFields
    ) -> None:
        sub_id = subscription["id"]
        if sub_id in seen:
            raise self._api.malformed(
                what,
                f"subscription {short_repr(sub_id)} was listed before: the list restarted "
                "(a server that ignores an unknown starting_after?); refusing to loop",
            )
        seen.add(sub_id)
        instance_id = instance_of(subscription, self._key)
        if instance_id is None and isinstance(subscription.get("customer"), str):
            raise self._api.malformed(
                what, f"subscription {short_repr(sub_id)}: its customer is not expanded (expand[]=data.customer ignored?)"
            )
        if instance_id is not None:
            problem = instance_id_problem(instance_id)
            if problem is not None:
                raise self._api.malformed(
                    what, f"subscription {short_repr(sub_id)}: metadata[{self._key!r}] is not a usable instance id: {problem}"
                )
        mapper.add(subscription, out, instance_id)

    # -- per instance ---------------------------------------------------------------------

    def _look_up(self, instance_id: str, customer: str | None, mapper: SubscriptionMapper) -> tuple[Lookup, str | None]:
        """(the instance's look-up, the customer of its newest subscription)."""
        now = int(time.time())
        sent: list[datetime] = []
        mine: dict[str, dict[str, Any]] = {}
        listed: set[str] = set()
        notes: list[str] = []

        def list_customer(customer_id: str) -> None:
            listed.add(customer_id)
            try:
                self._list_customer(customer_id, instance_id, mine, sent)
            except NoSuchCustomer:
                notes.append(f"remembered customer {short_repr(customer_id)} is unknown to Stripe")

        if customer is not None:
            list_customer(customer)
        if not self._entitled(mine, mapper, instance_id, now):
            # No link, a stale one, or nothing entitling under it: the instance may have a
            # newer customer. Search is eventually consistent: finding none proves nothing.
            for candidate in self._search_customers(instance_id, sent):
                if candidate not in listed:
                    list_customer(candidate)
        sent_at = min(sent) if sent else utcnow()
        if not mine:
            where = notes[0] if notes else (
                "no remembered customer" if customer is None else f"customer {short_repr(customer)} has none"
            )
            reason = (
                f"no Stripe subscription found for this instance ({where}; search found none, and search "
                "lags or may be unavailable): left alone until a full sync"
            )
            return Lookup(sent_at=sent_at, status=UNLINKED, reason=reason), None
        fields = PageFields.empty()
        for subscription in sorted(mine.values(), key=_created_order):
            mapper.add(subscription, fields, instance_id)
        link = fields.links.get(instance_id)
        return Lookup(sent_at=sent_at, records=tuple(fields.records())), (link[1] if link else None)

    def _entitled(self, subscriptions: dict[str, dict[str, Any]], mapper: SubscriptionMapper, instance_id: str, now: int) -> bool:
        fields = PageFields.empty()
        for subscription in subscriptions.values():
            mapper.add(subscription, fields, instance_id)
        return any(
            entitles_at(status, end, now) for status, end in zip(fields.statuses, fields.periods)
        )

    def _list_customer(self, customer_id: str, instance_id: str, mine: dict[str, dict[str, Any]], sent: list[datetime]) -> None:
        """Add the customer's subscriptions that belong to ``instance_id`` to ``mine``."""
        params = {"customer": customer_id, "status": "all", "limit": self._lists.page_size, "expand[]": "data.customer"}
        what = f"GET {LIST_PATH}?customer=... (instance {short_repr(instance_id)})"
        seen: set[str] = set()
        for data, sent_at, page_what in self._lists.walk(LIST_PATH, params, what, missing_ok=True):
            sent.append(sent_at)
            for subscription in data:
                if subscription["id"] in seen:
                    raise self._api.malformed(page_what, "a subscription was listed twice: the list restarted; refusing to loop")
                seen.add(subscription["id"])
                if instance_of(subscription, self._key) == instance_id:
                    mine[subscription["id"]] = subscription

    def _search_customers(self, instance_id: str, sent: list[datetime]) -> list[str]:
        """Customers Stripe's search associates with the instance (theirs or their subscriptions'
        metadata, compared exactly: search matches case-insensitively). A server without
        search (404) finds none."""
        query = search_query(self._key, instance_id)
        found: dict[str, None] = {}
        for path, kind in ((CUSTOMER_SEARCH_PATH, "customer"), (SUBSCRIPTION_SEARCH_PATH, "subscription")):
            what = f"GET {path} (instance {short_repr(instance_id)})"
            for obj in self._lists.search(path, query, what, sent):
                if kind == "customer":
                    if not obj.get("deleted") and _metadata(obj, self._key) == instance_id:
                        found[obj["id"]] = None
                elif _metadata(obj, self._key) == instance_id:
                    customer = obj.get("customer")
                    customer = customer.get("id") if isinstance(customer, dict) else customer
                    if isinstance(customer, str) and customer:
                        found[customer] = None
        return list(found)

    # -- remembered links -----------------------------------------------------------------

    def _known_links(self, ids: Sequence[str]) -> dict[str, str]:
        if self._links is None or not ids:
            return {}
        try:
            return dict(self._links.customers_of(ids))
        except Exception as exc:  # noqa: BLE001 - a cache: without it, search is asked instead
            logger.warning(
                "Stripe: remembered customer links could not be read (%s); searching instead", self._api.mask(_one_line(exc))
            )
            return {}

    def _remember(self, links: Mapping[str, str]) -> None:
        if self._links is None or not links:
            return
        try:
            self._links.remember(dict(links))
        except Exception as exc:  # noqa: BLE001 - the links are a cache: the run's answer stands
            logger.warning(
                "Stripe: %d customer link(s) could not be remembered (%s)", len(links), self._api.mask(_one_line(exc))
            )


def _created_order(subscription: Mapping[str, Any]) -> tuple[int, str]:
    created = subscription.get("created")
    return (created if type(created) is int else -1, str(subscription.get("id")))


def _metadata(obj: Mapping[str, Any], key: str) -> Any:
    metadata = obj.get("metadata")
    return metadata.get(key) if isinstance(metadata, dict) else None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
