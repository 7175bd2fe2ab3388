"""Instance ids: which are usable, which could only match by accident, how to log them.

Pure (no I/O); used by billing (record validation, requests), the rules (app rows that
resemble a refused billing id), the HTTP app (instance tokens, webhooks) and the nets.

SPEC "Reconciliation rules": ids are compared exactly, and an id that could only match by
accident is refused -- leading or trailing whitespace, not in Unicode NFC, or holding a
control, format, line/paragraph-separator (or surrogate) character. Such a billing id is
an ``invalid_record``; an app row whose id equals it once stripped and normalised
(:func:`resemblance`) is reported as ``invalid_record`` too and left alone.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = [
    "MAX_INSTANCE_ID_LENGTH",
    "instance_id_problem",
    "lookalike_mask",
    "lookalike_problem",
    "log_safe",
    "resemblance",
    "unusable_problem",
]

MAX_INSTANCE_ID_LENGTH = 256
#: Unicode categories an id must not hold: control, format, line/paragraph separator, surrogate
_REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
#: ASCII a clean id may hold anywhere but at its ends (the C0 controls and DEL never)
_ASCII_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def unusable_problem(value: Any) -> str | None:
    """Why ``value`` cannot be an id at all (missing, not a string, empty, too long); None if it can."""
    if value is None:
        return "missing instance_id"
    if not isinstance(value, str):
        return f"instance_id is not a string ({type(value).__name__})"
    if not value:
        return "empty instance_id"
    if len(value) > MAX_INSTANCE_ID_LENGTH:
        return f"instance_id longer than {MAX_INSTANCE_ID_LENGTH} characters"
    return None


def lookalike_problem(value: str) -> str | None:
    """Why the string ``value`` could only match an id by accident; None when it is clean."""
    if value != value.strip():
        return f"instance_id has leading or trailing whitespace: {_short(value)}"
    if value.isascii():
        if _ASCII_CONTROL_RE.search(value):
            return f"instance_id contains control characters: {_short(value)}"
        return None
    bad = sorted({unicodedata.category(c) for c in value} & _REFUSED_CATEGORIES)
    if bad:
        return f"instance_id contains {'/'.join(bad)} characters: {_short(value)}"
    if not unicodedata.is_normalized("NFC", value):
        return f"instance_id is not in Unicode NFC: {_short(value)}"
    return None


def instance_id_problem(value: Any) -> str | None:
    """Why ``value`` is not a usable instance id (None when it is): unusable or a look-alike."""
    problem = unusable_problem(value)
    return problem if problem is not None else lookalike_problem(value)


def resemblance(value: str) -> str:
    """``value`` with the characters that make a look-alike taken out: the id it resembles."""
    kept = "".join(c for c in value if unicodedata.category(c) not in _REFUSED_CATEGORIES)
    return unicodedata.normalize("NFC", kept.strip())


def lookalike_mask(ids: Sequence[str]) -> np.ndarray:
    """``[lookalike_problem(i) is not None for i in ids]`` for usable string ids, vectorised.

    The common case (ASCII ids without control characters) is judged on one joined
    buffer: only the first and last byte of each id can then be a problem (whitespace).
    Anything else is judged one id at a time.
    """
    n = len(ids)
    out = np.zeros(n, dtype=bool)
    if not n:
        return out
    joined = "".join(ids)
    if joined.isascii() and not _ASCII_CONTROL_RE.search(joined):
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=n)
        starts = np.zeros(n, dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        raw = np.frombuffer(joined.encode("ascii"), dtype=np.uint8)
        nonempty = lengths > 0
        edges = np.zeros(n, dtype=bool)
        edges[nonempty] = (raw[starts[nonempty]] == 32) | (raw[starts[nonempty] + lengths[nonempty] - 1] == 32)
        return edges
    for i, value in enumerate(ids):
        out[i] = lookalike_problem(value) is not None
    return out


_LOG_UNSAFE = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def log_safe(text: Any, limit: int = 200) -> str:
    """``text`` fit for one log line: control, separator and bidi characters escaped, length capped.

    An id or event type holding U+2028 or U+202E must not be able to fake or hide a log line.
    """
    value = str(text)
    if _LOG_UNSAFE.search(value):
        value = _LOG_UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", value)
    return value if len(value) <= limit else value[: limit - 3] + "..."
