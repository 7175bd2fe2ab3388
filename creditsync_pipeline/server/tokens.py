"""Signed instance tokens: the app's proof of "which instance is calling".

Format (SPEC "Manual sync"; the site-builder marketplace's ``instance`` token)::

    <signature>.<data>

* ``data`` = base64url, without padding, of a JSON object with at least
  ``instanceId`` (string) and ``signDate`` (ISO-8601 with a timezone, e.g.
  ``2024-05-01T12:00:00.000Z``); other fields are ignored;
* ``signature`` = base64url, without padding, of
  ``HMAC-SHA256(app secret, data part exactly as sent)``.

Verification order: shape and alphabet, then the signature (constant-time),
and only then the JSON is parsed, so nothing an attacker wrote is
interpreted before it is authenticated. A token is stale when its
``signDate`` is older than 24 hours; one dated more than 5 minutes in the
future (clock skew) is refused too.

No message raised here ever contains the token, a part of it or the secret.

Command line (the secret is read from ``CREDITSYNC_APP_SECRET``, never from
an argument, so it stays out of shell history and process listings)::

    python -m creditsync_pipeline.server.tokens sign abc123 [--sign-date ISO]
    python -m creditsync_pipeline.server.tokens verify < token.txt
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import hmac
import json
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from ..ids import instance_id_problem

__all__ = [
    "MAX_AGE",
    "MAX_FUTURE_SKEW",
    "MAX_TOKEN_LENGTH",
    "InstanceToken",
    "TokenError",
    "b64url_decode",
    "b64url_encode",
    "sign_instance_token",
    "verify_instance_token",
]

#: a token whose ``signDate`` is older than this is stale (SPEC: 24 h)
MAX_AGE = timedelta(hours=24)
#: a ``signDate`` further in the future than this is refused (clock skew allowance)
MAX_FUTURE_SKEW = timedelta(minutes=5)
#: longer tokens are refused before any decoding (real ones are a few hundred bytes)
MAX_TOKEN_LENGTH = 8192

_B64URL_RE = re.compile(r"[A-Za-z0-9_-]+")
_DIGEST_SIZE = hashlib.sha256().digest_size
#: HTTP optional whitespace; nothing else is trimmed off a token
_OWS = " \t"


class TokenError(Exception):
    """A token that does not authenticate anyone.

    ``code`` is the JSON ``error`` value (``missing_token``, ``invalid_token``,
    ``expired_token``); the message is one line, safe to show the caller and to
    log: it never contains the token or the secret.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class InstanceToken:
    """A verified token: whom it names and when it was signed."""

    instance_id: str
    sign_date: datetime

    def __repr__(self) -> str:
        return f"InstanceToken(instance_id={self.instance_id!r}, sign_date={self.sign_date.isoformat()})"


# -- base64url without padding -----------------------------------------------------------------


def b64url_encode(raw: bytes) -> str:
    """base64url of ``raw`` without ``=`` padding."""
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    """Strictly decode unpadded base64url; ValueError on anything else.

    Strict means: only the URL-safe alphabet, no padding, no whitespace, a
    length that base64 can produce, and the canonical encoding (unused low
    bits zero) -- so one byte string has exactly one textual form and a
    mutated character can never decode to the same bytes.
    """
    if not text or not _B64URL_RE.fullmatch(text) or len(text) % 4 == 1:
        raise ValueError("not unpadded base64url")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("not unpadded base64url") from None
    if b64url_encode(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


# -- signing -----------------------------------------------------------------------------------


def _key(secret: str | bytes) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the app secret is empty")
    return key


def _signature(secret: str | bytes, data_part: str) -> bytes:
    return hmac.new(_key(secret), data_part.encode("ascii"), hashlib.sha256).digest()


def format_sign_date(moment: datetime) -> str:
    """``signDate`` as the marketplace writes it: UTC, milliseconds, ``Z``."""
    if moment.tzinfo is None:
        raise ValueError("sign_date must be timezone-aware")
    utc = moment.astimezone(timezone.utc)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"


def sign_instance_token(
    secret: str | bytes,
    instance_id: str,
    sign_date: datetime | None = None,
    **extra: Any,
) -> str:
    """A token for ``instance_id`` signed with ``secret`` (tests, demo, README).

    ``sign_date`` defaults to now; ``extra`` adds fields to the data JSON
    (the real tokens carry more, e.g. ``uid`` and ``permissions``).
    """
    data = {"instanceId": instance_id, "signDate": format_sign_date(sign_date or datetime.now(timezone.utc)), **extra}
    data_part = b64url_encode(json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8"))
    return f"{b64url_encode(_signature(secret, data_part))}.{data_part}"


# -- verification ------------------------------------------------------------------------------


def _invalid(message: str) -> TokenError:
    return TokenError("invalid_token", message)


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")  # a lone surrogate (JSON "\\ud800") can be neither stored nor sent
    except UnicodeEncodeError:
        return False
    return True


def _parse_sign_date(value: Any) -> datetime:
    if not isinstance(value, str) or not value or len(value) > 64:
        raise _invalid("token signDate is missing or not a string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _invalid("token signDate is not an ISO-8601 date-time") from None
    if moment.tzinfo is None or moment.utcoffset() is None:
        raise _invalid("token signDate has no timezone")
    try:
        return moment.astimezone(timezone.utc)
    except (OverflowError, ValueError):
        raise _invalid("token signDate is out of range") from None


def verify_instance_token(
    token: str | None,
    secret: str | bytes,
    *,
    now: datetime | None = None,
    max_age: timedelta = MAX_AGE,
) -> InstanceToken:
    """Verify ``token`` and return whom it names; raise :class:`TokenError` otherwise."""
    key = _key(secret)
    token = None if token is None else str(token).strip(_OWS)
    if not token:
        raise TokenError("missing_token", "no instance token: send it in the x-wix-instance header or as a Bearer token")
    if len(token) > MAX_TOKEN_LENGTH:
        raise _invalid("token is too long")
    parts = token.split(".")
    if len(parts) != 2:
        raise _invalid("token is not of the form <signature>.<data>")
    signature_part, data_part = parts
    try:
        signature = b64url_decode(signature_part)
        b64url_decode(data_part)  # the alphabet check also makes data_part ASCII
    except ValueError:
        raise _invalid("token parts are not unpadded base64url") from None
    if len(signature) != _DIGEST_SIZE:
        raise _invalid("token signature does not match")
    expected = hmac.new(key, data_part.encode("ascii"), hashlib.sha256).digest()
    if not hmac.compare_digest(signature, expected):
        raise _invalid("token signature does not match")

    # Authenticated from here on: the data was written by someone holding the secret.
    try:
        data = json.loads(b64url_decode(data_part).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise _invalid("token data is not a JSON object") from None
    if not isinstance(data, dict):
        raise _invalid("token data is not a JSON object")
    instance_id = data.get("instanceId")
    if instance_id_problem(instance_id) is not None or not instance_id.strip() or not _encodable(instance_id):
        raise _invalid("token instanceId is missing or unusable")
    sign_date = _parse_sign_date(data.get("signDate"))
    current = now or datetime.now(timezone.utc)
    if sign_date < current - max_age:
        raise TokenError("expired_token", "token is stale (signDate older than 24 hours); reload the app to get a fresh one")
    if sign_date > current + MAX_FUTURE_SKEW:
        raise _invalid("token signDate is in the future")
    return InstanceToken(instance_id=instance_id, sign_date=sign_date)


def token_from_headers(headers: Any) -> str | None:
    """The token of a request: ``x-wix-instance``, else ``Authorization: Bearer``.

    ``headers`` is any case-insensitive mapping (Starlette's ``Headers``).
    Returns None when neither carries one; an ``Authorization`` header with
    another scheme raises :class:`TokenError`.
    """
    direct = (headers.get("x-wix-instance") or "").strip(_OWS)
    if direct:
        return direct
    authorization = (headers.get("authorization") or "").strip(_OWS)
    if not authorization:
        return None
    scheme, _, credentials = authorization.partition(" ")
    if scheme.lower() != "bearer":
        raise _invalid("unsupported Authorization scheme; use Bearer <instance token>")
    return credentials.strip(_OWS) or None


# -- command line ------------------------------------------------------------------------------


def _secret_from_env() -> str:
    secret = os.environ.get("CREDITSYNC_APP_SECRET", "")
    if not secret:
        raise SystemExit("tokens: error: CREDITSYNC_APP_SECRET is not set")
    return secret


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m creditsync_pipeline.server.tokens",
        description="Sign or verify instance tokens with CREDITSYNC_APP_SECRET (read from the environment).",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sign = sub.add_parser("sign", help="print a token for INSTANCE_ID")
    sign.add_argument("instance_id", metavar="INSTANCE_ID")
    sign.add_argument("--sign-date", help="ISO-8601 signDate (default: now)")
    sub.add_parser("verify", help="verify the token read from stdin; print the instance id")
    args = parser.parse_args(argv)
    secret = _secret_from_env()
    if args.command == "sign":
        when = None
        if args.sign_date:
            try:
                when = _parse_sign_date(args.sign_date)
            except TokenError as exc:
                raise SystemExit(f"tokens: error: --sign-date: {exc.message}") from None
        print(sign_instance_token(secret, args.instance_id, when))
        return 0
    try:
        verified = verify_instance_token(sys.stdin.read().strip(), secret)
    except TokenError as exc:
        print(f"tokens: error: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(verified.instance_id)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
