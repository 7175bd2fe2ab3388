"""The billing provider's webhook: signature scheme and event shape.

Signature (header ``X-Creditsync-Signature``, secret ``CREDITSYNC_WEBHOOK_SECRET``
shared with the provider)::

    X-Creditsync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

* the HMAC covers the timestamp, a ``.`` and the request body *byte for byte*
  as sent (verify before parsing; never re-serialise the JSON);
* ``t`` must be within 5 minutes of the receiver's clock (replay window; a
  replay inside the window is harmless: landing is idempotent on ``event_id``);
* several ``v1=`` entries may be sent (secret rotation); one match is enough;
  comparison is constant-time.

Event body: a JSON object with ``event_id`` (non-empty string, the
idempotency key), ``type`` (non-empty string) and ``instance_id`` (string, or
null/absent for events that name no instance). Other fields are kept: the raw
body is stored as the row's ``payload``.

Command line (secret from the environment)::

    python -m creditsync_pipeline.server.webhooks sign < event.json   # prints the header value
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import os
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ..ids import instance_id_problem

__all__ = [
    "MAX_EVENT_BYTES",
    "SIGNATURE_HEADER",
    "TOLERANCE_SECONDS",
    "WebhookError",
    "WebhookEvent",
    "parse_event",
    "sign_webhook",
    "verify_webhook_signature",
]

SIGNATURE_HEADER = "X-Creditsync-Signature"
#: accepted distance between ``t`` and the receiver's clock, seconds
TOLERANCE_SECONDS = 300
#: larger bodies are refused (413) before they are read to the end
MAX_EVENT_BYTES = 256 * 1024
MAX_EVENT_ID_LENGTH = 256
MAX_EVENT_TYPE_LENGTH = 128

_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
_T_RE = re.compile(r"[0-9]{1,12}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


class WebhookError(Exception):
    """A webhook that is refused; ``status``/``code`` are the HTTP answer, the message is safe."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WebhookEvent:
    event_id: str
    event_type: str
    instance_id: str | None
    payload: str


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def _mac(key: bytes, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, timestamp.encode("ascii") + b"." + body, hashlib.sha256).digest()


def sign_webhook(secret: str | bytes, body: bytes, timestamp: int | None = None) -> str:
    """The ``X-Creditsync-Signature`` value for ``body`` (tests, demo, README)."""
    t = str(int(time.time() if timestamp is None else timestamp))
    return f"t={t},v1={_mac(_key(secret), t, body).hex()}"


def _bad_signature(message: str) -> WebhookError:
    return WebhookError(401, "invalid_signature", message)


def verify_webhook_signature(
    header: str | None,
    body: bytes,
    secret: str | bytes,
    *,
    now: float | None = None,
    tolerance: int = TOLERANCE_SECONDS,
    header_name: str = SIGNATURE_HEADER,
) -> None:
    """Raise :class:`WebhookError` (401) unless ``header`` signs ``body``.

    ``header_name`` names the header in messages: Stripe's ``Stripe-Signature`` is the same
    scheme (:mod:`.stripe`).
    """
    key = _key(secret)
    if header is None or not header.strip():
        raise _bad_signature(f"missing {header_name} header")
    if len(header) > 4096:
        raise _bad_signature(f"{header_name} header is too long")
    timestamp: str | None = None
    candidates: list[bytes] = []
    for item in header.split(","):
        name, sep, value = item.strip().partition("=")
        if not sep:
            raise _bad_signature(f"{header_name} header is malformed")
        if name == "t":
            if timestamp is not None or not _T_RE.fullmatch(value):
                raise _bad_signature(f"{header_name} header has a bad timestamp")
            timestamp = value
        elif name == "v1":
            if not _HEX64_RE.fullmatch(value):
                raise _bad_signature(f"{header_name} header has a malformed v1 signature")
            candidates.append(bytes.fromhex(value))
        # other schemes (v0, future versions) are ignored, as providers do
    if timestamp is None or not candidates:
        raise _bad_signature(f"{header_name} header needs t= and v1=")
    current = time.time() if now is None else now
    if abs(current - int(timestamp)) > tolerance:
        raise WebhookError(401, "stale_signature", f"signature timestamp is more than {tolerance} s from the receiver's clock")
    expected = _mac(key, timestamp, body)
    # Compare every candidate (no early exit that depends on secret material).
    matched = False
    for candidate in candidates:
        matched |= hmac.compare_digest(candidate, expected)
    if not matched:
        raise _bad_signature("signature does not match")


def _bad_event(message: str) -> WebhookError:
    return WebhookError(400, "invalid_event", message)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")  # lone surrogates from "\\ud800" escapes cannot be stored
    except UnicodeEncodeError:
        return False
    return True


def _usable_text(value: Any, limit: int) -> bool:
    return (
        isinstance(value, str)
        and bool(value.strip())
        and len(value) <= limit
        and not _CONTROL_RE.search(value)
        and _encodable(value)
    )


def parse_event(body: bytes) -> WebhookEvent:
    """The event of an authenticated body; :class:`WebhookError` (400) when unusable."""
    try:
        text = body.decode("utf-8")
        doc = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise _bad_event("body is not UTF-8 JSON") from None
    if not isinstance(doc, dict):
        raise _bad_event("body is not a JSON object")
    event_id = doc.get("event_id")
    if not _usable_text(event_id, MAX_EVENT_ID_LENGTH):
        raise _bad_event(f"event_id must be a non-empty string of at most {MAX_EVENT_ID_LENGTH} characters")
    event_type = doc.get("type")
    if not _usable_text(event_type, MAX_EVENT_TYPE_LENGTH):
        raise _bad_event(f"type must be a non-empty string of at most {MAX_EVENT_TYPE_LENGTH} characters")
    instance_id = doc.get("instance_id")
    if instance_id is not None and (instance_id_problem(instance_id) is not None or not _encodable(instance_id)):
        raise _bad_event("instance_id must be a usable instance id or null")
    if "\x00" in text:  # PostgreSQL TEXT cannot hold NUL
        raise _bad_event("body contains a NUL character")
    return WebhookEvent(event_id=event_id, event_type=event_type, instance_id=instance_id, payload=text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.server.webhooks",
        description="Sign a webhook body with CREDITSYNC_WEBHOOK_SECRET (read from the environment).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sign = sub.add_parser("sign", help="print the X-Creditsync-Signature value for the body on stdin")
    sign.add_argument("--timestamp", type=int, help="unix seconds (default: now)")
    args = parser.parse_args(argv)
    secret = os.environ.get("CREDITSYNC_WEBHOOK_SECRET", "")
    if not secret:
        raise SystemExit("webhooks: error: CREDITSYNC_WEBHOOK_SECRET is not set")
    body: Any = sys.stdin.buffer.read()
    print(sign_webhook(secret, body, args.timestamp))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
