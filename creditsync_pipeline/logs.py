"""Where the operator lines go: the terminal, and ``CREDITSYNC_LOG_FILE``.

``CREDITSYNC_LOG_FILE`` (a path) makes every process -- the CLI, ``creditsync serve``,
Dagster runs -- append its ``creditsync`` log lines to that one file, so
``tail -f logs/server.log | grep CreditSync`` works as in the original runbook. Several
processes write the same file at once and it rotates by size: ``concurrent-log-handler``
(a lock file beside the log serialises the writes and the rollover; the standard
``RotatingFileHandler`` would lose or interleave lines when two processes rotate).

Every line passes :class:`SecretMask` first: the secrets set in the environment are
replaced by ``***`` even should one ever reach a message.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

LOG_FILE_ENV = "CREDITSYNC_LOG_FILE"
#: rotate at this size, keep this many old files (``server.log.1`` ...)
MAX_BYTES = 10 * 1024 * 1024
BACKUP_COUNT = 5
FILE_FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(message)s"
#: the loggers whose lines are creditsync's own (the sync service, serve, sensors)
LOGGER_NAME = "creditsync"

_lock = threading.Lock()
_handlers: dict[str, logging.Handler] = {}


class LogFileError(Exception):
    """``CREDITSYNC_LOG_FILE`` cannot be opened (one line, the path only)."""


class SecretMask(logging.Filter):
    """Replace each secret in a record's message by ``***`` (longest first)."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = sorted({s for s in secrets if s and len(s) >= 4}, key=len, reverse=True)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        message = record.getMessage()
        masked = message
        for secret in self.secrets:
            masked = masked.replace(secret, "***")
        if masked != message:
            record.msg, record.args = masked, None
        return True


class DropErrors(logging.Filter):
    """Keep ERROR lines off the terminal of a one-shot command (it prints its own error line)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


def env_secrets(env: Mapping[str, str] | None = None) -> list[str]:
    """The secret values set in the environment (tokens, keys, signing secrets, DB passwords)."""
    env = os.environ if env is None else env
    names = (
        "BILLING_API_TOKEN", "CREDITSYNC_APP_SECRET", "CREDITSYNC_WEBHOOK_SECRET", "WIX_APP_SECRET",
        "STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "DAGSTER_PG_PASSWORD",
    )
    values = [env.get(n, "") for n in names]
    url = env.get("DATABASE_URL", "")
    if url:
        from sqlalchemy.engine import make_url  # only when a URL is set

        try:
            values.append(make_url(url).password or "")
        except Exception:  # noqa: BLE001 - an unparseable URL is reported elsewhere
            pass
    return [str(v) for v in values if v and len(str(v)) >= 4]


def log_file_path(env: Mapping[str, str] | None = None) -> Path | None:
    """``CREDITSYNC_LOG_FILE`` as a path, or None when unset."""
    raw = ((os.environ if env is None else env).get(LOG_FILE_ENV) or "").strip()
    return Path(raw).expanduser() if raw else None


def file_handler(path: Path, *, secrets: Iterable[str] = ()) -> logging.Handler:
    """A size-rotating handler that several processes may share; creates the directory."""
    from concurrent_log_handler import ConcurrentRotatingFileHandler

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = ConcurrentRotatingFileHandler(
            str(path), mode="a", maxBytes=MAX_BYTES, backupCount=BACKUP_COUNT, encoding="utf-8"
        )
    except OSError as exc:
        raise LogFileError(f"{LOG_FILE_ENV}: cannot open {path}: {exc.strerror or type(exc).__name__}") from None
    handler.setFormatter(logging.Formatter(FILE_FORMAT))
    handler.addFilter(SecretMask(secrets))
    handler.setLevel(logging.INFO)
    return handler


def shared_handler(path: Path) -> logging.Handler:
    """This process's one handler for the file at ``path`` (opened on first use)."""
    key = str(path.expanduser().resolve())
    with _lock:
        handler = _handlers.get(key)
        if handler is None:
            handler = _handlers[key] = file_handler(path, secrets=env_secrets())
    return handler


def attach_log_file(
    env: Mapping[str, str] | None = None, *, logger: logging.Logger | None = None
) -> logging.Handler | None:
    """Send ``logger`` (default: ``creditsync``) to ``CREDITSYNC_LOG_FILE`` too; idempotent.

    One handler per file per process, added once per logger. Returns it, or None when
    the variable is unset. Raises :class:`LogFileError` when the file cannot be opened.
    """
    path = log_file_path(env)
    if path is None:
        return None
    handler = shared_handler(path)
    target = logger if logger is not None else logging.getLogger(LOGGER_NAME)
    with _lock:
        if handler not in target.handlers:
            target.addHandler(handler)
        if target.level == logging.NOTSET or target.level > logging.INFO:
            target.setLevel(logging.INFO)
    return handler


class RunLogFileHandler(logging.Handler):
    """Dagster runs' lines to ``CREDITSYNC_LOG_FILE`` (``python_logs`` in ``dagster.yaml``).

    Dagster builds the ``dagster_handler_config`` handlers for every run; this one only
    forwards to the process's shared file handler, so no run opens the file twice, and
    does nothing when ``CREDITSYNC_LOG_FILE`` is unset. A run's line reads
    ``<job> - <run id> - <step> - <message>``, so ``grep CreditSync`` finds it.
    """

    def __init__(self, level: int | str = logging.INFO) -> None:
        super().__init__(level)
        path = log_file_path()
        self._target = shared_handler(path) if path is not None else None

    def emit(self, record: logging.LogRecord) -> None:
        if self._target is not None:
            self._target.handle(record)


def configure_terminal(*, verbose: bool = False, one_shot: bool = True, stream: Any = None) -> None:
    """The CLI's terminal logging: INFO (DEBUG with ``verbose``) on stderr.

    ``one_shot`` (every command but ``serve``/``demo``): ERROR lines stay off the terminal
    -- the command prints its own one error line -- and still reach the log file.
    """
    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter(TERMINAL_FORMAT))
    handler.addFilter(SecretMask(env_secrets()))
    if one_shot:
        handler.addFilter(DropErrors())
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_creditsync_terminal", False)]:
        root.removeHandler(old)
    handler._creditsync_terminal = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger(LOGGER_NAME).setLevel(level)
    # httpx logs every request at INFO; the sync's own lines are what ops read.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)
    # Dagster's instance storage migrates through alembic, which logs each step at INFO.
    logging.getLogger("alembic").setLevel(logging.WARNING)


def close_log_files() -> None:
    """Detach and close every log-file handler of this process (tests, a re-configured CLI)."""
    with _lock:
        handlers = list(_handlers.values())
        _handlers.clear()
    for handler in handlers:
        for logger in [logging.getLogger(), logging.getLogger(LOGGER_NAME)]:
            logger.removeHandler(handler)
        handler.close()
