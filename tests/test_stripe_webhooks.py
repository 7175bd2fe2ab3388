"""Stripe webhooks: the signature (cross-checked with the official library) and the event."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import stripe

from creditsync_pipeline.server.stripe import (
    customer_link,
    parse_stripe_event,
    receive_stripe_webhook,
    sign_stripe_payload,
    verify_stripe_signature,
)
from creditsync_pipeline.server.webhooks import WebhookError

SECRET = "whsec_SECRET_7d2e0c94b1a6f385"


def event(type_: str = "customer.subscription.updated", obj: dict[str, Any] | None = None, **extra: Any) -> bytes:
    doc = {
        "id": "evt_1Q", "object": "event", "api_version": "2025-03-31.basil", "created": int(time.time()),
        "type": type_, "livemode": False, "pending_webhooks": 1,
        "data": {"object": obj if obj is not None else {
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {"instance_id": "inst-1"}}},
        **extra,
    }
    return json.dumps(doc, separators=(",", ":")).encode()


# -- signatures -----------------------------------------------------------------------------


def test_our_signature_verifies_with_the_official_library_and_the_librarys_with_ours() -> None:
    body = event()
    ours = sign_stripe_payload(SECRET, body)
    assert stripe.WebhookSignature.verify_header(body.decode(), ours, SECRET, tolerance=300) is True
    theirs = stripe.WebhookSignature.generate_signature_header(body.decode(), SECRET)
    verify_stripe_signature(theirs, body, SECRET)
    assert stripe.Webhook.construct_event(body, ours, SECRET).id == "evt_1Q"


def test_one_of_several_v1_entries_is_enough_and_v0_is_ignored() -> None:
    body = event()
    t = int(time.time())
    good = sign_stripe_payload(SECRET, body, t).split("v1=")[1]
    old = sign_stripe_payload("whsec_old_secret", body, t).split("v1=")[1]
    header = f"t={t},v1={old},v1={good},v0=abcdef"
    verify_stripe_signature(header, body, SECRET)
    assert stripe.WebhookSignature.verify_header(body.decode(), header, SECRET) is True


@pytest.mark.parametrize(
    "make_header,code,message",
    [
        (lambda body, t: None, "invalid_signature", "missing Stripe-Signature header"),
        (lambda body, t: "", "invalid_signature", "missing Stripe-Signature header"),
        (lambda body, t: f"t={t}", "invalid_signature", "Stripe-Signature header needs t= and v1="),
        (lambda body, t: "garbage", "invalid_signature", "Stripe-Signature header is malformed"),
        (lambda body, t: sign_stripe_payload("whsec_wrong", body, t), "invalid_signature", "signature does not match"),
        (lambda body, t: sign_stripe_payload(SECRET, body + b" ", t), "invalid_signature", "signature does not match"),
        (lambda body, t: sign_stripe_payload(SECRET, body, t - 301), "stale_signature", "more than 300 s"),
        (lambda body, t: sign_stripe_payload(SECRET, body, t + 301), "stale_signature", "more than 300 s"),
    ],
    ids=["missing", "empty", "no-v1", "malformed", "wrong-secret", "body-changed", "stale", "future"],
)
def test_refusals(make_header, code, message) -> None:
    body = event()
    t = int(time.time())
    header = make_header(body, t)
    with pytest.raises(WebhookError) as info:
        receive_stripe_webhook(header, body, secret=SECRET)
    assert (info.value.status, info.value.code) == (401, code)
    assert message in info.value.message
    assert SECRET not in info.value.message and SECRET not in repr(info.value)
    if header and code == "invalid_signature" and "v1=" in header:
        with pytest.raises(stripe.SignatureVerificationError):  # the library refuses it too
            stripe.WebhookSignature.verify_header(body.decode(), header, SECRET)


def test_the_tolerance_edge_is_inclusive() -> None:
    body = event()
    now = 2_000_000_000
    verify_stripe_signature(sign_stripe_payload(SECRET, body, now - 300), body, SECRET, now=now)


def test_an_unconfigured_secret_is_a_setup_error_not_a_refusal() -> None:
    with pytest.raises(ValueError, match="secret is empty"):
        verify_stripe_signature("t=1,v1=" + "0" * 64, event(), "")


# -- events ---------------------------------------------------------------------------------


def test_a_redelivered_event_parses_to_the_same_row() -> None:
    body = event()
    first = receive_stripe_webhook(sign_stripe_payload(SECRET, body), body, secret=SECRET)
    second = receive_stripe_webhook(sign_stripe_payload(SECRET, body), body, secret=SECRET)
    assert first == second
    assert (first.event_id, first.event_type, first.instance_id) == ("evt_1Q", "customer.subscription.updated", "inst-1")
    assert first.payload == body.decode()


INSTANCE_CASES = [
    ("subscription metadata", "customer.subscription.created",
     {"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {"instance_id": "a"}}, {}, "a"),
    ("expanded customer's metadata", "customer.subscription.deleted",
     {"id": "sub_1", "object": "subscription", "metadata": {},
      "customer": {"id": "cus_1", "object": "customer", "metadata": {"instance_id": "b"}}}, {}, "b"),
    ("remembered link of the customer", "customer.subscription.updated",
     {"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {}}, {"cus_1": ["c"]}, "c"),
    ("a customer linked to two instances names neither", "customer.subscription.updated",
     {"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {}}, {"cus_1": ["c", "d"]}, None),
    ("invoice: subscription details (2025-03-31)", "invoice.paid",
     {"id": "in_1", "object": "invoice", "customer": "cus_1", "metadata": {},
      "parent": {"type": "subscription_details", "subscription_details": {"metadata": {"instance_id": "e"}}}}, {}, "e"),
    ("invoice: subscription details (older versions)", "invoice.payment_failed",
     {"id": "in_1", "object": "invoice", "customer": "cus_1", "subscription_details": {"metadata": {"instance_id": "f"}}},
     {}, "f"),
    ("invoice: remembered link", "invoice.paid",
     {"id": "in_1", "object": "invoice", "customer": "cus_9"}, {"cus_9": ["g"]}, "g"),
    ("customer event: its own metadata", "customer.updated",
     {"id": "cus_1", "object": "customer", "metadata": {"instance_id": "h"}}, {}, "h"),
    ("customer event: remembered link of that customer", "customer.deleted",
     {"id": "cus_2", "object": "customer", "metadata": {}}, {"cus_2": ["i"]}, "i"),
    ("checkout session", "checkout.session.completed",
     {"id": "cs_1", "object": "checkout.session", "customer": "cus_1", "metadata": {"instance_id": "j"}}, {}, "j"),
    ("not a poke: landed without an instance", "charge.succeeded",
     {"id": "ch_1", "object": "charge", "customer": "cus_1", "metadata": {"instance_id": "k"}}, {"cus_1": ["k"]}, None),
    ("nothing names an instance", "customer.subscription.updated",
     {"id": "sub_1", "object": "subscription", "customer": "cus_unknown", "metadata": {}}, {}, None),
    ("an unusable instance id is none", "customer.subscription.updated",
     {"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {"instance_id": "bad\u0000id"}}, {}, None),
]


@pytest.mark.parametrize("type_,obj,links,expected", [c[1:] for c in INSTANCE_CASES], ids=[c[0] for c in INSTANCE_CASES])
def test_the_instance_of_an_event(type_, obj, links, expected) -> None:
    asked: list[str] = []

    def instances_of_customer(customer: str) -> list[str]:
        asked.append(customer)
        return links.get(customer, [])

    parsed = parse_stripe_event(event(type_, obj), instances_of_customer=instances_of_customer)
    assert parsed.event_type == type_ and parsed.instance_id == expected
    if not type_.startswith(("customer.", "invoice.", "checkout.")):
        assert asked == []  # a non-poke never costs a look-up


def test_another_metadata_key() -> None:
    obj = {"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {"site": "s-1", "instance_id": "x"}}
    assert parse_stripe_event(event(obj=obj), metadata_key="site").instance_id == "s-1"


def test_thin_events_without_an_object_are_landed_without_an_instance() -> None:
    body = json.dumps({"id": "evt_thin", "object": "v2.core.event", "type": "v1.customer.subscription.updated",
                       "related_object": {"id": "sub_1"}}).encode()
    parsed = parse_stripe_event(body)
    assert (parsed.event_id, parsed.instance_id) == ("evt_thin", None)


@pytest.mark.parametrize(
    "body,message",
    [
        (b"\xff\xfe", "not UTF-8 JSON"),
        (b"[1,2]", "not a JSON object"),
        (json.dumps({"type": "invoice.paid"}).encode(), "id must be"),
        (json.dumps({"id": "evt_1", "type": ""}).encode(), "type must be"),
        (json.dumps({"id": "x" * 300, "type": "invoice.paid"}).encode(), "id must be"),
    ],
)
def test_bodies_that_are_not_events_are_refused(body, message) -> None:
    with pytest.raises(WebhookError) as info:
        receive_stripe_webhook(sign_stripe_payload(SECRET, body), body, secret=SECRET)
    assert (info.value.status, info.value.code) == (400, "invalid_event") and message in info.value.message


def test_the_link_an_event_shows_is_offered_for_remembering() -> None:
    own = parse_stripe_event(event())
    assert customer_link(own) == {"inst-1": "cus_1"}
    expanded = parse_stripe_event(event(obj={"id": "sub_1", "object": "subscription", "metadata": {},
                                             "customer": {"id": "cus_7", "metadata": {"instance_id": "z"}}}))
    assert customer_link(expanded) == {"z": "cus_7"}
    via_link = parse_stripe_event(event(obj={"id": "sub_1", "object": "subscription", "customer": "cus_1", "metadata": {}}),
                                  instances_of_customer=lambda c: ["known"])
    assert via_link.instance_id == "known" and customer_link(via_link) == {}
    assert customer_link(parse_stripe_event(event("charge.succeeded"))) == {}


def test_an_event_from_the_simulator_names_its_instance_and_verifies_with_the_library() -> None:
    from creditsync_pipeline.simulators.stripe import StripeSimulator

    sim = StripeSimulator()
    sim.put_customer("cus_a", metadata={"instance_id": "inst-a"})
    sim.put_subscription("sub_a", customer="cus_a")
    body = sim.event("sub_a", "customer.subscription.deleted", created=1_800_000_000)
    header = sign_stripe_payload(SECRET, body)
    assert stripe.Webhook.construct_event(body, header, SECRET).type == "customer.subscription.deleted"
    # the object's customer is an id: the remembered link names the instance
    parsed = receive_stripe_webhook(header, body, secret=SECRET, instances_of_customer={"cus_a": ["inst-a"]}.get)
    assert parsed.instance_id == "inst-a" and parsed.event_id == json.loads(body)["id"]
    assert sim.event("sub_a", "customer.subscription.deleted", created=1_800_000_000) == body  # a redelivery
