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

The blocking work behind the routes is :mod:`.service` (:class:`~.service.ManualSync`);
the access log, which never writes a query string, is :mod:`.access_log`.

Every API error is JSON ``{"error": <code>, "message": <one line>}``; no body and no
log line ever holds a token, the app secret, the webhook secret or the billing
token. Blocking work (database, billing API) runs in Starlette's thread pool.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.background import BackgroundTasks
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .. import appdb, settings, sync
from ..billing import BillingProvider
from ..ids import log_safe
from . import tokens, webhooks
from .page import page_routes
from .ratelimit import RateLimiter
from .receiver import ReceiverSync
from . import stripe as stripe_webhooks
from .reports import report_routes
from .wix import WixWebhookVerifier
from .access_log import AccessLog
from .service import UNAVAILABLE_RETRY_AFTER, ManualSync, error_response, sync_logger

__all__ = ["ServeError", "create_app", "serve"]

logger = logging.getLogger("creditsync.server")

SYNC_PATH = "/api/billing/sync-credits"
WEBHOOK_PATH = "/api/billing/webhook"
WIX_WEBHOOK_PATH = "/api/billing/webhook/wix"
STRIPE_WEBHOOK_PATH = "/api/billing/webhook/stripe"
HEALTH_PATH = "/healthz"

#: the manual-sync rate limit window, seconds (the limit itself is a setting)
RATE_WINDOW_SECONDS = 60.0

_WWW_AUTHENTICATE = {"WWW-Authenticate": 'Bearer realm="creditsync"'}


class ServeError(Exception):
    """``creditsync serve`` cannot start (one-line message)."""


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
    service = ManualSync(cfg, engine, billing)
    in_flight: set[str] = set()
    receiver: ReceiverSync | None = None  # started by the lifespan

    async def sync_credits(request: Request) -> JSONResponse:
        try:
            token = tokens.token_from_headers(request.headers)
            caller = tokens.verify_instance_token(token, app_secret, now=clock())
        except tokens.TokenError as exc:
            logger.warning("[CreditSync] Manual sync refused: %s (%s)", exc.code, exc.message)
            return error_response(401, exc.code, exc.message, _WWW_AUTHENTICATE)
        instance_id = caller.instance_id
        if instance_id in in_flight:
            return error_response(429, "sync_in_progress", "a sync of this instance is already running; try again in a moment",
                          {"Retry-After": "1"}, retry_after=1)
        decision = limiter.acquire(instance_id)
        if not decision.allowed:
            logger.info("[CreditSync] Manual sync for instance %s rate-limited (retry after %d s)",
                        instance_id, decision.retry_after)
            return error_response(
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
            return error_response(413, "payload_too_large", f"webhook bodies are limited to {webhooks.MAX_EVENT_BYTES} bytes")
        body = bytearray()
        try:
            async for chunk in request.stream():
                body += chunk
                if len(body) > webhooks.MAX_EVENT_BYTES:
                    return error_response(413, "payload_too_large", f"webhook bodies are limited to {webhooks.MAX_EVENT_BYTES} bytes")
        except ClientDisconnect:
            return error_response(400, "client_disconnected", "the request body was not received completely")
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
            return error_response(exc.status, exc.code, exc.message)
        reserved = receiver is not None and receiver.reserve()
        try:
            landed = await run_in_threadpool(service.land, event, receiver.owner if reserved else None)
        except appdb.AppDatabaseError as exc:
            if reserved:
                receiver.cancel()
            logger.error("[CreditSync] Webhook %s not landed: %s", log_safe(event.event_id), sync.one_line(exc))
            return error_response(503, "database_unavailable", "the event was not stored; retry later",
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
            return error_response(503, "webhook_not_configured", "the webhook receiver is disabled: CREDITSYNC_WEBHOOK_SECRET is not set")
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
            return error_response(503, "webhook_not_configured", "the Stripe webhook receiver is disabled: STRIPE_WEBHOOK_SECRET is not set")
        return await receive(request, "stripe", verify_stripe, remember_stripe_link)

    async def wix_webhook(request: Request) -> Response:
        if wix_verifier is None:
            return error_response(503, "webhook_not_configured", "the Wix webhook receiver is disabled: WIX_WEBHOOK_PUBLIC_KEY is not set")
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
        return error_response(exc.status_code, code, str(exc.detail), dict(exc.headers or {}) or None)

    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer; the server logs the traceback.
        logger.error("[CreditSync] Internal error on %s: %s", request.url.path, type(exc).__name__)
        return error_response(500, "internal_error", "internal error; nothing was changed by this request")

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
    app.add_middleware(AccessLog)
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
