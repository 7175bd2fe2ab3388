"""One access-log line per request: method, path, status, duration -- never the query string.

Some frontends put the instance token in the query (``?instance=...``), so uvicorn's own
access log is off and this middleware writes the line instead.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

access_logger = logging.getLogger("creditsync.server.access")


class AccessLog:
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
