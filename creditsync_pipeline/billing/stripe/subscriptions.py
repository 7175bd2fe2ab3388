"""Stripe subscription objects -> SPEC records (pure: no I/O, no clock).

The mapping the Stripe provider applies to every subscription it reads, in one place:

* **Instance**: ``metadata[KEY]`` of the subscription, else of its customer (expanded, not
  deleted). A subscription with neither belongs to no instance (:func:`instance_of` -> None).
* **Plan**: the identifier of each item is its price's ``lookup_key``, else the price id,
  else (an item with only the legacy ``plan`` object, as test servers send) that plan's
  id; mapped through ``CREDITSYNC_PLAN_MAP``. ``plan_id`` is the mapped identifier of the
  first item whose mapped identifier is one of the app's plans, else of the first item
  (that has an identifier at all; none: no plan, an ``invalid_record``).
* **Status and period end** (the SPEC record statuses, so the one set of rules decides):

  ==========================================  ===============  ==============================
  Stripe                                      record status    ``current_period_end``
  ==========================================  ===============  ==============================
  active / trialing / past_due                the same         the item's period end
  ... with ``cancel_at`` or                   ``canceled``     ``cancel_at``, else the period
  ``cancel_at_period_end`` (and a known end)                   end: entitled until then
  canceled                                    ``canceled``     ``ended_at`` (else
                                                               ``canceled_at``): it has ended
  unpaid, incomplete, incomplete_expired,     ``expired``      the period end (never entitles)
  paused
  anything else                               as Stripe says   (an ``invalid_record``)
  ==========================================  ===============  ==============================

  The period end is read from the chosen item (``items.data[].current_period_end``, API
  versions from 2025-03-31), else from the subscription (older versions, test servers).
* **updated_at** = the subscription's ``created``: the rules pick, among an instance's
  entitling records, the one with the latest ``updated_at`` -- so the most recently
  created entitling subscription wins (SPEC "Stripe").

Timestamps are Unix seconds in Stripe; records carry ISO-8601 text (UTC), converted for a
whole page at once (:func:`iso_seconds`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "API_VERSION",
    "ENTITLING",
    "NOT_ENTITLING",
    "PageFields",
    "SubscriptionMapper",
    "customer_id",
    "entitles_at",
    "instance_of",
    "item_identifier",
    "iso_seconds",
]

#: the API version creditsync reads (``Stripe-Version``); older shapes are read too
API_VERSION = "2025-03-31.basil"
#: Stripe statuses that entitle (while no cancellation is scheduled: then until its date)
ENTITLING = frozenset({"active", "trialing", "past_due"})
#: Stripe statuses that never entitle (``canceled`` is mapped on its own: it ends at ``ended_at``)
NOT_ENTITLING = frozenset({"unpaid", "incomplete", "incomplete_expired", "paused"})


def _metadata_value(obj: Any, key: str) -> Any:
    if not isinstance(obj, dict):
        return None
    metadata = obj.get("metadata")
    if not isinstance(metadata, dict):
        return None
    return metadata.get(key)


def instance_of(subscription: dict[str, Any], key: str) -> Any:
    """The instance a subscription belongs to: ``metadata[key]`` of it, else of its customer.

    None when neither carries one (or the customer is only an id, or deleted). The value
    is returned as Stripe has it (validated later, like every record's ``instance_id``).
    """
    value = _metadata_value(subscription, key)
    if value is not None and value != "":
        return value
    customer = subscription.get("customer")
    if isinstance(customer, dict) and not customer.get("deleted"):
        value = _metadata_value(customer, key)
        if value is not None and value != "":
            return value
    return None


def entitles_at(status: Any, period_end: Any, now: int) -> bool:
    """Whether a mapped record (status, period end in Unix seconds) entitles at ``now``:
    the SPEC rule, for a look-up deciding whether to search further (the rules decide)."""
    if status in ENTITLING:
        return True
    return status == "canceled" and type(period_end) is int and period_end > now


def customer_id(subscription: dict[str, Any]) -> str | None:
    """The id of a subscription's customer (expanded or not)."""
    customer = subscription.get("customer")
    if isinstance(customer, dict):
        customer = customer.get("id")
    return customer if isinstance(customer, str) and customer else None


def item_identifier(item: Any) -> str | None:
    """An item's plan identifier: price ``lookup_key``, else price id, else legacy plan id."""
    if not isinstance(item, dict):
        return None
    price = item.get("price")
    if isinstance(price, dict):
        lookup_key = price.get("lookup_key")
        if isinstance(lookup_key, str) and lookup_key:
            return lookup_key
        price_id = price.get("id")
        if isinstance(price_id, str) and price_id:
            return price_id
    plan = item.get("plan")
    if isinstance(plan, dict):
        plan_id = plan.get("id")
        if isinstance(plan_id, str) and plan_id:
            return plan_id
    return None


def iso_seconds(values: list[Any]) -> list[Any]:
    """Unix seconds -> ISO-8601 UTC text (``YYYY-MM-DDTHH:MM:SSZ``), a page at a time.

    None stays None; anything that is not an integer is passed through unchanged, so
    record validation names it (``not ISO-8601``).
    """
    if not values:
        return []
    ints = [type(v) is int for v in values]
    if all(ints):
        stamps = np.array(values, dtype="int64").astype("datetime64[s]").astype(str)
        return [s + "Z" for s in stamps.tolist()]
    out: list[Any] = list(values)
    at = [i for i, ok in enumerate(ints) if ok]
    if at:
        stamps = np.array([values[i] for i in at], dtype="int64").astype("datetime64[s]").astype(str)
        for i, s in zip(at, stamps.tolist()):
            out[i] = s + "Z"
    return out


@dataclass
class PageFields:
    """The record fields of one page's assigned subscriptions, column by column.

    Timestamps stay Unix seconds until :meth:`columns` converts them page-wide.
    """

    ids: list[Any]
    plans: list[Any]
    statuses: list[Any]
    updated: list[Any]
    periods: list[Any]
    #: instance id -> (created, customer id) of the newest subscription seen for it
    links: dict[str, tuple[int, str]]
    #: subscriptions on the page that belong to no instance
    unassigned: int = 0

    @classmethod
    def empty(cls) -> PageFields:
        return cls([], [], [], [], [], {})

    def columns(self) -> tuple[list[Any], list[Any], list[Any], list[Any], list[Any]]:
        """(ids, plans, statuses, updated_at, current_period_end) as ``validate_fields`` takes them."""
        return self.ids, self.plans, self.statuses, iso_seconds(self.updated), iso_seconds(self.periods)

    def records(self) -> list[dict[str, Any]]:
        """The same, as SPEC record dicts (per-instance look-ups)."""
        ids, plans, statuses, updated, periods = self.columns()
        return [
            {"instance_id": i, "plan_id": p, "status": s, "updated_at": u, "current_period_end": e}
            for i, p, s, u, e in zip(ids, plans, statuses, updated, periods)
        ]


class SubscriptionMapper:
    """Maps subscription objects to record fields for one run (see the module docstring)."""

    def __init__(self, metadata_key: str, plan_map: Mapping[str, str] | None = None, plan_ids: Collection[str] = ()) -> None:
        self.key = metadata_key
        self._plan_map = dict(plan_map or {})
        self._plan_ids = frozenset(plan_ids)

    def plan_of(self, subscription: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        """(mapped plan identifier or None, the item it came from)."""
        items = subscription.get("items")
        data = items.get("data") if isinstance(items, dict) else None
        if not isinstance(data, list) or not data:
            return None, None
        get = self._plan_map.get
        first: tuple[Any, dict[str, Any] | None] | None = None
        for item in data:
            ident = item_identifier(item)
            if ident is None:
                continue
            mapped = get(ident, ident)
            if first is None:
                first = (mapped, item)
            if mapped in self._plan_ids:
                return mapped, item
        return first if first is not None else (None, None)

    @staticmethod
    def status_of(subscription: dict[str, Any], period_end: Any) -> tuple[Any, Any]:
        """(record status, current_period_end in Unix seconds) of a subscription."""
        status = subscription.get("status")
        if status in ENTITLING:
            cancel_at = subscription.get("cancel_at")
            if type(cancel_at) is int:
                return "canceled", cancel_at
            if subscription.get("cancel_at_period_end") is True and period_end is not None:
                return "canceled", period_end
            return status, period_end
        if status == "canceled":
            ended = subscription.get("ended_at")
            if ended is None:
                ended = subscription.get("canceled_at")
            return "canceled", ended
        if status in NOT_ENTITLING:
            return "expired", period_end
        return status, period_end

    def add(self, subscription: dict[str, Any], out: PageFields, instance_id: Any = None) -> bool:
        """Append a subscription's record to ``out``; False when it belongs to no instance.

        ``instance_id``: already resolved by the caller (else :func:`instance_of`).
        """
        if instance_id is None:
            instance_id = instance_of(subscription, self.key)
            if instance_id is None:
                out.unassigned += 1
                return False
        plan, item = self.plan_of(subscription)
        period_end = item.get("current_period_end") if item is not None else None
        if period_end is None:
            period_end = subscription.get("current_period_end")
        status, period_end = self.status_of(subscription, period_end)
        created = subscription.get("created")
        out.ids.append(instance_id)
        out.plans.append(plan)
        out.statuses.append(status)
        out.updated.append(created)
        out.periods.append(period_end)
        customer = customer_id(subscription)
        if customer is not None and type(instance_id) is str and type(created) is int:
            seen = out.links.get(instance_id)
            if seen is None or created >= seen[0]:
                out.links[instance_id] = (created, customer)
        return True
