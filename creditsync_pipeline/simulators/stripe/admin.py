"""The Stripe simulator's admin endpoints (unauthenticated; for a simulator in another process).

``PUT``/``DELETE /_sim/customers/{id}`` and ``/_sim/subscriptions/{id}`` (bodies as
:meth:`.StripeSimulator.put_customer` / :meth:`~.StripeSimulator.put_subscription` take),
``POST /_sim/records`` (``{"records": [...SPEC records...], "metadata_on": ...}``: replace
everything), ``POST /_sim/config`` (``search_lag``, ``search_enabled``,
``restart_on_unknown_cursor``, ``legacy_periods``), ``DELETE /_sim/data``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from ..base import MISSING, Handler

if TYPE_CHECKING:
    from .simulator import StripeSimulator

__all__ = ["admin_request"]


def admin_request(sim: StripeSimulator, handler: Handler, method: str, path: str, body: bytes) -> bool:
    """Answer one ``/_sim/...`` request of the Stripe simulator; False when ``path`` is not one."""
    for prefix, put, delete in (
        ("/_sim/customers/", _put_customer, sim.delete_customer),
        ("/_sim/subscriptions/", _put_subscription, sim.delete_subscription),
    ):
        if path.startswith(prefix):
            object_key = unquote(path[len(prefix):])
            if not object_key or "/" in object_key:
                handler.error(404, "not_found")
            elif method == "PUT":
                doc = handler.json_body(body)
                if doc is not MISSING:
                    if not isinstance(doc, dict):
                        handler.error(400, "bad_request", "expected a JSON object")
                    else:
                        try:
                            put(sim, object_key, doc)
                        except (KeyError, TypeError, ValueError) as exc:
                            handler.error(400, "bad_request", f"bad object: {exc}")
                        else:
                            handler.json(200, {"ok": True})
            elif method == "DELETE":
                handler.json(200, {"deleted": delete(object_key)})
            else:
                handler.error(405, "method_not_allowed")
            return True
    if path == "/_sim/records" and method == "POST":
        doc = handler.json_body(body)
        if doc is MISSING:
            return True
        if not isinstance(doc, dict) or not isinstance(doc.get("records"), list):
            handler.error(400, "bad_request", "expected {\"records\": [...]}")
            return True
        options = {k: doc[k] for k in ("metadata_key", "metadata_on", "lookup_keys") if k in doc}
        try:
            sim.load_records(doc["records"], **options)
        except (TypeError, ValueError) as exc:
            handler.error(400, "bad_request", str(exc))
            return True
        handler.json(200, {"ok": True, "subscriptions": len(sim.subscriptions())})
        return True
    if path == "/_sim/config" and method == "POST":
        doc = handler.json_body(body)
        if doc is MISSING:
            return True
        allowed = {"search_lag", "search_enabled", "restart_on_unknown_cursor", "legacy_periods"}
        if not isinstance(doc, dict) or set(doc) - allowed:
            handler.error(400, "bad_request", f"expected an object with some of {sorted(allowed)}")
            return True
        for name, value in doc.items():
            setattr(sim, name, float(value) if name == "search_lag" else bool(value))
        handler.json(200, {"ok": True})
        return True
    if path == "/_sim/data" and method == "DELETE":
        sim.clear()
        handler.json(200, {"ok": True})
        return True
    return False


def _put_customer(sim: StripeSimulator, customer_id: str, doc: dict[str, Any]) -> None:
    allowed = {"metadata", "email", "name", "created", "deleted", "extra"}
    if set(doc) - allowed:
        raise ValueError(f"unknown customer fields {sorted(set(doc) - allowed)}")
    sim.put_customer(customer_id, **doc)


def _put_subscription(sim: StripeSimulator, subscription_id: str, doc: dict[str, Any]) -> None:
    if "customer" not in doc:
        raise ValueError("a subscription needs a customer")
    sim.put_subscription(subscription_id, **doc)
