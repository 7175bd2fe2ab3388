"""``GET /billing?instance=<token>``: the app's "Billing & Credits" page (SPEC "Manual sync").

A marketplace loads this page in its dashboard iframe with the signed instance token in
the query. The token is verified with the same :func:`.tokens.verify_instance_token` as
``POST /api/billing/sync-credits``; the page shows the caller's plan and credits (one
:func:`creditsync_pipeline.appdb.read_instances` read) and a **Sync credits** button.
The button's script (``static/billing.js``, same origin, so the CSP is
``script-src 'self'``) calls the endpoint with the token in the ``x-wix-instance``
header and says the outcome in an ``aria-live`` region.

A missing, malformed, badly signed or stale token gets a 401 HTML page without any
instance data; an instance the app database does not know gets a 404 page, a database
outage a 503 page. Every answer carries :func:`security_headers`: a strict CSP with
``frame-ancestors`` from ``CREDITSYNC_FRAME_ANCESTORS`` (never ``X-Frame-Options: DENY``,
which would break the marketplace iframe), ``Referrer-Policy: no-referrer`` (the token is
in the URL), ``Cache-Control: no-store`` and ``X-Content-Type-Options: nosniff``.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from sqlalchemy.engine import Engine
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .. import appdb, sync
from . import tokens

__all__ = ["PAGE_PATH", "STATIC_PATH", "InstanceView", "page_routes", "security_headers"]

logger = logging.getLogger("creditsync.server")

PAGE_PATH = "/billing"
STATIC_PATH = "/billing/static"
STATIC_DIR = Path(__file__).with_name("static")


def security_headers(frame_ancestors: str) -> dict[str, str]:
    """The headers of every page answer (and of the static files)."""
    return {
        "Content-Security-Policy": (
            "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; "
            f"base-uri 'none'; form-action 'none'; frame-ancestors {frame_ancestors}"
        ),
        "Referrer-Policy": "no-referrer",
        "Cache-Control": "no-store",
        "X-Content-Type-Options": "nosniff",
    }


@dataclass(frozen=True)
class InstanceView:
    """What the page shows of one instance."""

    instance_id: str
    plan_id: str
    credits_total: int
    credits_used: int

    @property
    def credits_left(self) -> int:
        return max(0, self.credits_total - self.credits_used)


def read_instance_view(engine: Engine, instance_id: str) -> InstanceView | None:
    """The caller's row (one appdb read), or None when the app database does not know it."""
    rows = appdb.read_instances(engine, [instance_id])
    if rows.empty:
        return None
    row = rows.iloc[0]
    return InstanceView(
        instance_id=str(row["instance_id"]), plan_id=str(row["plan_id"]),
        credits_total=int(row["credits_total"]), credits_used=int(row["credits_used"]),
    )


def _document(title: str, body: str) -> str:
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{html.escape(title)}</title>\n"
        f'<link rel="stylesheet" href="{STATIC_PATH}/billing.css">\n'
        f"</head>\n<body>\n<main>\n{body}\n</main>\n</body>\n</html>\n"
    )


def render_page(view: InstanceView) -> str:
    """The Billing & Credits page of ``view``'s instance."""
    e = html.escape
    body = f"""<h1>Billing &amp; Credits</h1>
<section aria-labelledby="plan-heading">
<h2 id="plan-heading">Your plan</h2>
<dl class="figures">
<div><dt id="label-instance">Instance</dt><dd aria-labelledby="label-instance" data-field="instance_id">{e(view.instance_id)}</dd></div>
<div><dt id="label-plan">Plan</dt><dd aria-labelledby="label-plan" data-field="plan_id">{e(view.plan_id)}</dd></div>
<div><dt id="label-total">Credits total</dt><dd aria-labelledby="label-total" data-field="credits_total">{view.credits_total}</dd></div>
<div><dt id="label-used">Credits used</dt><dd aria-labelledby="label-used" data-field="credits_used">{view.credits_used}</dd></div>
<div><dt id="label-left">Credits left</dt><dd aria-labelledby="label-left" data-field="credits_left">{view.credits_left}</dd></div>
</dl>
</section>
<section aria-labelledby="sync-heading">
<h2 id="sync-heading">Paid but not showing?</h2>
<p id="sync-help">If you bought or changed a plan and it does not show here, ask billing again.</p>
<button type="button" id="sync-credits" aria-describedby="sync-help">Sync credits</button>
<p id="sync-status" role="status" aria-live="polite" aria-atomic="true"></p>
</section>
<script src="{STATIC_PATH}/billing.js"></script>"""
    return _document("Billing & Credits", body)


def render_error(heading: str, message: str) -> str:
    """An error page: what went wrong and what to do, never any instance data."""
    body = (
        f'<h1>{html.escape(heading)}</h1>\n'
        f'<p role="alert">{html.escape(message)}</p>'
    )
    return _document(heading, body)


_TOKEN_HEADINGS = {
    "missing_token": ("Open this page from your dashboard",
                      "This page needs the signed link your dashboard opens it with; no account was identified."),
    "expired_token": ("This link has expired",
                      "The signed link is older than 24 hours. Reload the app from your dashboard to get a fresh one."),
}


class _WithHeaders:
    """Adds fixed headers to every response of the wrapped ASGI app (the static files)."""

    def __init__(self, app: ASGIApp, headers: dict[str, str]) -> None:
        self.app = app
        self.raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_wrapper(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {name for name, _ in self.raw}
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in names]
                message = {**message, "headers": kept + self.raw}
            await send(message)

        await self.app(scope, receive, send_wrapper)


def page_routes(
    engine: Engine,
    app_secret: str,
    frame_ancestors: str,
    clock: Callable[[], datetime] = sync.utcnow,
) -> list[BaseRoute]:
    """The page and its static files, for the app's route list."""
    headers = security_headers(frame_ancestors)

    def answer(status: int, text: str) -> HTMLResponse:
        return HTMLResponse(text, status_code=status, headers=headers)

    async def billing_page(request: Request) -> HTMLResponse:
        values = request.query_params.getlist("instance")
        try:
            if len(values) > 1:
                raise tokens.TokenError("invalid_token", "more than one instance token in the link")
            caller = tokens.verify_instance_token(values[0] if values else None, app_secret, now=clock())
        except tokens.TokenError as exc:
            logger.warning("[CreditSync] Billing page refused: %s (%s)", exc.code, exc.message)
            heading, message = _TOKEN_HEADINGS.get(
                exc.code, ("This link is not valid", f"The signed link could not be verified ({exc.message}). "
                           "Reload the app from your dashboard.")
            )
            return answer(401, render_error(heading, message))
        try:
            view = await run_in_threadpool(read_instance_view, engine, caller.instance_id)
        except appdb.AppDatabaseError as exc:
            logger.error("[CreditSync] Billing page: app database unavailable: %s", sync.one_line(exc))
            return answer(503, render_error("Billing is temporarily unavailable",
                                            "The app database did not answer; nothing changed. Try again in a minute."))
        if view is None:
            return answer(404, render_error("This site is not set up yet",
                                            "The app has no record of this installation yet. Try again in a minute."))
        return answer(200, render_page(view))

    static = _WithHeaders(StaticFiles(directory=STATIC_DIR), headers)
    return [Route(PAGE_PATH, billing_page, methods=["GET"]), Mount(STATIC_PATH, app=static)]
