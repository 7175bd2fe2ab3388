"""Wix webhook bodies: RS256 JWTs verified with the app's public key; every forgery refused."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from creditsync_pipeline.server.webhooks import MAX_EVENT_BYTES, WebhookError
from creditsync_pipeline.server.wix import (
    WixWebhookVerifier,
    generate_key_pair,
    load_public_key,
    parse_wix_webhook,
    sign_wix_webhook,
)


@pytest.fixture(scope="module")
def keys():
    return generate_key_pair()


@pytest.fixture(scope="module")
def other_keys():
    return generate_key_pair()


@pytest.fixture(scope="module")
def verifier(keys):
    return WixWebhookVerifier(keys[1])


PURCHASE = {"operationTimeStamp": "2026-11-30T10:00:00Z", "vendorProductId": "pro", "cycle": "MONTHLY",
            "expiresOn": "2026-12-30T10:00:00Z", "couponName": None, "invoiceId": "inv-1"}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def forge(header: dict, claims: dict, signature: bytes = b"") -> str:
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def claims_for(event_type="PaidPlanPurchased", instance_id="abc123", data=PURCHASE, **extra):
    envelope = {"eventType": event_type, "instanceId": instance_id, "data": json.dumps(data)}
    return {"data": json.dumps(envelope), "iat": int(time.time()), "exp": int(time.time()) + 3600, **extra}


def test_a_signed_event_is_read(keys, verifier):
    body = sign_wix_webhook(keys[0], event_type="PaidPlanPurchased", instance_id="abc123", data=PURCHASE)
    event = verifier.parse(body.encode())
    assert event.event_type == "PaidPlanPurchased" and event.instance_id == "abc123"
    assert event.event_id.startswith("wix-") and len(event.event_id) == 52
    envelope = json.loads(event.payload)
    assert envelope["eventType"] == "PaidPlanPurchased" and json.loads(envelope["data"]) == PURCHASE
    assert parse_wix_webhook(body, keys[1]) == event  # str body, one-shot helper


def test_a_redelivery_gets_the_same_event_id(keys, verifier):
    event = dict(event_type="PaidPlanChanged", instance_id="abc123", data=PURCHASE)
    first = sign_wix_webhook(keys[0], iat=int(time.time()) - 47 * 3600, expires_in=None, **event)
    again = sign_wix_webhook(keys[0], **event)  # ~47 h later, signed again: the same event
    assert first != again
    assert verifier.parse(first).event_id == verifier.parse(again).event_id


@pytest.mark.parametrize(
    "change",
    [dict(event_type="PaidPlanAutoRenewalCancelled"), dict(instance_id="other"),
     dict(data={**PURCHASE, "vendorProductId": "team"})],
    ids=["type", "instance", "data"],
)
def test_distinct_events_get_distinct_ids(keys, verifier, change):
    base = dict(event_type="PaidPlanPurchased", instance_id="abc123", data=PURCHASE)
    a = verifier.parse(sign_wix_webhook(keys[0], **base))
    b = verifier.parse(sign_wix_webhook(keys[0], **{**base, **change}))
    assert a.event_id != b.event_id


def test_the_events_own_id_is_used_where_wix_gives_one(keys, verifier):
    data = {"id": "5f1c0e52-evt", "entityFqdn": "wix.app.installations.v1.app_installation", "slug": "updated"}
    event = verifier.parse(sign_wix_webhook(keys[0], event_type="wix.app.installations.v1.app_installation_updated",
                                            instance_id="abc123", data=data))
    assert event.event_id == "5f1c0e52-evt"


@pytest.mark.parametrize(
    "event_type", ["AppInstalled", "AppRemoved", "PaidPlanPurchased", "PaidPlanChanged",
                   "PaidPlanAutoRenewalCancelled", "PlanReactivated", "PlanConvertedToPaid", "PlanTransferred"],
)
def test_every_event_naming_an_instance_is_a_poke(keys, verifier, event_type):
    event = verifier.parse(sign_wix_webhook(keys[0], event_type=event_type, instance_id="site-7", data={}))
    assert event.instance_id == "site-7" and event.event_type == event_type


def test_an_event_without_instance_lands_without_one(keys, verifier):
    event = verifier.parse(sign_wix_webhook(keys[0], event_type="SomethingElse", instance_id=None, data={"x": 1}))
    assert event.instance_id is None


def test_no_exp_is_accepted_and_within_leeway_too(keys, verifier):
    assert verifier.parse(sign_wix_webhook(keys[0], event_type="AppInstalled", instance_id="a", expires_in=None))
    recent = sign_wix_webhook(keys[0], event_type="AppInstalled", instance_id="a", iat=int(time.time()) - 100, expires_in=70)
    assert verifier.parse(recent).instance_id == "a"  # expired 30 s ago: within the 60 s leeway


def _refusal(verifier, body) -> WebhookError:
    with pytest.raises(WebhookError) as info:
        verifier.parse(body)
    err = info.value
    assert "\n" not in err.message and len(err.message) < 200
    return err


def test_alg_none_is_refused(verifier):
    token = jwt.encode(claims_for(), None, algorithm="none")
    err = _refusal(verifier, token)
    assert (err.status, err.code) == (401, "invalid_algorithm")


def test_hs256_with_the_public_key_as_secret_is_refused(keys, verifier):
    """The key-confusion forgery: HMAC keyed with the (public) PEM the receiver holds."""
    header = {"alg": "HS256", "typ": "JWT"}
    unsigned = forge(header, claims_for()).rsplit(".", 1)[0]
    for secret in (keys[1].encode(), keys[1].strip().encode()):
        signature = hmac.new(secret, unsigned.encode(), hashlib.sha256).digest()
        err = _refusal(verifier, f"{unsigned}.{b64(signature)}")
        assert (err.status, err.code) == (401, "invalid_algorithm") and "HS256" in err.message


@pytest.mark.parametrize("alg", ["RS512", "PS256", "ES256", "HS512"])
def test_other_algorithms_are_refused(verifier, alg):
    err = _refusal(verifier, forge({"alg": alg, "typ": "JWT"}, claims_for(), b"sig"))
    assert (err.status, err.code) == (401, "invalid_algorithm")


def test_another_key_is_refused(other_keys, verifier):
    body = sign_wix_webhook(other_keys[0], event_type="PaidPlanPurchased", instance_id="abc123", data=PURCHASE)
    err = _refusal(verifier, body)
    assert (err.status, err.code) == (401, "invalid_signature")


def test_a_tampered_payload_is_refused(keys, verifier):
    body = sign_wix_webhook(keys[0], event_type="PaidPlanPurchased", instance_id="abc123", data=PURCHASE)
    head, _, signature = body.split(".")
    tampered = f"{head}.{b64(json.dumps(claims_for(instance_id='victim')).encode())}.{signature}"
    err = _refusal(verifier, tampered)
    assert (err.status, err.code) == (401, "invalid_signature")


def test_an_expired_token_is_refused(keys, verifier):
    body = sign_wix_webhook(keys[0], event_type="PaidPlanPurchased", instance_id="abc123",
                            iat=int(time.time()) - 7200, expires_in=3600)
    err = _refusal(verifier, body)
    assert (err.status, err.code) == (401, "expired_token")


def test_a_token_from_the_future_is_refused(keys, verifier):
    body = sign_wix_webhook(keys[0], event_type="AppInstalled", instance_id="a", iat=int(time.time()) + 3600)
    err = _refusal(verifier, body)
    assert err.status == 401 and err.code == "immature_token"


@pytest.mark.parametrize(
    "body",
    [b"", b"{\"eventType\": \"PaidPlanPurchased\"}", b"a.b.c", b"not a jwt at all", "é.é.é".encode(), b"\xff\xfe.x.y",
     b"eyJhbGciOiJSUzI1NiJ9.!!!.sig"],
    ids=["empty", "json", "dots", "text", "non-ascii", "binary", "bad-segment"],
)
def test_a_body_that_is_not_a_jwt_is_refused(verifier, body):
    err = _refusal(verifier, body)
    assert err.status in (400, 401) and err.code in ("invalid_jwt", "invalid_signature")


def test_a_huge_body_is_refused_before_parsing(verifier):
    err = _refusal(verifier, b"a" * (MAX_EVENT_BYTES + 1))
    assert err.status == 413


@pytest.mark.parametrize(
    "claims, message",
    [
        ({"iat": 1}, "no 'data' claim"),
        ({"data": "not json"}, "'data' claim is not JSON"),
        ({"data": "[1, 2]"}, "not a JSON object"),
        ({"data": json.dumps({"instanceId": "a", "data": "{}"})}, "eventType"),
        ({"data": json.dumps({"eventType": "AppInstalled", "instanceId": "bad\u0000id"})}, "instanceId"),
        ({"data": json.dumps({"eventType": "AppInstalled", "instanceId": 7})}, "instanceId"),
    ],
    ids=["no-data", "data-not-json", "data-array", "no-event-type", "control-char-id", "numeric-id"],
)
def test_verified_but_unreadable_events_are_400(keys, verifier, claims, message):
    private = serialization.load_pem_private_key(keys[0].encode(), password=None)
    err = _refusal(verifier, jwt.encode(claims, private, algorithm="RS256"))
    assert (err.status, err.code) == (400, "invalid_event") and message in err.message


def test_public_key_loading(keys):
    assert load_public_key(keys[1]).key_size == 2048
    assert load_public_key(keys[1].replace("\n", "\\n")).key_size == 2048  # an env file's escaped newlines
    with pytest.raises(ValueError, match="not set"):
        load_public_key("  ")
    with pytest.raises(ValueError, match="not a PEM public key"):
        load_public_key("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----")
    ec_pem = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    with pytest.raises(ValueError, match="not an RSA public key"):
        load_public_key(ec_pem)
    with pytest.raises(ValueError) as info:
        load_public_key(keys[0][:40] + "garbage")  # even a private key paste: the error never echoes it
    assert keys[0][30:40] not in str(info.value)
