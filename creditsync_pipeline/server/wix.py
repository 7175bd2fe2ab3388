"""Wix webhooks: verify the signed body and read the event (pure; no HTTP framework).

Wix posts every webhook as a JWT -- the whole request body -- signed RS256 with the
app's key. It is verified with the app's public key (``WIX_WEBHOOK_PUBLIC_KEY``, from
the app dashboard; there is no JWKS endpoint), on the raw body, by PyJWT:

* RS256 only: a token whose header names any other algorithm is refused before any key
  is used (``alg: none``, or HS256 with the public key as the HMAC secret -- the classic
  key-confusion forgery), and PyJWT is given ``algorithms=["RS256"]`` as well;
* an ``exp`` in the past (60 s leeway for clock skew) is refused; a token without one is
  accepted (Wix redelivers for ~47 h);
* a signature by another key, or a body that is not a JWT, is refused.

Each refusal is a :class:`~.webhooks.WebhookError` with a status (401 for signature,
algorithm and expiry; 400 for a body that is not a JWT or an event that cannot be
read), a code and a one-line message that never repeats the body.

The verified claims carry ``data``, a JSON string ``{"eventType", "instanceId",
"data": "<JSON string>"}``. The event (:class:`~.webhooks.WebhookEvent`):

* ``event_type`` = ``eventType``;
* ``instance_id`` = ``instanceId``: every event that names an instance is a poke (SPEC:
  the billing events -- paid plan purchased, changed, auto-renewal cancelled,
  reactivated, converted to paid, transferred -- and app installed / removed all carry
  it); an event without one lands with no instance;
* ``event_id`` = the event's own id where Wix gives one (``id`` of the inner data, as
  in Wix's standard webhook format), else ``wix-`` + a SHA-256 of (instance, type, the
  inner data exactly as sent): a redelivery -- up to ~47 h later, out of order -- gets
  the same id, so landing it is a no-op. (Legacy billing payloads carry no id; two
  distinct events with identical inner data would share one, which is harmless: each
  is only a poke and the sync reads the truth from Wix.)
* ``payload`` = the ``data`` claim as sent (the envelope, JSON text).
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from ..billing import instance_id_problem
from .webhooks import MAX_EVENT_BYTES, MAX_EVENT_ID_LENGTH, MAX_EVENT_TYPE_LENGTH, WebhookError, WebhookEvent

__all__ = [
    "ALGORITHM",
    "LEEWAY_SECONDS",
    "WixWebhookVerifier",
    "generate_key_pair",
    "load_public_key",
    "parse_wix_webhook",
    "sign_wix_webhook",
]

ALGORITHM = "RS256"
#: tolerated clock skew on ``exp`` / ``iat``, seconds
LEEWAY_SECONDS = 60


def load_public_key(pem: str | bytes) -> rsa.RSAPublicKey:
    """The app's webhook public key from PEM text; ValueError (one line) when it is not an RSA key.

    A PEM whose line breaks were written as ``\\n`` (an env file) is accepted too.
    """
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes) else str(pem)
    text = text.strip()
    if "\n" not in text and "\\n" in text:
        text = text.replace("\\n", "\n")
    if not text:
        raise ValueError("WIX_WEBHOOK_PUBLIC_KEY is not set")
    try:
        key = serialization.load_pem_public_key(text.encode("ascii", "replace"))
    except (ValueError, TypeError):
        raise ValueError(
            "WIX_WEBHOOK_PUBLIC_KEY is not a PEM public key (-----BEGIN PUBLIC KEY----- ...)"
        ) from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError("WIX_WEBHOOK_PUBLIC_KEY is not an RSA public key (Wix signs webhooks RS256)")
    return key


def _refused(status: int, code: str, message: str) -> WebhookError:
    return WebhookError(status, code, message)


class WixWebhookVerifier:
    """Verifies Wix webhook bodies against one public key (loaded once)."""

    def __init__(self, public_key_pem: str | bytes, *, leeway: float = LEEWAY_SECONDS) -> None:
        self._key = load_public_key(public_key_pem)
        self._leeway = leeway

    def __repr__(self) -> str:
        return f"WixWebhookVerifier({ALGORITHM}, {self._key.key_size}-bit key)"

    def claims(self, body: bytes | str) -> dict[str, Any]:
        """The verified claims of ``body``; :class:`WebhookError` when it is refused."""
        if isinstance(body, bytes):
            if len(body) > MAX_EVENT_BYTES:
                raise _refused(413, "payload_too_large", f"webhook bodies are limited to {MAX_EVENT_BYTES} bytes")
            try:
                token = body.decode("ascii").strip()
            except UnicodeDecodeError:
                raise _refused(400, "invalid_jwt", "the body is not a JWT") from None
        else:
            token = body.strip()
        if token.count(".") != 2:
            raise _refused(400, "invalid_jwt", "the body is not a JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise _refused(400, "invalid_jwt", "the body is not a JWT (unreadable header)") from None
        alg = header.get("alg")
        if alg != ALGORITHM:
            shown = alg if isinstance(alg, str) and alg.isascii() and alg.isalnum() and len(alg) <= 10 else "?"
            raise _refused(401, "invalid_algorithm", f"the JWT is signed {shown}; only {ALGORITHM} is accepted")
        try:
            claims = jwt.decode(
                token, self._key, algorithms=[ALGORITHM], leeway=self._leeway,
                options={"verify_aud": False, "verify_iss": False},
            )
        except jwt.ExpiredSignatureError:
            raise _refused(401, "expired_token", "the JWT has expired") from None
        except jwt.InvalidSignatureError:
            raise _refused(401, "invalid_signature", "the JWT signature does not match WIX_WEBHOOK_PUBLIC_KEY") from None
        except jwt.InvalidAlgorithmError:
            raise _refused(401, "invalid_algorithm", f"only {ALGORITHM} is accepted") from None
        except jwt.ImmatureSignatureError:
            raise _refused(401, "immature_token", "the JWT is not valid yet (iat or nbf in the future)") from None
        except jwt.PyJWTError as exc:
            # DecodeError & co: a malformed segment, or claims that are not a JSON object
            raise _refused(400, "invalid_jwt", f"the body is not a usable JWT ({type(exc).__name__})") from None
        return claims

    def parse(self, body: bytes | str) -> WebhookEvent:
        """Verify ``body`` and return its event (see the module docstring)."""
        return event_from_claims(self.claims(body))


def _bad_event(message: str) -> WebhookError:
    return WebhookError(400, "invalid_event", message)


def event_from_claims(claims: dict[str, Any]) -> WebhookEvent:
    """The event of verified claims; :class:`WebhookError` (400) when it cannot be read."""
    envelope_text = claims.get("data")
    if isinstance(envelope_text, dict):  # tolerate an object where Wix sends a JSON string
        envelope_text = json.dumps(envelope_text, separators=(",", ":"), sort_keys=True)
    if not isinstance(envelope_text, str):
        raise _bad_event("the JWT has no 'data' claim (a JSON string)")
    try:
        envelope = json.loads(envelope_text)
    except (ValueError, RecursionError):
        raise _bad_event("the 'data' claim is not JSON") from None
    if not isinstance(envelope, dict):
        raise _bad_event("the 'data' claim is not a JSON object")
    event_type = envelope.get("eventType")
    if not _text(event_type, MAX_EVENT_TYPE_LENGTH):
        raise _bad_event(f"eventType must be a non-empty string of at most {MAX_EVENT_TYPE_LENGTH} characters")
    instance_id = envelope.get("instanceId")
    if instance_id == "":
        instance_id = None
    if instance_id is not None and (instance_id_problem(instance_id) is not None or not _encodable(instance_id)):
        raise _bad_event("instanceId must be a usable instance id or absent")
    inner = envelope.get("data")
    inner_text = inner if isinstance(inner, str) else json.dumps(inner, separators=(",", ":"), sort_keys=True)
    event_id = _own_id(inner)
    if event_id is None:
        digest = hashlib.sha256(
            json.dumps([instance_id, event_type, inner_text], separators=(",", ":")).encode("utf-8", "surrogatepass")
        ).hexdigest()
        event_id = f"wix-{digest[:48]}"
    if "\x00" in envelope_text or not _encodable(envelope_text):
        raise _bad_event("the event holds a NUL character or an unpaired surrogate")
    return WebhookEvent(event_id=event_id, event_type=event_type, instance_id=instance_id, payload=envelope_text)


def _own_id(inner: Any) -> str | None:
    """The ``id`` of the inner data (Wix's standard format), when it is a usable one."""
    doc = inner
    if isinstance(inner, str):
        try:
            doc = json.loads(inner)
        except (ValueError, RecursionError):
            return None
    if isinstance(doc, dict):
        value = doc.get("id")
        if _text(value, MAX_EVENT_ID_LENGTH):
            return value
    return None


def _encodable(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(value: Any, limit: int) -> bool:
    return (
        isinstance(value, str) and bool(value.strip()) and len(value) <= limit
        and value.isprintable() and _encodable(value)
    )


def parse_wix_webhook(body: bytes | str, public_key_pem: str | bytes) -> WebhookEvent:
    """Verify a Wix webhook body with the app's public key and return its event.

    ValueError for an unusable key (configuration); :class:`WebhookError` for a refused body.
    A receiver verifying many bodies keeps one :class:`WixWebhookVerifier` instead.
    """
    return WixWebhookVerifier(public_key_pem).parse(body)


def sign_wix_webhook(
    private_key_pem: str | bytes,
    *,
    event_type: str,
    instance_id: str | None,
    data: Any = None,
    iat: int | None = None,
    expires_in: int | None = 3600,
    algorithm: str = ALGORITHM,
) -> str:
    """A webhook body as Wix sends it (tests and the demo): the signed JWT.

    ``data`` is the event payload (an object, serialised to a JSON string, or a string
    as given). ``expires_in`` None leaves ``exp`` out.
    """
    envelope: dict[str, Any] = {"eventType": event_type}
    if instance_id is not None:
        envelope["instanceId"] = instance_id
    envelope["data"] = data if isinstance(data, str) else json.dumps(data if data is not None else {})
    issued = int(time.time()) if iat is None else int(iat)
    claims: dict[str, Any] = {"data": json.dumps(envelope), "iat": issued}
    if expires_in is not None:
        claims["exp"] = issued + int(expires_in)
    key: Any = private_key_pem
    if algorithm.startswith(("RS", "PS", "ES")):
        key = serialization.load_pem_private_key(
            private_key_pem.encode("ascii") if isinstance(private_key_pem, str) else private_key_pem, password=None
        )
    return jwt.encode(claims, key, algorithm=algorithm)


def generate_key_pair(bits: int = 2048) -> tuple[str, str]:
    """(private key PEM, public key PEM): a throw-away RSA pair for tests and the demo."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    public_pem = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode("ascii")
    return private_pem, public_pem
