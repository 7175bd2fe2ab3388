"""SPEC-shaped billing records (the demo's and the benchmark's) -> Stripe customers and subscriptions.

The conversion keeps what each record entitles to, as the Stripe provider reads it back:

==========================================  ================================================
record                                      Stripe
==========================================  ================================================
active / trialing / past_due                the same status, the period end on the item
                                            (``created`` + 30 days when the record has none)
canceled, period end after ``now``          ``active`` with ``cancel_at_period_end`` (paid
                                            through the period: entitled until its end)
canceled, period end past or none           ``canceled``, ``ended_at`` = the period end, else
                                            ``updated_at``
expired                                     ``canceled``, ``ended_at`` = the period end or
                                            ``updated_at``, at the latest ``now``
no ``instance_id``                          a subscription whose customer carries none
==========================================  ================================================

``created`` = the record's ``updated_at`` (the provider reads it back as ``updated_at``). One
customer per instance; the instance id goes in the customer's metadata, the
subscription's, or alternately one and the other (``metadata_on``). Plan ``p`` is price
``price_<p>`` with lookup key ``lookup_keys.get(p, p)`` (None: no lookup key, the price id
is the identifier).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from typing import Any, Literal

from .objects import Customer, Item, Price, Subscription, object_id

__all__ = ["MetadataOn", "stripe_objects_from_records"]

MetadataOn = Literal["customer", "subscription", "alternate"]
_MONTH = 30 * 86_400


def _seconds(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError(f"expected an ISO-8601 timestamp, got {type(value).__name__}")
    dt = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp())


def stripe_objects_from_records(
    records: Iterable[Mapping[str, Any]],
    *,
    metadata_key: str = "instance_id",
    metadata_on: MetadataOn = "alternate",
    lookup_keys: Mapping[str, str | None] | None = None,
    now: datetime | None = None,
) -> tuple[list[Customer], list[Subscription]]:
    """Customers and subscriptions equivalent to ``records`` (see the module docstring)."""
    if metadata_on not in ("customer", "subscription", "alternate"):
        raise ValueError("metadata_on must be 'customer', 'subscription' or 'alternate'")
    now_s = int((now or datetime.now(timezone.utc)).timestamp())
    keys = dict(lookup_keys or {})
    prices: dict[str, Price] = {}
    customers: dict[str, Customer] = {}
    subscriptions: list[Subscription] = []
    for n, record in enumerate(records):
        instance_id = record.get("instance_id")
        if instance_id is not None and not isinstance(instance_id, str):
            raise ValueError(f"record #{n + 1}: instance_id must be a string or absent")
        created = _seconds(record.get("updated_at")) or now_s
        period_end = _seconds(record.get("current_period_end"))
        on_customer = metadata_on == "customer" or (metadata_on == "alternate" and len(customers) % 2 == 0)
        if instance_id is None:
            customer = Customer(id=object_id("cus", "none", n), created=created, email=f"buyer{n}@example.com")
            customers[customer.id] = customer
        else:
            customer = customers.get(object_id("cus", instance_id))  # type: ignore[assignment]
            if customer is None:
                customer = Customer(
                    id=object_id("cus", instance_id), created=created, email=f"owner{len(customers)}@example.com",
                    metadata={metadata_key: instance_id} if on_customer else {},
                )
                customers[customer.id] = customer
        sub_metadata = {} if instance_id is None or customer.metadata else {metadata_key: instance_id}
        plan = record.get("plan_id")
        items: list[Item] = []
        status = record.get("status")
        end = period_end if period_end is not None else created + _MONTH
        if isinstance(plan, str) and plan:
            price = prices.get(plan)
            if price is None:
                price = prices[plan] = Price(id=f"price_{plan}", lookup_key=keys.get(plan, plan), product=f"prod_{plan}")
            items.append(Item(id=object_id("si", n, plan), price=price, current_period_start=end - _MONTH, current_period_end=end))
        sub = Subscription(
            id=object_id("sub", n, instance_id), customer=customer.id, status=str(status), created=created,
            items=items, metadata=sub_metadata,
        )
        if status == "trialing":
            sub.trial_start, sub.trial_end = end - _MONTH, end
        elif status == "canceled" and period_end is not None and period_end > now_s:
            sub.status, sub.cancel_at_period_end, sub.canceled_at = "active", True, created
        elif status == "canceled":
            sub.ended_at = sub.canceled_at = period_end if period_end is not None else created
        elif status == "expired":
            sub.status = "canceled"
            sub.ended_at = sub.canceled_at = min(period_end if period_end is not None else created, now_s)
        subscriptions.append(sub)
    return list(customers.values()), subscriptions
