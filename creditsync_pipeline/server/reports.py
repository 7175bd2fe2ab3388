"""``GET /reports/<file>.csv?key=<hmac>``: the full mismatch list a Dagster run links to.

The full sync writes ``credit_mismatches-<run_id>.csv`` into the report folder
(``CREDITSYNC_REPORTS_DIR``, default ``$DAGSTER_HOME/storage/creditsync_reports``) and
shows the link on its asset when ``CREDITSYNC_PUBLIC_URL`` is set. The route is read-only:

* the key is HMAC-SHA256 of the file name with ``CREDITSYNC_APP_SECRET``, compared in
  constant time; a wrong or missing key, an unknown file, or no secret/folder configured
  are all the same plain 404 (nothing tells a guesser which part was wrong);
* only bare report names are served (``credit_mismatches-<id>.csv``, no folder part), and
  the resolved file must sit directly in the report folder: never a path traversal.
"""

from __future__ import annotations

import hmac
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, Response
from starlette.routing import Route

from .. import reports, settings

REPORTS_PATH = "/reports/{name}"
_HEADERS = {"Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}


def _not_found() -> Response:
    return PlainTextResponse("Not Found", status_code=404, headers=_HEADERS)


def report_file(folder: Path | None, secret: str, name: str, key: str) -> Path | None:
    """The report file ``name`` when ``key`` is its link key, else None."""
    if folder is None or not secret or not key or not reports.is_report_name(name):
        return None
    if not hmac.compare_digest(reports.link_key(secret, name).encode("ascii"), key.encode("utf-8", "replace")):
        return None
    base = folder.resolve()
    path = (base / name).resolve()
    if path.parent != base or not path.is_file():
        return None
    return path


def report_routes(cfg: settings.Settings) -> list[Route]:
    """The read-only report route of ``creditsync serve``."""
    folder = cfg.report_folder()
    secret = str(cfg.app_secret)

    async def get_report(request: Request) -> Response:
        name = request.path_params["name"]
        path = report_file(folder, secret, name, request.query_params.get("key", ""))
        if path is None:
            return _not_found()
        return FileResponse(path, media_type="text/csv; charset=utf-8", filename=name, headers=_HEADERS)

    return [Route(REPORTS_PATH, get_report, methods=["GET"])]
