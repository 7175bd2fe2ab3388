"""The Stripe simulator's objects: customers, prices, subscriptions, and their JSON.

Kept compact (slotted classes, rendered to Stripe's JSON per request) so 100,000
subscriptions fit in a few tens of MB. Rendering follows the current API shape
(``2025-03-31.basil`` and later: billing periods on ``items.data[]``, prices with
``lookup_key``); ``legacy=True`` renders the older shape (periods on the subscription,
none on the items), as older API versions and test servers answer.

``extra`` on a subscription or customer overrides rendered fields verbatim, so a test
can serve anything (an unknown status, no items, a non-string metadata value).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Customer", "Item", "Price", "Subscription", "object_id", "render_customer", "render_subscription"]

STATUSES = ("active", "trialing", "past_due", "canceled", "unpaid", "incomplete", "incomplete_expired", "paused")


def object_id(prefix: str, *parts: object) -> str:
    """A Stripe-looking id (``cus_...``, ``sub_...``), deterministic in ``parts``."""
    digest = hashlib.blake2b("\x1f".join(map(str, parts)).encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return f"{prefix}_{digest}"


@dataclass(slots=True)
class Price:
    """A recurring price (``lookup_key`` None: identified by its id)."""

    id: str
    lookup_key: str | None = None
    product: str = "prod_creditsync"
    unit_amount: int = 1000
    currency: str = "usd"
    interval: str = "month"
    created: int = 1_700_000_000
    #: render only the legacy ``plan`` object on items (test servers' older shape)
    plan_only: bool = False
    _rendered: dict[str, Any] | None = field(default=None, repr=False)

    def render(self) -> dict[str, Any]:
        if self._rendered is None:
            self._rendered = {
                "id": self.id, "object": "price", "active": True, "billing_scheme": "per_unit",
                "created": self.created, "currency": self.currency, "custom_unit_amount": None,
                "livemode": False, "lookup_key": self.lookup_key, "metadata": {}, "nickname": None,
                "product": self.product,
                "recurring": {"interval": self.interval, "interval_count": 1, "meter": None,
                              "trial_period_days": None, "usage_type": "licensed"},
                "tax_behavior": "unspecified", "tiers_mode": None, "transform_quantity": None,
                "type": "recurring", "unit_amount": self.unit_amount, "unit_amount_decimal": str(self.unit_amount),
            }
        return self._rendered

    def render_plan(self) -> dict[str, Any]:
        return {
            "id": self.id, "object": "plan", "active": True, "amount": self.unit_amount,
            "amount_decimal": str(self.unit_amount), "billing_scheme": "per_unit", "created": self.created,
            "currency": self.currency, "interval": self.interval, "interval_count": 1, "livemode": False,
            "metadata": {}, "meter": None, "nickname": None, "product": self.product, "tiers_mode": None,
            "transform_usage": None, "trial_period_days": None, "usage_type": "licensed",
        }


@dataclass(slots=True)
class Item:
    id: str
    price: Price
    current_period_start: int
    current_period_end: int
    quantity: int = 1


@dataclass(slots=True)
class Customer:
    id: str
    metadata: dict[str, Any] = field(default_factory=dict)
    created: int = 1_700_000_000
    email: str | None = None
    name: str | None = None
    deleted: bool = False
    extra: dict[str, Any] | None = None
    #: when search sees it (``time.monotonic()``; 0: at once)
    indexed_at: float = 0.0


@dataclass(slots=True)
class Subscription:
    id: str
    customer: str
    status: str
    created: int
    items: list[Item]
    metadata: dict[str, Any] = field(default_factory=dict)
    cancel_at_period_end: bool = False
    cancel_at: int | None = None
    canceled_at: int | None = None
    ended_at: int | None = None
    trial_start: int | None = None
    trial_end: int | None = None
    extra: dict[str, Any] | None = None
    indexed_at: float = 0.0


def render_customer(customer: Customer) -> dict[str, Any]:
    if customer.deleted:
        return {"id": customer.id, "object": "customer", "deleted": True}
    doc: dict[str, Any] = {
        "id": customer.id, "object": "customer", "address": None, "balance": 0, "created": customer.created,
        "currency": "usd", "default_source": None, "delinquent": False, "description": None, "discount": None,
        "email": customer.email, "invoice_prefix": customer.id[4:12].upper(),
        "invoice_settings": {"custom_fields": None, "default_payment_method": None, "footer": None,
                             "rendering_options": None},
        "livemode": False, "metadata": customer.metadata, "name": customer.name, "next_invoice_sequence": 2,
        "phone": None, "preferred_locales": [], "shipping": None, "tax_exempt": "none", "test_clock": None,
    }
    if customer.extra:
        doc.update(customer.extra)
    return doc


def _render_item(item: Item, subscription_id: str, legacy: bool) -> dict[str, Any]:
    price = item.price
    doc: dict[str, Any] = {"id": item.id, "object": "subscription_item", "created": item.current_period_start}
    if not legacy:
        doc["current_period_end"] = item.current_period_end
        doc["current_period_start"] = item.current_period_start
    doc.update({"discounts": [], "metadata": {}, "plan": price.render_plan()})
    if not price.plan_only:
        doc["price"] = price.render()
    doc.update({"quantity": item.quantity, "subscription": subscription_id, "tax_rates": []})
    return doc


def render_subscription(sub: Subscription, customer: dict[str, Any] | str, *, legacy: bool = False) -> dict[str, Any]:
    """The subscription as Stripe renders it; ``customer`` is its id or the expanded object."""
    first = sub.items[0] if sub.items else None
    doc: dict[str, Any] = {
        "id": sub.id, "object": "subscription", "application": None, "application_fee_percent": None,
        "automatic_tax": {"disabled_reason": None, "enabled": False, "liability": None},
        "billing_cycle_anchor": first.current_period_start if first else sub.created,
        "billing_cycle_anchor_config": None, "cancel_at": sub.cancel_at,
        "cancel_at_period_end": sub.cancel_at_period_end, "canceled_at": sub.canceled_at,
        "cancellation_details": {"comment": None, "feedback": None,
                                 "reason": "cancellation_requested" if sub.canceled_at else None},
        "collection_method": "charge_automatically", "created": sub.created, "currency": "usd",
        "customer": customer, "days_until_due": None, "default_payment_method": None, "default_source": None,
        "default_tax_rates": [], "description": None, "discounts": [], "ended_at": sub.ended_at,
        "invoice_settings": {"account_tax_ids": None, "issuer": {"type": "self"}},
        "items": {
            "object": "list", "data": [_render_item(i, sub.id, legacy) for i in sub.items],
            "has_more": False, "total_count": len(sub.items), "url": f"/v1/subscription_items?subscription={sub.id}",
        },
        "latest_invoice": "in_" + sub.id[4:], "livemode": False, "metadata": sub.metadata,
        "next_pending_invoice_item_invoice": None, "on_behalf_of": None, "pause_collection": None,
        "payment_settings": {"payment_method_options": None, "payment_method_types": None,
                             "save_default_payment_method": "off"},
        "pending_invoice_item_interval": None, "pending_setup_intent": None, "pending_update": None,
        "plan": first.price.render_plan() if first else None, "quantity": first.quantity if first else None,
        "schedule": None, "start_date": sub.created, "status": sub.status, "test_clock": None,
        "transfer_data": None, "trial_end": sub.trial_end,
        "trial_settings": {"end_behavior": {"missing_payment_method": "create_invoice"}},
        "trial_start": sub.trial_start,
    }
    if legacy and first is not None:
        doc["current_period_end"] = first.current_period_end
        doc["current_period_start"] = first.current_period_start
    if sub.extra:
        doc.update(sub.extra)
    return doc
