"""The Wix provider: a token per instance, then ``GET /apps/v1/instance``.

Wix has no list of all instances, so a full run looks up every instance id of the app
table (``lists_all = False``), ``WIX_CONCURRENCY`` at a time (:func:`..base.look_up_each`).
One look-up is two calls:

1. an access token for the instance: ``POST /oauth2/token`` with JSON
   ``{"grant_type": "client_credentials", "client_id", "client_secret", "instance_id"}``
   -> ``{"access_token", "expires_in"}``, kept in the process-wide cache of
   :mod:`.tokens` until shortly before it expires;
2. ``GET /apps/v1/instance`` with header ``Authorization: <access_token>`` -> the
   instance, turned into at most one SPEC record by :func:`.instance.instance_records`.

What the other answers mean:

* The token request refused for one instance (a 4xx with a JSON body) while others
  succeed: the app was removed from that site. The instance is ``REMOVED``: counted,
  listed, left alone, no failed look-up.
* The app credentials refused (``invalid_client`` / ``unauthorized_client``, the
  OAuth 2.0 error codes of RFC 6749, whose conventions Wix's token endpoint follows):
  :class:`BillingAuthError`, the run writes nothing. A full run in which *no* token was
  granted while at least two were refused raises the same (it stops after 200 such
  refusals): a wrong secret answered some other way must never read as "every site
  uninstalled the app". A targeted run cannot compare instances: a refusal there is
  ``REMOVED`` unless Wix names the credentials.
* ``GET /apps/v1/instance`` answered 401 (a token expired or revoked mid-run): the
  token is dropped, a new one fetched and the call made once more; a second 401 is a
  failed look-up. 403: the app lacks the permission "Manage Your App" (systemic).
* 429 (Wix allows 200 requests a minute per instance) waits out ``Retry-After`` in that
  worker only; 5xx, timeouts and drops are retried with backoff (:class:`..http.HttpApi`).
  A look-up that still fails leaves the instance alone (``UNAVAILABLE`` / ``LOOKUP_ERROR``);
  more than 10 % failed look-ups fail a full run (nothing is written).
* An app row whose id is not a usable instance id is not sent: ``LOOKUP_ERROR``, left alone.

Full runs log ``Wix: looked up N of M instance(s)`` every 10 % (from 1,000 instances),
then one summary line (the sync itself lists the instances left alone).

The app secret and every access token are masked out of every message, log line and
report; the repr shows neither.
"""

from __future__ import annotations

import itertools
import logging
import re
import threading
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import httpx

from ...settings import DEFAULT_WIX_API_BASE, DEFAULT_WIX_CONCURRENCY, Settings
from ..base import (
    FAILED_STATUSES,
    LOOKUP_ERROR,
    REMOVED,
    BillingSnapshot,
    Budget,
    CustomerLinks,
    HttpProvider,
    Lookup,
    check_requested_ids,
    look_up_each,
    snapshot_from_lookups,
)
from ..errors import BillingAuthError, BillingError, BillingUnavailableError
from ..http import HttpApi, json_type, utcnow
from ..records import instance_id_problem, short_repr
from .instance import instance_records
from .tokens import TokenCache, TokenRefused, shared_cache

__all__ = ["INSTANCE_PATH", "MAX_FAILED_RATIO", "TOKEN_PATH", "WixProvider"]

logger = logging.getLogger("creditsync.billing")

TOKEN_PATH = "/oauth2/token"
INSTANCE_PATH = "/apps/v1/instance"
#: a full run fails when more than this share of its look-ups fail (SPEC)
MAX_FAILED_RATIO = 0.10
#: OAuth 2.0 error codes (RFC 6749 5.2) that name the app's credentials, not one instance
_CREDENTIAL_ERRORS = frozenset({"invalid_client", "unauthorized_client"})
#: a full run that has been refused this many tokens without being granted one stops
_REFUSED_WITHOUT_GRANT = 200
#: the shape of a Wix OAuth access token (masked even where we did not send it)
_WIX_TOKEN_RE = re.compile(r"OauthNG\.JWS\.[A-Za-z0-9_\-.=]+")
_SAFE_CODE_RE = re.compile(r"[A-Za-z0-9_.\-]{1,64}")
_CHECKED = 5


class _Batch:
    """Counters of one batch of look-ups (progress lines, the "no token granted" guard)."""

    def __init__(self, total: int, *, full: bool) -> None:
        self.total = total
        self.full = full
        self.done = itertools.count(1)
        self.step = max(1, -(-total // 10)) if full and total >= 1000 else 0
        self.answered = 0
        self.refused = 0
        self.lock = threading.Lock()


class WixProvider(HttpProvider):
    """Wix's App Instance API: a token per instance, then ``GET /apps/v1/instance``."""

    name = "wix"
    lists_all = False

    def __init__(
        self,
        app_id: str,
        app_secret: str,
        *,
        api_base: str = DEFAULT_WIX_API_BASE,
        concurrency: int = DEFAULT_WIX_CONCURRENCY,
        plan_map: Mapping[str, str] | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 5.0,
        max_attempts: int = 5,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        max_retry_after: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        tokens: TokenCache | None = None,
    ) -> None:
        if not isinstance(app_id, str) or not app_id.strip():
            raise ValueError("WIX_APP_ID is empty")
        if not isinstance(app_secret, str) or not app_secret:
            raise ValueError("WIX_APP_SECRET is empty")
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._app_id = app_id.strip()
        self._secret = app_secret
        self._api = HttpApi(
            api_base,
            label="Wix API",
            url_setting="WIX_API_BASE",
            credentials="the app credentials",
            secrets=[app_secret],
            timeout=timeout,
            connect_timeout=connect_timeout,
            max_attempts=max_attempts,
            backoff_initial=backoff_initial,
            backoff_max=backoff_max,
            max_retry_after=max_retry_after,
            max_connections=concurrency + 1,
            transport=transport,
        )
        self._concurrency = concurrency
        self._plan_map = dict(plan_map or {})
        self._tokens = tokens if tokens is not None else shared_cache(self._api.base_url, self._app_id, app_secret)

    @classmethod
    def from_settings(cls, cfg: Settings, *, budget: Budget, links: CustomerLinks | None = None) -> WixProvider:
        app_id, secret = cfg.wix.require_credentials()
        return cls(
            app_id,
            secret,
            api_base=cfg.wix.api_base,
            concurrency=cfg.wix.concurrency,
            plan_map=cfg.plan_map,
            **budget.http_options(),
        )

    def __repr__(self) -> str:
        return f"WixProvider(base_url={self.base_url!r}, app_id={self._app_id!r}, concurrency={self._concurrency})"

    @property
    def tokens(self) -> TokenCache:
        """The access-token cache this provider shares with every other of the same app."""
        return self._tokens

    # -- the contract ---------------------------------------------------------------------

    def check_access(self, instance_ids: Sequence[str] = ()) -> str:
        """A fresh token and ``GET /apps/v1/instance`` for the first given instance that answers.

        An instance whose token is refused (removed) is skipped for the next one (at most 5).
        """
        tried: list[str] = []
        for instance_id in list(dict.fromkeys(instance_ids))[:_CHECKED]:
            if instance_id_problem(instance_id) is not None:
                continue
            tried.append(instance_id)
            found = self._look_up(instance_id, _Batch(1, full=False), fresh=True)
            if found.status is None:
                return (
                    f"Wix API at {self.base_url} granted an access token for instance "
                    f"{short_repr(instance_id)} and answered Get App Instance"
                )
        if not tried:
            return (
                f"Wix API at {self.base_url}: not checked: Wix tokens are per instance and "
                "the app database has no instance to ask one for"
            )
        raise self._api.error(
            BillingAuthError,
            f"Wix API refused an access token for each of {len(tried)} instance(s) tried "
            f"({', '.join(short_repr(i) for i in tried)}): the app credentials are wrong "
            "(WIX_APP_ID, WIX_APP_SECRET) or the app was removed from those sites",
        )

    def fetch_all(self, instance_ids: Sequence[str] | None = None, *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """Look up every instance of the app table (Wix cannot list them)."""
        if instance_ids is None:
            raise ValueError("Wix has no list of all instances: fetch_all needs the app's instance ids")
        return self._fetch(instance_ids, full=True)

    def fetch_instances(self, instance_ids: Iterable[str], *, plan_ids: Collection[str] = ()) -> BillingSnapshot:
        """One look-up per distinct id; ValueError for an id that is not usable (never sent)."""
        return self._fetch(check_requested_ids(instance_ids), full=False)

    # -- a batch --------------------------------------------------------------------------

    def _fetch(self, instance_ids: Iterable[str], *, full: bool) -> BillingSnapshot:
        started_at = utcnow()
        t0 = time.perf_counter()
        ids = tuple(dict.fromkeys(instance_ids))
        # An app row whose id could never be a Wix instance id is left alone, not sent.
        unusable = {i: instance_id_problem(i) for i in ids}
        unusable = {i: p for i, p in unusable.items() if p is not None}
        sendable = [i for i in ids if i not in unusable] if unusable else list(ids)
        batch = _Batch(len(sendable), full=full)
        answers, failures = look_up_each(
            sendable,
            lambda instance_id: self._look_up(instance_id, batch),
            concurrency=self._concurrency,
            label=self._api.label,
            max_failed_ratio=MAX_FAILED_RATIO if full else None,
        )
        if full and batch.refused >= 2 and batch.answered == 0:
            raise self._no_token_granted(batch.refused)
        for instance_id, problem in unusable.items():
            failures[instance_id] = (LOOKUP_ERROR, f"not sent to Wix: {problem}")
        snapshot = snapshot_from_lookups(
            ids, answers, failures, started_at=started_at, finished_at=utcnow(),
            provider=self.name, full=full, malformed=self._api.malformed,
        )
        self._log_batch(snapshot, time.perf_counter() - t0, full=full)
        return snapshot

    def _no_token_granted(self, refused: int) -> BillingAuthError:
        return self._api.error(  # type: ignore[return-value]
            BillingAuthError,
            f"Wix API refused an access token for every instance tried ({refused}) and granted none: "
            "the app credentials look wrong (are WIX_APP_ID and WIX_APP_SECRET right?), "
            "not every site uninstalling the app",
        )

    def _log_batch(self, snapshot: BillingSnapshot, seconds: float, *, full: bool) -> None:
        counts = snapshot.unresolved_counts()
        failed = sum(v for k, v in counts.items() if k in FAILED_STATUSES)
        removed = counts.get(REMOVED, 0)
        paid = len(snapshot.records) + len(snapshot.invalid)
        log = logger.info if full else logger.debug
        log(
            "Wix: looked up %d instance(s) in %.1fs: %d paid, %d free, %d removed, %d failed",
            snapshot.lookups, seconds, paid, max(0, snapshot.lookups - paid - len(snapshot.unresolved)), removed, failed,
        )

    # -- one instance ---------------------------------------------------------------------

    def _look_up(self, instance_id: str, batch: _Batch, *, fresh: bool = False) -> Lookup:
        """Token + instance call; every token it used is masked out of any error it raises."""
        used: list[str] = []
        try:
            found = self._look_up_once(instance_id, used, fresh=fresh)
        except BillingError as exc:
            text = str(exc)
            masked = self._mask(text, used)
            if masked != text:
                raise type(exc)(masked) from None
            raise
        finally:
            if batch.step:
                done = next(batch.done)
                if done % batch.step == 0 or done == batch.total:
                    logger.info("Wix: looked up %d of %d instance(s)", done, batch.total)
        with batch.lock:
            if found.status is None:
                batch.answered += 1
            elif found.status == REMOVED:
                batch.refused += 1
            stuck = batch.full and batch.answered == 0 and batch.refused >= _REFUSED_WITHOUT_GRANT
        if stuck:
            raise self._no_token_granted(batch.refused)
        return found

    def _look_up_once(self, instance_id: str, used: list[str], *, fresh: bool) -> Lookup:
        what = f"GET {INSTANCE_PATH} (instance {short_repr(instance_id)})"
        try:
            if fresh:
                self._tokens.drop(instance_id)
            token = self._token(instance_id)
            used.append(token)
            response, sent_at = self._api.request("GET", INSTANCE_PATH, what, headers={"Authorization": token})
            if response.status_code == 401:  # expired or revoked since it was issued: once more
                self._tokens.drop(instance_id, token)
                token = self._token(instance_id)
                used.append(token)
                response, sent_at = self._api.request("GET", INSTANCE_PATH, what, headers={"Authorization": token})
                if response.status_code == 401:
                    raise self._api.error(
                        BillingError, f"Wix API rejected a freshly granted access token on {what} (HTTP 401)"
                    )
        except TokenRefused as refused:
            return Lookup(sent_at=refused.sent_at, status=REMOVED, reason=refused.reason)
        status = response.status_code
        if status == 403:
            raise self._api.error(
                BillingAuthError,
                f"Wix API refused {what} (HTTP 403{self._code(response)}): "
                "does the app have the permission \"Manage Your App\"?",
            )
        if status != 200:
            raise self._api.refuse(response, what)
        body = self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
        try:
            records = instance_records(body, instance_id, sent_at, self._plan_map)
        except ValueError as exc:
            raise self._api.malformed(what, str(exc)) from None
        return Lookup(sent_at=sent_at, records=records)

    def _token(self, instance_id: str) -> str:
        return self._tokens.get(instance_id, lambda: self._request_token(instance_id))

    def _request_token(self, instance_id: str) -> tuple[str, float | None]:
        """(access token, lifetime in seconds or None); TokenRefused when Wix refuses this instance."""
        what = f"POST {TOKEN_PATH} (instance {short_repr(instance_id)})"
        body = {
            "grant_type": "client_credentials",
            "client_id": self._app_id,
            "client_secret": self._secret,
            "instance_id": instance_id,
        }
        response, sent_at = self._api.request("POST", TOKEN_PATH, what, json_body=body)
        status = response.status_code
        if status == 200:
            doc = self._api.parse_json(response.content, response.headers.get("Content-Type", "unknown"), what)
            return self._token_from(doc, what)
        code = self._code(response)
        if code.strip() in _CREDENTIAL_ERRORS:
            raise self._api.error(
                BillingAuthError,
                f"Wix API refused the app credentials on {what} (HTTP {status}{code}): "
                "are WIX_APP_ID and WIX_APP_SECRET right?",
            )
        if status == 408:
            raise self._api.error(BillingUnavailableError, f"Wix API unavailable: {what} timed out (HTTP 408)")
        if 400 <= status < 500 and self._is_json(response):
            raise TokenRefused(
                sent_at,
                self._api.mask(
                    f"Wix refused an access token for this instance (HTTP {status}{code}): "
                    "the app is no longer installed on that site"
                ),
            )
        raise self._api.refuse(response, what)

    def _token_from(self, doc: Any, what: str) -> tuple[str, float | None]:
        if not isinstance(doc, dict):
            raise self._api.malformed(what, f"expected a token object, got {json_type(doc)}")
        token = doc.get("access_token")
        if not isinstance(token, str) or not token or not (token.isascii() and token.isprintable()) or " " in token:
            raise self._api.malformed(what, "no usable 'access_token'")
        ttl = doc.get("expires_in")
        if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
            ttl = None  # usable for this look-up, never cached
        return token, None if ttl is None else float(ttl)

    # -- messages -------------------------------------------------------------------------

    def _mask(self, text: str, tokens: Iterable[str]) -> str:
        for token in sorted(set(tokens), key=len, reverse=True):
            text = text.replace(token, "***")
        return _WIX_TOKEN_RE.sub("***", self._api.mask(text))

    @staticmethod
    def _is_json(response: httpx.Response) -> bool:
        try:
            response.json()
        except ValueError:
            return False
        return True

    @staticmethod
    def _code(response: httpx.Response) -> str:
        """A short, sanitised error code: OAuth's ``error`` or Wix's ``details.applicationError.code``."""
        try:
            body = response.json()
        except ValueError:
            return ""
        code: Any = None
        if isinstance(body, dict):
            code = body.get("error")
            if isinstance(code, dict):
                code = code.get("code")
            if code is None and isinstance(body.get("details"), dict):
                app_error = body["details"].get("applicationError")
                code = app_error.get("code") if isinstance(app_error, dict) else None
        if isinstance(code, str) and _SAFE_CODE_RE.fullmatch(code):
            return f" {code}"
        return ""
