"""The manual-sync and webhook HTTP app (SPEC "Manual sync"), on Starlette.

Routes:

* ``POST /api/billing/sync-credits`` -- the app's "Sync credits" button. The
  caller is the instance named by its signed instance token (``x-wix-instance``
  header or ``Authorization: Bearer``); only that instance is synced, with the
  same :func:`creditsync_pipeline.sync.run_targeted_sync` the sensors use,
  audited with trigger ``manual``. Body and query are never read.
* ``POST /api/billing/webhook`` -- the optional receiver: verifies the
  provider's signature (:mod:`.webhooks`), lands the event as a
  ``billing_webhook_events`` row (idempotent on ``event_id``) and answers 200
  only after the row is committed; the webhook sensor then syncs it.
* ``GET /healthz`` -- 200 when the app database answers ``SELECT 1``.
* ``GET /billing?instance=<token>`` -- the Sync credits page (:mod:`.page`): HTML,
  its own headers and error pages.

Every API error is JSON ``{"error": <code>, "message": <one line>}``; no body and no
log line ever holds a token, the app secret, the webhook secret or the billing
token. Blocking work (database, billing API) runs in Starlette's thread pool.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import pandas as pd
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.background import BackgroundTasks
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import appdb, settings, sync
from ..billing import BillingAuthError, BillingError, BillingProvider, BillingUnavailableError
from ..rules import WRITABLE_KINDS, RulesError
from ..ids import log_safe
from . import tokens, webhooks
from .page import page_routes
from .ratelimit import RateLimiter
from .receiver import ReceiverSync
from . import stripe as stripe_webhooks
from .reports import report_routes
from .wix import WixWebhookVerifier

__all__ = ["ServeError", "create_app", "serve"]

logger = logging.getLogger("creditsync.server")
access_logger = logging.getLogger("creditsync.server.access")
#: the sync service's operator lines ("[CreditSync] ...") go to the usual logger
sync_logger = logging.getLogger("creditsync")

SYNC_PATH = "/api/billing/sync-credits"
WEBHOOK_PATH = "/api/billing/webhook"
WIX_WEBHOOK_PATH = "/api/billing/webhook/wix"
STRIPE_WEBHOOK_PATH = "/api/billing/webhook/stripe"
HEALTH_PATH = "/healthz"

#: the manual-sync rate limit window, seconds (the limit itself is a setting)
RATE_WINDOW_SECONDS = 60.0
#: Retry-After sent when billing or the database is unavailable
UNAVAILABLE_RETRY_AFTER = 30

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="creditsync"'}


class ServeError(Exception):
    """``creditsync serve`` cannot start (one-line message)."""


def _error(status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": code, "message": message, **extra}, status_code=status, headers=headers)


def _plain(value: Any) -> Any:
    """A pandas/numpy scalar as a JSON-ready Python value (NA -> None)."""
    if value is None:
        return None
    try:
        if pd.isna(value):
            return None
    except (TypeError, ValueError):
        pass
    return value.item() if hasattr(value, "item") else value


@dataclass
class _Outcome:
    status: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


class _Service:
    """The blocking side of the app (called in the thread pool)."""

    def __init__(self, cfg: settings.Settings, engine: Engine, billing: BillingProvider) -> None:
        self.cfg = cfg
        self.engine = engine
        self.billing = billing

    def _current(self, instance_id: str) -> dict[str, Any] | None:
        rows = appdb.read_instances(self.engine, [instance_id])
        if rows.empty:
            return None
        row = rows.iloc[0]
        return {"plan_id": _plain(row["plan_id"]), "credits_total": _plain(row["credits_total"])}

    @staticmethod
    def _unknown(instance_id: str) -> _Outcome:
        return _Outcome(404, {
            "error": "unknown_instance",
            "message": f"instance {instance_id} is not provisioned in the app database; nothing changed",
        })

    @staticmethod
    def _database_unavailable() -> _Outcome:
        return _Outcome(
            503,
            {"error": "database_unavailable", "message": "the app database is unavailable; nothing changed, try again later"},
            {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
        )

    @staticmethod
    def _unresolved(status: str, instance_id: str) -> _Outcome:
        """Billing could not answer for this instance: nothing changed, say why in words."""
        if status == "unavailable":
            return _Outcome(
                503,
                {"error": "billing_unavailable", "message": "the billing API is unavailable; nothing changed, try again later"},
                {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
            )
        if status == "error":
            return _Outcome(
                502, {"error": "billing_error", "message": "the billing API answered something unusable; nothing changed"}
            )
        # removed / unlinked: billing does not know this instance (yet); it is never downgraded for that
        return _Outcome(200, {
            "instance_id": instance_id,
            "changed": False,
            "outcome": "not_found_in_billing",
            "message": "billing does not know this instance yet; nothing changed, try again in a minute",
        })

    def sync_instance(self, instance_id: str) -> _Outcome:
        """Run the targeted sync of one instance and render the answer."""
        try:
            # Cheap existence check first: an unknown instance costs no billing call.
            known = self._current(instance_id) is not None
        except appdb.AppDatabaseError as exc:
            sync_logger.error("[CreditSync] Error running credit sync task: %s", sync.one_line(exc))
            return self._database_unavailable()
        if not known:
            logger.info("[CreditSync] Manual sync for unknown instance %s: nothing to do", instance_id)
            return self._unknown(instance_id)
        # The sync service logs any failure as "[CreditSync] Error running credit sync task: ...";
        # the caller gets a one-line message without internals.
        try:
            report = sync.run_targeted_sync(
                self.engine,
                self.billing,
                [instance_id],
                trigger="manual",
                run_id=sync.new_run_id(),
                options=sync.SyncOptions.from_settings(self.cfg),
                log=sync_logger,
            )
        except BillingUnavailableError:
            return _Outcome(
                503,
                {"error": "billing_unavailable", "message": "the billing API is unavailable; nothing changed, try again later"},
                {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)},
            )
        except BillingAuthError:
            return _Outcome(
                502, {"error": "billing_error", "message": "the billing API refused creditsync's credentials; nothing changed"}
            )
        except BillingError:
            return _Outcome(
                502, {"error": "billing_error", "message": "the billing API answered something unusable; nothing changed"}
            )
        except appdb.AppDatabaseError:
            return self._database_unavailable()
        except RulesError:
            return _Outcome(
                503, {"error": "sync_failed", "message": "the sync cannot run with the current plans; nothing changed"}
            )

        if report.refused:
            return _Outcome(503, {"error": "sync_refused", "message": "a guard rail refused the sync; nothing changed"})
        if instance_id in report.unknown_instance_ids:
            return self._unknown(instance_id)
        unresolved = report.unresolved[report.unresolved["instance_id"] == instance_id]
        if len(unresolved):
            return self._unresolved(str(unresolved.iloc[0]["status"]), instance_id)
        body: dict[str, Any] = {"instance_id": instance_id, "run_id": report.run_id}
        applied = report.applied[report.applied["instance_id"] == instance_id]
        if len(applied):
            row = applied.iloc[0]
            body.update(
                changed=True,
                outcome="updated",
                old={"plan_id": _plain(row["old_plan_id"]), "credits_total": _plain(row["old_credits_total"])},
                new={"plan_id": _plain(row["new_plan_id"]), "credits_total": _plain(row["new_credits_total"])},
            )
            if report.warnings:
                body["warnings"] = list(report.warnings)
            return _Outcome(200, body)
        try:
            current = self._current(instance_id)
        except appdb.AppDatabaseError:  # nothing was applied: "nothing changed" holds
            return self._database_unavailable()
        if current is None:  # deleted while we synced
            return self._unknown(instance_id)
        mine = report.mismatches[report.mismatches["instance_id"] == instance_id]
        kinds = [str(k) for k in mine["kind"]]
        if not kinds:
            outcome = "already_correct"
        elif any(k in WRITABLE_KINDS for k in kinds):
            outcome = "skipped"  # changed meanwhile (compare-and-set) or newer than billing
        else:
            outcome = "needs_attention"  # unknown_plan / invalid_record: reported, never written
            body["kind"] = kinds[0]
        body.update(changed=False, outcome=outcome, old=dict(current), new=dict(current))
        return _Outcome(200, body)

    def land(self, event: webhooks.WebhookEvent, lease_owner: str | None = None) -> appdb.LandedEvent:
        """Land (and commit) the event's row; leased to ``lease_owner`` when given."""
        return appdb.land_webhook_event(
            self.engine,
            event_id=event.event_id,
            event_type=event.event_type,
            instance_id=event.instance_id,
            payload=event.payload,
            lease_owner=lease_owner,
            lease_seconds=appdb.DEFAULT_LEASE_SECONDS if lease_owner else None,
        )

    def health(self) -> None:
        appdb.check_connection(self.engine)


class _AccessLog:
    """One line per request: method, path (never the query string), status, duration."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            client = scope.get("client")
            path = scope.get("path", "")
            access_logger.info(
                "%s %s %s %d %.0fms",
                client[0] if client else "-",
                scope.get("method", "-"),
                path if len(path) <= 200 else path[:200] + "...",
                status,
                (time.perf_counter() - started) * 1000,
            )


def create_app(
    cfg: settings.Settings | None = None,
    *,
    engine: Engine | None = None,
    billing: BillingProvider | None = None,
    rate_limiter: RateLimiter | None = None,
    clock: Callable[[], datetime] = sync.utcnow,
    receiver_billing: BillingProvider | None = None,
) -> Starlette:
    """Build the app; raise :class:`settings.SettingsError` when it cannot work.

    ``engine``/``billing`` default to ones built from ``cfg`` (and are closed
    on shutdown); tests inject their own, and a ``rate_limiter`` and ``clock``.
    The receivers' background syncs use ``receiver_billing`` (default: ``billing``
    when injected, else a provider with a batch job's budget); they run while the
    app's lifespan runs, with ``cfg.receiver_workers`` threads (0: the sensor syncs
    every row).
    """
    cfg = cfg if cfg is not None else settings.from_env()
    if not cfg.app_secret:
        raise settings.SettingsError("CREDITSYNC_APP_SECRET is not set")
    app_secret = str(cfg.app_secret)
    webhook_secret = str(cfg.webhook_secret)
    wix_verifier = None
    if cfg.wix.webhook_public_key:
        try:
            wix_verifier = WixWebhookVerifier(cfg.wix.webhook_public_key)
        except ValueError as exc:
            raise settings.SettingsError(f"WIX_WEBHOOK_PUBLIC_KEY: {sync.one_line(exc)}") from None
    owned: list[Callable[[], None]] = []
    billing_injected = billing is not None
    if engine is None:
        engine = appdb.create_engine_from_url(cfg.require_database_url())
        owned.append(engine.dispose)
    if billing is None:
        # The budget of a person waiting on the button: a slow billing API gives a quick 503.
        try:
            billing = sync.open_billing(cfg, engine, interactive=True)
        except Exception:
            for close in owned:
                close()
            raise
        owned.append(billing.close)
    limiter = rate_limiter if rate_limiter is not None else RateLimiter(cfg.sync_rate_limit, RATE_WINDOW_SECONDS)
    service = _Service(cfg, engine, billing)
    in_flight: set[str] = set()
    receiver: ReceiverSync | None = None  # started by the lifespan

    async def sync_credits(request: Request) -> JSONResponse:
        try:
            token = tokens.token_from_headers(request.headers)
            caller = tokens.verify_instance_token(token, app_secret, now=clock())
        except tokens.TokenError as exc:
            logger.warning("[CreditSync] Manual sync refused: %s (%s)", exc.code, exc.message)
            return _error(401, exc.code, exc.message, _WWW_AUTHENTICATE)
        instance_id = caller.instance_id
        if instance_id in in_flight:
            return _error(429, "sync_in_progress", "a sync of this instance is already running; try again in a moment",
                          {"Retry-After": "1"}, retry_after=1)
        decision = limiter.acquire(instance_id)
        if not decision.allowed:
            logger.info("[CreditSync] Manual sync for instance %s rate-limited (retry after %d s)",
                        instance_id, decision.retry_after)
            return _error(
                429, "rate_limited",
                f"at most {limiter.limit} sync(s) per instance every {limiter.window:g} s; try again in {decision.retry_after} s",
                {"Retry-After": str(decision.retry_after)}, retry_after=decision.retry_after,
            )
        in_flight.add(instance_id)
        try:
            logger.info("[CreditSync] Manual sync requested for instance %s", instance_id)
            outcome = await run_in_threadpool(service.sync_instance, instance_id)
        finally:
            in_flight.discard(instance_id)
        return JSONResponse(outcome.body, status_code=outcome.status, headers=outcome.headers)

    async def read_body(request: Request) -> bytes | JSONResponse:
        """The raw body (verified byte for byte), or the error answer: too large, cut off."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > webhooks.MAX_EVENT_BYTES:
            return _error(413, "payload_too_large", f"webhook bodies are limited to {webhooks.MAX_EVENT_BYTES} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > webhooks.MAX_EVENT_BYTES:
                    return _error(413, "payload_too_large", f"webhook bodies are limited to {webhooks.MAX_EVENT_BYTES} bytes")
        except ClientDisconnect:
            return _error(400, "client_disconnected", "the request body was not received completely")
        return bytes(body)

    async def receive(
        request: Request,
        provider: str,
        verify: Callable[[bytes, Any], webhooks.WebhookEvent],
        after: Callable[[webhooks.WebhookEvent], None] | None = None,
    ) -> Response:
        """Every receiver: verify, land + commit (leased to this process when it has room),
        answer 200, then (in the background) ``after`` and the row's sync (:class:`ReceiverSync`)."""
        raw = await read_body(request)
        if isinstance(raw, JSONResponse):
            return raw
        try:
            event = await run_in_threadpool(verify, raw, request.headers)
        except webhooks.WebhookError as exc:
            logger.warning("[CreditSync] %s webhook refused: %s (%s)", provider, exc.code, exc.message)
            return _error(exc.status, exc.code, exc.message)
        reserved = receiver is not None and receiver.reserve()
        try:
            landed = await run_in_threadpool(service.land, event, receiver.owner if reserved else None)
        except appdb.AppDatabaseError as exc:
            if reserved:
                receiver.cancel()
            logger.error("[CreditSync] Webhook %s not landed: %s", log_safe(event.event_id), sync.one_line(exc))
            return _error(503, "database_unavailable", "the event was not stored; retry later",
                          {"Retry-After": str(UNAVAILABLE_RETRY_AFTER)})
        sync_logger.info(
            "[CreditSync] Billing webhook event %s for instance %s (%s event %s%s)",
            log_safe(event.event_type), log_safe(event.instance_id or "-"), provider, log_safe(event.event_id),
            "" if landed.inserted else ", a redelivery",
        )
        tasks = BackgroundTasks()  # run after the response has been sent
        if after is not None:
            tasks.add_task(run_in_threadpool, after, event)
        if reserved and landed.leased:
            tasks.add_task(receiver.submit, landed.id)
        elif reserved:
            receiver.cancel()
        return JSONResponse(
            {"received": True, "event_id": event.event_id, "duplicate": not landed.inserted}, background=tasks
        )

    def verify_generic(raw: bytes, headers: Any) -> webhooks.WebhookEvent:
        webhooks.verify_webhook_signature(headers.get(webhooks.SIGNATURE_HEADER), raw, webhook_secret, now=clock().timestamp())
        return webhooks.parse_event(raw)

    async def webhook(request: Request) -> Response:
        if not webhook_secret:
            return _error(503, "webhook_not_configured", "the webhook receiver is disabled: CREDITSYNC_WEBHOOK_SECRET is not set")
        return await receive(request, "generic", verify_generic)

    stripe_secret = str(cfg.stripe.webhook_secret)
    metadata_key = cfg.stripe.instance_metadata_key

    def verify_stripe(raw: bytes, headers: Any) -> webhooks.WebhookEvent:
        return stripe_webhooks.receive_stripe_webhook(
            headers.get(stripe_webhooks.STRIPE_SIGNATURE_HEADER), raw, secret=stripe_secret, metadata_key=metadata_key,
            instances_of_customer=lambda customer: appdb.instances_for_customers(engine, "stripe", [customer]).get(customer, []),
            now=clock().timestamp(),
        )

    def remember_stripe_link(event: webhooks.WebhookEvent) -> None:
        links = stripe_webhooks.customer_link(event, metadata_key)
        if links:
            try:
                appdb.remember_customer_links(engine, "stripe", links)
            except appdb.AppDatabaseError as exc:  # a cache: the next full sync learns it again
                logger.warning("[CreditSync] Could not remember the Stripe customer link: %s", sync.one_line(exc))

    async def stripe_webhook(request: Request) -> Response:
        if not stripe_secret:
            return _error(503, "webhook_not_configured", "the Stripe webhook receiver is disabled: STRIPE_WEBHOOK_SECRET is not set")
        return await receive(request, "stripe", verify_stripe, remember_stripe_link)

    async def wix_webhook(request: Request) -> Response:
        if wix_verifier is None:
            return _error(503, "webhook_not_configured", "the Wix webhook receiver is disabled: WIX_WEBHOOK_PUBLIC_KEY is not set")
        return await receive(request, "wix", lambda raw, headers: wix_verifier.parse(raw))

    async def healthz(request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(service.health)
        except appdb.AppDatabaseError as exc:
            logger.error("[CreditSync] Health check failed: %s", sync.one_line(exc))
            return JSONResponse({"status": "unavailable", "error": "database_unreachable",
                                 "message": "the app database is unreachable"}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer; the server logs the traceback.
        logger.error("[CreditSync] Internal error on %s: %s", request.url.path, type(exc).__name__)
        return _error(500, "internal_error", "internal error; nothing was changed by this request")

    @asynccontextmanager
    async def lifespan(app: Starlette):  # type: ignore[no-untyped-def]
        nonlocal receiver
        try:
            await run_in_threadpool(service.health)
        except appdb.AppDatabaseError as exc:
            logger.warning("[CreditSync] App database not reachable at start-up (GET /healthz will say 503): %s",
                           sync.one_line(exc))
        background: list[Callable[[], None]] = []
        if cfg.receiver_workers:
            syncing = receiver_billing or (billing if billing_injected else None)
            if syncing is None:
                syncing = sync.open_billing(cfg, engine)
                background.append(syncing.close)
            receiver = ReceiverSync(engine, syncing, workers=cfg.receiver_workers)
            background.insert(0, receiver.close)
        logger.info(
            "[CreditSync] Manual sync app ready: %s (limit %d per instance per %g s), webhook receivers %s, "
            "background syncs: %s",
            SYNC_PATH, limiter.limit, limiter.window, ", ".join(receiver_paths) or "none",
            f"{cfg.receiver_workers} worker(s)" if receiver is not None else "off (the webhook sensor syncs every row)",
        )
        try:
            yield
        finally:
            app.state.receiver = receiver
            receiver = None
            for close in background:
                close()
            for close in reversed(owned):
                close()

    receiver_paths = [
        path for path, on in ((WEBHOOK_PATH, webhook_secret), (WIX_WEBHOOK_PATH, wix_verifier),
                              (STRIPE_WEBHOOK_PATH, stripe_secret)) if on
    ]
    app = Starlette(
        routes=[
            Route(SYNC_PATH, sync_credits, methods=["POST"]),
            Route(WEBHOOK_PATH, webhook, methods=["POST"]),
            Route(WIX_WEBHOOK_PATH, wix_webhook, methods=["POST"]),
            Route(STRIPE_WEBHOOK_PATH, stripe_webhook, methods=["POST"]),
            Route(HEALTH_PATH, healthz, methods=["GET"]),
            # GET /billing: the Sync credits page (server/page.py), same token check as SYNC_PATH
            *page_routes(engine, app_secret, cfg.frame_ancestors, clock),
            *report_routes(cfg),  # the full sync's mismatch reports (read-only, keyed links)
        ],
        exception_handlers={HTTPException: http_error, Exception: internal_error},
        lifespan=lifespan,
    )
    app.add_middleware(_AccessLog)
    app.state.rate_limiter = limiter
    return app


def _bind(host: str, port: int) -> socket.socket:
    """Listen on ``host:port`` before serving, so a busy port is a one-line error."""
    try:
        family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
        return socket.create_server(address, family=family, backlog=2048)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else type(exc).__name__
        raise ServeError(f"cannot listen on {host}:{port}: {reason}") from None


def serve(cfg: settings.Settings, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run the app on uvicorn until SIGINT/SIGTERM (``creditsync serve``)."""
    import uvicorn

    app = create_app(cfg)  # settings errors surface here, before anything is bound
    sock = _bind(host, port)
    config = uvicorn.Config(
        app,
        host=host,
        port=sock.getsockname()[1],
        log_config=None,  # keep the CLI's logging set-up
        access_log=False,  # our access log never prints query strings (tokens travel there in some apps)
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    bound_host, bound_port = sock.getsockname()[:2]
    url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
    logger.info("[CreditSync] creditsync serve listening on http://%s:%d (Ctrl-C to stop)", url_host, bound_port)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
    if not server.started:
        raise ServeError("the server did not start (see the log above)")
