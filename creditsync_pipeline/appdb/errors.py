"""Errors of the app-database layer: one line, never a password.

Every error that leaves :mod:`creditsync_pipeline.appdb` is an
:class:`AppDatabaseError` built here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

_MAX_MESSAGE = 400


class AppDatabaseError(Exception):
    """An app-database operation failed; the message is one line and password-free."""


class SchemaMissingError(AppDatabaseError):
    """A creditsync table is missing: the schema was never applied (``creditsync init-db``)."""


#: what the message of a missing-schema error ends with
INIT_DB_HINT = "the schema is not applied to this database: run `creditsync init-db`"


class UnknownRunError(AppDatabaseError):
    """A run id with no audit rows (nothing it wrote can be found)."""


#: Query parameters that carry a password (matched in any case).
SECRET_QUERY_PARAMS = ("password", "passwd", "pwd", "sslpassword")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:%s)=)[^&]*" % "|".join(SECRET_QUERY_PARAMS))


def redact_url(url: str) -> str:
    """Return ``url`` with every password replaced by ``***``.

    Textual, so it also works on what no parser accepts: the password in the
    user-info part (which may itself contain ``@``, ``/``, ``?`` or ``:`` -- the
    user-info ends at the *last* ``@`` of the authority) and the query parameters
    ``password``, ``passwd``, ``pwd`` and ``sslpassword`` in any case. Where it is
    unclear where the user-info ends, it hides too much rather than too little.
    """
    masked = _QUERY_SECRET.sub(r"\1***", str(url))
    span = _password_span(masked)
    if span is None:
        return masked
    start, end = span
    return masked[:start] + "***" + masked[end:]


def _password_span(url: str) -> tuple[int, int] | None:
    """``(start, end)`` of the password in ``scheme://user:password@host...``, or None."""
    scheme_end = url.find("://")
    if scheme_end < 0:
        return None
    start = scheme_end + 3
    if url.startswith("/", start):  # no authority at all (sqlite:///path)
        return None
    # The user-info ends at the last "@": a password may hold "@", "/", "?" or "#", a host
    # name none of them. (A raw "@" in the path or a query value hides the host too.)
    at = url.rfind("@", start)
    if at < 0:
        return None
    colon = url.find(":", start, at)
    if colon < 0:  # a user name, no password
        return None
    return colon + 1, at


def url_secrets(url: URL) -> list[str]:
    """The passwords an SQLAlchemy URL carries (user-info and query), to mask in messages."""
    secrets = [url.password] if url.password else []
    for key, value in url.query.items():
        if key.lower() in SECRET_QUERY_PARAMS:
            secrets.extend(v for v in ([value] if isinstance(value, str) else value) if v)
    return [str(s) for s in secrets]


def engine_label(engine: Engine) -> str:
    """The engine's URL for messages, password hidden."""
    return redact_url(engine.url.render_as_string(hide_password=False))


def one_line(message: str, *secrets: str | None) -> str:
    """Squash a message to one trimmed line, with each of ``secrets`` masked."""
    for secret in sorted(filter(None, secrets), key=len, reverse=True):
        message = message.replace(secret, "***")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if len(line) > _MAX_MESSAGE:
        line = line[: _MAX_MESSAGE - 3] + "..."
    return line


def reason(exc: BaseException) -> str:
    """A short human reason for ``exc`` (driver message first, no SQL, no parameters)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        text_ = str(exc.orig)
    elif isinstance(exc, SQLAlchemyError):
        text_ = str(exc)
    else:
        text_ = str(exc)
        text_ = f"{type(exc).__name__}: {text_}" if text_ else type(exc).__name__
    return text_ or type(exc).__name__


#: driver error codes of a deadlock the server resolved by aborting one transaction
_DEADLOCK_CODES = {"40P01", "40001", 1213, 1205}


def is_deadlock(exc: BaseException) -> bool:
    """Whether ``exc`` is a deadlock (or serialisation failure) worth retrying the transaction for."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    code = getattr(orig, "pgcode", None)
    if code is None and getattr(orig, "args", None):
        code = orig.args[0]
    return code in _DEADLOCK_CODES


def is_missing_table(exc: BaseException) -> bool:
    """Whether ``exc`` says a table does not exist (SQLite, PostgreSQL 42P01, MySQL 1146)."""
    orig = getattr(exc, "orig", None)
    if orig is None:
        return False
    if getattr(orig, "pgcode", None) == "42P01":
        return True
    args = getattr(orig, "args", None) or ()
    if args and args[0] == 1146:
        return True
    return "no such table" in str(orig).lower()


def _is_connect_failure(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or exc.statement is None)


def wrap(engine: Engine, action: str, exc: BaseException, note: str = "") -> AppDatabaseError:
    """Turn any failure into a one-line, password-free :class:`AppDatabaseError`."""
    label = engine_label(engine)
    secrets = url_secrets(engine.url)
    why = one_line(reason(exc), *secrets)
    if _is_connect_failure(exc):
        message = f"app database unreachable ({label}){note}: {why}"
    elif is_missing_table(exc) and not action.startswith("init-db"):  # init-db itself: no hint to run it
        return SchemaMissingError(one_line(f"{action} failed{note} ({label}): {INIT_DB_HINT} ({why})", *secrets))
    else:
        message = f"{action} failed{note} ({label}): {why}"
    return AppDatabaseError(one_line(message, *secrets))


@contextmanager
def errors(engine: Engine, action: str, note: str = "") -> Iterator[None]:
    """Re-raise any failure inside the block as :func:`wrap` does."""
    try:
        yield
    except AppDatabaseError:
        raise
    except Exception as exc:
        raise wrap(engine, action, exc, note=note) from exc
