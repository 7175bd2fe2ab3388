"""Mismatch report files: written safe to open in a spreadsheet, pruned after a retention.

A report names instances and plans that came from the app and from billing: text an
attacker may choose (an instance id such as ``=HYPERLINK(...)``). Every text cell that a
spreadsheet would read as a formula (it starts with ``=``, ``+``, ``-``, ``@``, a tab or a
carriage return) is written with a leading ``'``, the usual neutraliser (OWASP "CSV
injection"); numbers stay numbers.

Old reports are deleted after ``CREDITSYNC_REPORT_RETENTION_DAYS`` (default 30) whenever
a new one is written, so the schedule's four runs a day do not fill the disk.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import time
from datetime import timedelta
from pathlib import Path

import pandas as pd

__all__ = ["DEFAULT_RETENTION", "REPORT_PATTERN", "is_report_name", "link_key", "neutralise", "prune", "write_csv"]

logger = logging.getLogger("creditsync")

DEFAULT_RETENTION = timedelta(days=30)
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
#: the files the full sync writes (and the only names ``serve``'s report route answers for)
REPORT_PATTERN = "credit_mismatches-*.csv"
_REPORT_NAME = re.compile(r"credit_mismatches-[A-Za-z0-9_-]{1,64}\.csv")


def is_report_name(name: str) -> bool:
    """True for a bare report file name (no folder, no dots but the suffix's)."""
    return _REPORT_NAME.fullmatch(name) is not None


#: what a link key's HMAC covers besides the file name: the app secret also signs instance
#: tokens, so a link key must never be an HMAC of anything a token could carry
_LINK_KEY_CONTEXT = b"creditsync report link\n"


def link_key(secret: str, name: str) -> str:
    """The key of a report link: HMAC-SHA256 (app secret) of a fixed context and the file name (hex)."""
    return hmac.new(secret.encode("utf-8"), _LINK_KEY_CONTEXT + name.encode("utf-8"), hashlib.sha256).hexdigest()


def neutralise(value: object) -> object:
    """``value``, with a leading ``'`` when it is text a spreadsheet would run as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_STARTS):
        return "'" + value
    return value


def write_csv(frame: pd.DataFrame, path: Path) -> Path:
    """Write ``frame`` as CSV with every text cell neutralised; returns ``path``."""
    safe = frame.copy()
    for column in safe.columns:
        if safe[column].dtype == object or pd.api.types.is_string_dtype(safe[column]):
            safe[column] = safe[column].map(neutralise)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    safe.to_csv(tmp, index=False)
    tmp.replace(path)  # a reader never sees half a report
    return path


def prune(folder: Path, retention: timedelta = DEFAULT_RETENTION, *, pattern: str = "*.csv",
          now: float | None = None) -> list[Path]:
    """Delete the files in ``folder`` matching ``pattern`` older than ``retention``; return them."""
    if not folder.is_dir():
        return []
    horizon = (time.time() if now is None else now) - retention.total_seconds()
    removed: list[Path] = []
    for path in folder.glob(pattern):
        try:
            if path.is_file() and path.stat().st_mtime < horizon:
                path.unlink()
                removed.append(path)
        except OSError as exc:  # another process pruning at the same time, a permission problem
            logger.warning("[CreditSync] Could not prune old report %s: %s", path.name, exc.strerror or exc)
    return removed
