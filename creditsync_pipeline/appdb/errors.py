"""Errors of the app-database layer: one line, never a password.

Every error that leaves :mod:`creditsync_pipeline.appdb` is an
:class:`AppDatabaseError` built here.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

_MAX_MESSAGE = 400


class AppDatabaseError(Exception):
    """An app-database operation failed; the message is one line and password-free."""


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``."""
    url = str(url)
    try:
        from sqlalchemy.engine import make_url

        rendered = make_url(url).render_as_string(hide_password=True)
    except Exception:  # not parseable as an SQLAlchemy URL: redact textually
        rendered = re.sub(r"(://[^:/@?#]*):[^@/?#]*@", r"\1:***@", url)
    # Passwords given as query parameters (e.g. ?password=...) are hidden too.
    return re.sub(r"(?i)([?&](?:password|passwd|pwd)=)[^&#]*", r"\1***", rendered)


def engine_label(engine: Engine) -> str:
    """The engine's URL for messages, password hidden."""
    return redact_url(engine.url.render_as_string(hide_password=False))


def one_line(message: str, secret: str | None = None) -> str:
    """Squash a message to one trimmed line, with ``secret`` masked."""
    if secret:
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


def _is_connect_failure(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (exc.connection_invalidated or exc.statement is None)


def wrap(engine: Engine, action: str, exc: BaseException, note: str = "") -> AppDatabaseError:
    """Turn any failure into a one-line, password-free :class:`AppDatabaseError`."""
    label = engine_label(engine)
    password = engine.url.password
    why = one_line(reason(exc), password)
    if _is_connect_failure(exc):
        message = f"app database unreachable ({label}){note}: {why}"
    else:
        message = f"{action} failed{note} ({label}): {why}"
    return AppDatabaseError(one_line(message, password))


@contextmanager
def errors(engine: Engine, action: str) -> Iterator[None]:
    """Re-raise any failure inside the block as :func:`wrap` does."""
    try:
        yield
    except AppDatabaseError:
        raise
    except Exception as exc:
        raise wrap(engine, action, exc) from exc
