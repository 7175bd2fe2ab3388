"""Unit tests of the pure parts of the HTTP app: instance tokens, webhook
signatures and events, the per-instance rate limiter."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import datetime, timedelta, timezone

import pytest
from starlette.datastructures import Headers

from creditsync_pipeline.server import tokens, webhooks
from creditsync_pipeline.server.ratelimit import RateLimiter
from creditsync_pipeline.server.tokens import (
    TokenError,
    b64url_decode,
    b64url_encode,
    sign_instance_token,
    token_from_headers,
    verify_instance_token,
)

SECRET = "app-SECRET-7d1f0c9e"
NOW = datetime(2024, 5, 1, 12, 0, 0, tzinfo=timezone.utc)


def _raw_token(data: bytes | str, secret: str = SECRET) -> str:
    """A correctly signed token around arbitrary data (to reach the post-signature checks)."""
    data_part = b64url_encode(data.encode() if isinstance(data, str) else data)
    sig = hmac.new(secret.encode(), data_part.encode(), hashlib.sha256).digest()
    return f"{b64url_encode(sig)}.{data_part}"


def _reject(token, code="invalid_token", now=NOW) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify_instance_token(token, SECRET, now=now)
    err = info.value
    assert err.code == code, err.message
    assert SECRET not in err.message
    if token:
        for part in str(token).split("."):
            if len(part) >= 8:
                assert part not in err.message, "a token part leaked into the error message"
    return err


# -- instance tokens ---------------------------------------------------------------------------


def test_sign_and_verify_round_trip_in_the_documented_format():
    token = sign_instance_token(SECRET, "abc123", NOW, uid="u-1", permissions="OWNER")
    sig_part, data_part = token.split(".")
    assert "=" not in token
    data = json.loads(base64.urlsafe_b64decode(data_part + "=" * (-len(data_part) % 4)))
    assert data == {"instanceId": "abc123", "signDate": "2024-05-01T12:00:00.000Z", "uid": "u-1", "permissions": "OWNER"}
    # signature = HMAC-SHA256(secret, the data part as sent), base64url without padding
    expected = hmac.new(SECRET.encode(), data_part.encode(), hashlib.sha256).digest()
    assert base64.urlsafe_b64decode(sig_part + "=") == expected
    verified = verify_instance_token(token, SECRET, now=NOW + timedelta(hours=1))
    assert verified.instance_id == "abc123"
    assert verified.sign_date == NOW
    assert token not in repr(verified)


def test_a_token_made_elsewhere_with_offsets_and_micros_verifies():
    token = _raw_token(json.dumps({"instanceId": "x-1", "signDate": "2024-05-01T14:00:00.123456+02:00", "extra": [1]}))
    assert verify_instance_token(token, SECRET, now=NOW).instance_id == "x-1"


def test_signDate_older_than_24_hours_is_stale():
    assert verify_instance_token(sign_instance_token(SECRET, "a", NOW - timedelta(hours=24)), SECRET, now=NOW)
    _reject(sign_instance_token(SECRET, "a", NOW - timedelta(hours=24, seconds=1)), "expired_token")
    _reject(sign_instance_token(SECRET, "a", NOW - timedelta(days=400)), "expired_token")


def test_signDate_far_in_the_future_is_refused_but_clock_skew_is_tolerated():
    assert verify_instance_token(sign_instance_token(SECRET, "a", NOW + timedelta(minutes=4)), SECRET, now=NOW)
    _reject(sign_instance_token(SECRET, "a", NOW + timedelta(minutes=6)))


@pytest.mark.parametrize("token", [None, "", "   "])
def test_missing_token(token):
    _reject(token, "missing_token")


def test_wrong_secret_and_tampering_are_refused():
    good = sign_instance_token(SECRET, "abc123", NOW)
    _reject(sign_instance_token("another-secret", "abc123", NOW))
    sig, data = good.split(".")
    forged_data = b64url_encode(json.dumps({"instanceId": "victim", "signDate": "2024-05-01T12:00:00.000Z"}).encode())
    _reject(f"{sig}.{forged_data}")  # someone else's instance under my signature
    _reject(f"{data}.{sig}")  # parts swapped
    _reject(f"{sig[:-1]}.{data}")  # truncated signature
    _reject(f"{b64url_encode(b'x' * 32)}.{data}")  # right length, wrong MAC


@pytest.mark.parametrize(
    "mangle",
    [
        lambda s, d: f"{s}={'.'}{d}",  # padding
        lambda s, d: f"{s}.{d}==",
        lambda s, d: f"{s}.{d}.",  # three parts
        lambda s, d: f"{s}{d}",  # no dot
        lambda s, d: f"{s}..{d}",
        lambda s, d: f"{s.replace('-', '+').replace('_', '/')}x.{d}",  # standard alphabet
        lambda s, d: f"{s} .{d}",
        lambda s, d: f"{s}.{d[:5]}\u00e9{d[5:]}",
        lambda s, d: f"{s}.{d}\x00",
        lambda s, d: "x" * (tokens.MAX_TOKEN_LENGTH + 1),
    ],
)
def test_malformed_tokens_are_refused(mangle):
    sig, data = sign_instance_token(SECRET, "abc123", NOW).split(".")
    _reject(mangle(sig, data))


def test_non_canonical_base64_of_the_signature_is_refused():
    """43 base64 chars carry 258 bits: the last char has 2 unused bits. A different
    last char that decodes to the same 32 bytes must not be accepted."""
    good = sign_instance_token(SECRET, "abc123", NOW)
    sig, data = good.split(".")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    twin = alphabet[last | 1] if alphabet[last | 1] != sig[-1] else alphabet[last & ~1]
    assert base64.urlsafe_b64decode(sig[:-1] + twin + "=") == base64.urlsafe_b64decode(sig + "=")
    _reject(f"{sig[:-1]}{twin}.{data}")
    with pytest.raises(ValueError):
        b64url_decode(sig[:-1] + twin)


@pytest.mark.parametrize(
    "data",
    [
        b"not json",
        b"\xff\xfe",
        "[1, 2]",
        "null",
        json.dumps({"signDate": "2024-05-01T12:00:00Z"}),
        json.dumps({"instanceId": 123, "signDate": "2024-05-01T12:00:00Z"}),
        json.dumps({"instanceId": "", "signDate": "2024-05-01T12:00:00Z"}),
        json.dumps({"instanceId": "  ", "signDate": "2024-05-01T12:00:00Z"}),
        json.dumps({"instanceId": "a\nb", "signDate": "2024-05-01T12:00:00Z"}),
        json.dumps({"instanceId": "x" * 300, "signDate": "2024-05-01T12:00:00Z"}),
        '{"instanceId": "\\ud800", "signDate": "2024-05-01T12:00:00Z"}',
        json.dumps({"instanceId": "abc"}),
        json.dumps({"instanceId": "abc", "signDate": 1714564800}),
        json.dumps({"instanceId": "abc", "signDate": "yesterday"}),
        json.dumps({"instanceId": "abc", "signDate": "2024-05-01T12:00:00"}),  # no timezone
        json.dumps({"instanceId": "abc", "signDate": "0001-01-01T00:00:00+14:00"}),
        "[" * 100_000,
    ],
)
def test_signed_but_unusable_data_is_refused(data):
    _reject(_raw_token(data))


def test_token_from_headers():
    token = sign_instance_token(SECRET, "abc123", NOW)
    assert token_from_headers(Headers({"x-wix-instance": token})) == token
    assert token_from_headers(Headers({"authorization": f"Bearer {token}"})) == token
    assert token_from_headers(Headers({"authorization": f"bearer   {token} "})) == token
    # x-wix-instance wins over Authorization
    assert token_from_headers(Headers({"x-wix-instance": token, "authorization": "Bearer other"})) == token
    assert token_from_headers(Headers({})) is None
    assert token_from_headers(Headers({"x-wix-instance": " "})) is None
    assert token_from_headers(Headers({"authorization": "Bearer"})) is None
    with pytest.raises(TokenError) as info:
        token_from_headers(Headers({"authorization": f"Basic {token}"}))
    assert token not in info.value.message


def test_tokens_command_line_signs_and_verifies(monkeypatch, capsys):
    monkeypatch.setenv("CREDITSYNC_APP_SECRET", SECRET)
    assert tokens.main(["sign", "abc123"]) == 0
    token = capsys.readouterr().out.strip()
    assert verify_instance_token(token, SECRET).instance_id == "abc123"
    assert tokens.main(["sign", "abc123", "--sign-date", "2024-05-01T12:00:00Z"]) == 0
    assert capsys.readouterr().out.strip() == sign_instance_token(SECRET, "abc123", NOW)
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(token + "\n"))
    assert tokens.main(["verify"]) == 0
    assert capsys.readouterr().out.strip() == "abc123"
    monkeypatch.delenv("CREDITSYNC_APP_SECRET")
    with pytest.raises(SystemExit) as info:
        tokens.main(["sign", "abc123"])
    assert "CREDITSYNC_APP_SECRET is not set" in str(info.value)


# -- webhook signatures and events ------------------------------------------------------------

WH_SECRET = "whsec-SECRET-42aa"
BODY = b'{"event_id": "evt_1", "type": "subscription.updated", "instance_id": "abc123"}'
T = 1_714_564_800


def _wh_reject(header, body=BODY, now=T, code="invalid_signature"):
    with pytest.raises(webhooks.WebhookError) as info:
        webhooks.verify_webhook_signature(header, body, WH_SECRET, now=now)
    assert info.value.status == 401
    assert info.value.code == code
    assert WH_SECRET not in info.value.message
    return info.value


def test_webhook_signature_round_trip_and_scheme():
    header = webhooks.sign_webhook(WH_SECRET, BODY, T)
    mac = hmac.new(WH_SECRET.encode(), f"{T}.".encode() + BODY, hashlib.sha256).hexdigest()
    assert header == f"t={T},v1={mac}"
    webhooks.verify_webhook_signature(header, BODY, WH_SECRET, now=T + 299)
    webhooks.verify_webhook_signature(header, BODY, WH_SECRET, now=T - 299)
    # rotation: several v1 entries, one valid; unknown schemes ignored
    webhooks.verify_webhook_signature(f"t={T},v0=abc,v1={'0' * 64},v1={mac}", BODY, WH_SECRET, now=T)


def test_webhook_signature_rejections():
    good = webhooks.sign_webhook(WH_SECRET, BODY, T)
    _wh_reject(None)
    _wh_reject("")
    _wh_reject(good, body=BODY + b" ")  # body changed
    _wh_reject(webhooks.sign_webhook("other", BODY, T))
    _wh_reject(good.replace(f"t={T}", f"t={T + 1}"))  # timestamp is signed
    _wh_reject(good, now=T + 301, code="stale_signature")
    _wh_reject(good, now=T - 301, code="stale_signature")
    for header in [f"t={T}", good.split(",")[1], "garbage", f"t=abc,{good.split(',')[1]}",
                   f"t={T},v1=zz", f"t={T},t={T},{good.split(',')[1]}", "x" * 5000]:
        _wh_reject(header)


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"\xff",
        b"[]",
        b'{"type": "x", "instance_id": "a"}',
        b'{"event_id": "", "type": "x"}',
        b'{"event_id": 5, "type": "x"}',
        b'{"event_id": "e\\u0000", "type": "x"}',
        b'{"event_id": "\\ud800", "type": "x"}',
        b'{"event_id": "e1"}',
        b'{"event_id": "e1", "type": "x", "instance_id": 7}',
        b'{"event_id": "e1", "type": "x", "instance_id": "a\\nb"}',
        b'{"event_id": "e1", "type": "x", "instance_id": "\\udc00"}',
        b'{"event_id": "e1", "type": "x", "note": "\x00"}',
    ],
)
def test_unusable_events_are_400(body):
    with pytest.raises(webhooks.WebhookError) as info:
        webhooks.parse_event(body)
    assert (info.value.status, info.value.code) == (400, "invalid_event")


def test_event_parsing_keeps_the_raw_body():
    event = webhooks.parse_event(BODY)
    assert (event.event_id, event.event_type, event.instance_id, event.payload) == (
        "evt_1", "subscription.updated", "abc123", BODY.decode())
    assert webhooks.parse_event(b'{"event_id": "e2", "type": "ping"}').instance_id is None


# -- rate limiter --------------------------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_sliding_window_and_retry_after():
    clock = FakeClock()
    limiter = RateLimiter(2, 60, clock=clock)
    assert limiter.acquire("a").allowed
    clock.now += 10
    assert limiter.acquire("a").allowed
    refused = limiter.acquire("a")
    assert not refused.allowed and refused.retry_after == 50
    assert limiter.acquire("b").allowed  # per instance
    clock.now += 49.5
    assert limiter.acquire("a").retry_after == 1  # rounded up, never 0
    clock.now += 0.5
    assert limiter.acquire("a").allowed  # the first hit left the window
    assert not limiter.acquire("a").allowed


def test_rate_limiter_memory_is_bounded():
    clock = FakeClock()
    limiter = RateLimiter(1, 60, clock=clock, max_tracked=50)
    for i in range(500):
        limiter.acquire(f"i{i}")
    assert len(limiter) <= 51
    clock.now += 61
    limiter.acquire("fresh")
    assert len(limiter) == 1


def test_rate_limiter_rejects_nonsense():
    with pytest.raises(ValueError):
        RateLimiter(0)
    with pytest.raises(ValueError):
        RateLimiter(1, 0)
