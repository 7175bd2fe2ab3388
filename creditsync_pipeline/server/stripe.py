"""Stripe's webhooks: signature and event, pure (no HTTP framework, no database).

For ``POST /api/billing/webhook/stripe`` (the route lives in :mod:`.app`: verify, land the
row, commit, answer 2xx, then sync).

**Signature** -- ``Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>...]`` where hex =
HMAC-SHA256(``STRIPE_WEBHOOK_SECRET``, ``"<t>.<raw body>"``): the scheme of creditsync's own
receiver, verified by the same code (:func:`.webhooks.verify_webhook_signature`): raw
bytes, 5-minute tolerance either side of the receiver's clock, any one of several ``v1``
entries (secret rolling), constant-time comparison, other schemes (``v0``) ignored.
Refusals are :class:`.webhooks.WebhookError` (401).

**Event** -- ``event_id`` = the event's ``id`` (Stripe redelivers and duplicates: landing is
idempotent on it), ``event_type`` = ``type``, ``payload`` = the raw body. The instance is
found on the event's object, in order:

1. ``metadata[KEY]`` of the object (a subscription, a customer, ...);
2. for invoices, the subscription's metadata Stripe copies onto them
   (``parent.subscription_details.metadata`` from 2025-03-31, ``subscription_details.metadata``
   before);
3. ``metadata[KEY]`` of the object's customer, when it is expanded;
4. the remembered link of the object's customer (``instances_of_customer``, from the app
   database): used when it names exactly one instance.

Only subscription, invoice, customer and checkout-session events are pokes; any other
authentic event is still landed (answered 2xx, so Stripe does not retry it for days) with
no instance: the sensor marks such rows processed as naming no instance. An event whose
instance cannot be found -- or is not a usable instance id -- is landed the same way; the
periodic full sync covers it. Only a body that is not an event at all (not JSON, no usable
``id`` or ``type``) is refused (400).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

from ..billing import instance_id_problem
from .webhooks import (
    MAX_EVENT_ID_LENGTH,
    MAX_EVENT_TYPE_LENGTH,
    TOLERANCE_SECONDS,
    WebhookError,
    WebhookEvent,
    _encodable,
    _usable_text,
    sign_webhook,
    verify_webhook_signature,
)

__all__ = [
    "POKE_PREFIXES",
    "STRIPE_SIGNATURE_HEADER",
    "customer_link",
    "parse_stripe_event",
    "receive_stripe_webhook",
    "sign_stripe_payload",
    "verify_stripe_signature",
]

STRIPE_SIGNATURE_HEADER = "Stripe-Signature"
#: event types that poke the instance they name
POKE_PREFIXES = ("customer.subscription.", "invoice.", "customer.", "checkout.session.")

InstancesOfCustomer = Callable[[str], Sequence[str]]


def sign_stripe_payload(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """A ``Stripe-Signature`` value for ``body`` (tests, the demo): Stripe's scheme."""
    return sign_webhook(secret, body, timestamp)


def verify_stripe_signature(
    header: str | None, body: bytes, secret: str | bytes, *, now: float | None = None, tolerance: int = TOLERANCE_SECONDS
) -> None:
    """Raise :class:`WebhookError` (401) unless ``header`` is Stripe's signature of ``body``.

    ValueError when ``secret`` is empty (the receiver is not configured).
    """
    verify_webhook_signature(header, body, secret, now=now, tolerance=tolerance, header_name=STRIPE_SIGNATURE_HEADER)


def _bad_event(message: str) -> WebhookError:
    return WebhookError(400, "invalid_event", message)


def _metadata_value(obj: Any, key: str) -> Any:
    if not isinstance(obj, dict):
        return None
    metadata = obj.get("metadata")
    return metadata.get(key) if isinstance(metadata, dict) else None


def _customer_id(obj: dict[str, Any]) -> str | None:
    if obj.get("object") == "customer":
        value: Any = obj.get("id")
    else:
        value = obj.get("customer")
        if isinstance(value, dict):
            value = value.get("id")
    return value if isinstance(value, str) and value else None


def _own_instance(obj: dict[str, Any], key: str) -> Any:
    """The instance the object itself (or what Stripe inlines into it) names, else None."""
    value = _metadata_value(obj, key)
    if value is None:
        parent = obj.get("parent")
        for details in (
            parent.get("subscription_details") if isinstance(parent, dict) else None,
            obj.get("subscription_details"),
        ):
            value = _metadata_value(details, key)
            if value is not None:
                break
    if value is None:
        customer = obj.get("customer")
        if isinstance(customer, dict) and not customer.get("deleted"):
            value = _metadata_value(customer, key)
    return value


def _usable_instance(value: Any) -> str | None:
    if isinstance(value, str) and instance_id_problem(value) is None and _encodable(value):
        return value
    return None


def _event_object(doc: dict[str, Any]) -> dict[str, Any] | None:
    data = doc.get("data")
    obj = data.get("object") if isinstance(data, dict) else None
    return obj if isinstance(obj, dict) else None


def parse_stripe_event(
    body: bytes, *, metadata_key: str = "instance_id", instances_of_customer: InstancesOfCustomer | None = None
) -> WebhookEvent:
    """The :class:`WebhookEvent` of an authenticated Stripe event body (see the module docstring).

    ``instances_of_customer``: customer id -> the instance ids remembered for it (called
    only when the event's object names no instance itself).
    """
    try:
        text = body.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad_event("body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise _bad_event("body is not a JSON object")
    event_id = doc.get("id")
    if not _usable_text(event_id, MAX_EVENT_ID_LENGTH):
        raise _bad_event(f"id must be a non-empty string of at most {MAX_EVENT_ID_LENGTH} characters")
    event_type = doc.get("type")
    if not _usable_text(event_type, MAX_EVENT_TYPE_LENGTH):
        raise _bad_event(f"type must be a non-empty string of at most {MAX_EVENT_TYPE_LENGTH} characters")
    if "\x00" in text:  # PostgreSQL TEXT cannot hold NUL
        raise _bad_event("body contains a NUL character")
    instance_id: str | None = None
    obj = _event_object(doc)
    if obj is not None and event_type.startswith(POKE_PREFIXES):
        own = _own_instance(obj, metadata_key)
        if own is not None:
            instance_id = _usable_instance(own)
        elif instances_of_customer is not None:
            customer = _customer_id(obj)
            if customer is not None:
                linked = list(dict.fromkeys(instances_of_customer(customer)))
                if len(linked) == 1:
                    instance_id = _usable_instance(linked[0])
    return WebhookEvent(event_id=event_id, event_type=event_type, instance_id=instance_id, payload=text)


def customer_link(event: WebhookEvent, metadata_key: str = "instance_id") -> dict[str, str]:
    """``{instance id: customer id}`` when the event itself shows both (to remember), else ``{}``.

    A link found through ``instances_of_customer`` is not repeated (it is already known).
    """
    if event.instance_id is None:
        return {}
    try:
        doc = json.loads(event.payload)
    except ValueError:
        return {}
    obj = _event_object(doc) if isinstance(doc, dict) else None
    if obj is None or _own_instance(obj, metadata_key) != event.instance_id:
        return {}
    customer = _customer_id(obj)
    return {event.instance_id: customer} if customer is not None else {}


def receive_stripe_webhook(
    header: str | None,
    body: bytes,
    *,
    secret: str | bytes,
    metadata_key: str = "instance_id",
    instances_of_customer: InstancesOfCustomer | None = None,
    now: float | None = None,
) -> WebhookEvent:
    """Verify, then parse: what the route does before it lands the row."""
    verify_stripe_signature(header, body, secret, now=now)
    return parse_stripe_event(body, metadata_key=metadata_key, instances_of_customer=instances_of_customer)
