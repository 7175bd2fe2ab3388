"""The sensors' JSON cursors: batches in flight, the webhook high-water mark, the
provisioning watermark and look-back set (semantics in :mod:`creditsync_pipeline.defs.sensors`)."""

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

logger = logging.getLogger("creditsync")


@dataclass
class Batch:
    """One requested run: the rows (or instances) it covers, when it was requested."""

    ids: list[Any]
    at: float
    #: provisioning: the how-manieth run for these instances
    attempt: int = 1
    #: webhook: earlier dispatches of a row that settled without processing it (sparse)
    tries: dict[str, int] = field(default_factory=dict)

    def dump(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"ids": self.ids, "at": round(self.at, 3), "attempt": self.attempt}
        if self.tries:
            doc["tries"] = self.tries
        return doc

    @classmethod
    def load(cls, raw: Any) -> "Batch":
        return cls(
            ids=list(raw.get("ids", [])),
            at=float(raw.get("at", 0.0)),
            attempt=int(raw.get("attempt", 1)),
            tries={str(k): int(v) for k, v in dict(raw.get("tries", {})).items()},
        )


@dataclass
class _CursorBase:
    gen: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    seq: int = 0
    inflight: dict[str, Batch] = field(default_factory=dict)

    def next_key(self, net: str) -> str:
        self.seq += 1
        return f"{net}-{self.gen}-{self.seq}"

    def _base_dump(self) -> dict[str, Any]:
        return {"v": 1, "gen": self.gen, "seq": self.seq, "inflight": {k: b.dump() for k, b in self.inflight.items()}}

    def _base_load(self, raw: dict[str, Any]) -> None:
        self.gen = str(raw["gen"])
        self.seq = int(raw.get("seq", 0))
        self.inflight = {str(k): Batch.load(v) for k, v in dict(raw.get("inflight", {})).items()}


@dataclass
class WebhookCursor(_CursorBase):
    #: highest billing_webhook_events.id handed out
    hw: int = 0
    #: row id -> [epoch seconds before which it is not retried, dispatches so far]
    wait: dict[int, list[float]] = field(default_factory=dict)

    def dump(self) -> str:
        doc = self._base_dump()
        doc.update({"hw": self.hw, "wait": {str(k): [round(v[0], 3), int(v[1])] for k, v in sorted(self.wait.items())}})
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None, log: Any = None) -> "WebhookCursor":
        state = cls()
        if not text:
            return state
        try:
            raw = json.loads(text)
            state._base_load(raw)
            state.hw = int(raw.get("hw", 0))
            state.wait = {int(k): [float(v[0]), int(v[1])] for k, v in dict(raw.get("wait", {})).items()}
        except (ValueError, TypeError, KeyError, AttributeError):
            (log or logger).warning("[CreditSync] billing_webhook_sensor: unreadable cursor; starting over")
            return cls()
        return state


@dataclass
class NewInstanceCursor(_CursorBase):
    #: newest created_at handed out (ISO-8601), None before the first instance
    wm: str | None = None
    #: instance_id -> created_at (ISO-8601) of ids handed out inside the look-back window
    seen: dict[str, str] = field(default_factory=dict)
    #: batches waiting for a retry: {"ids", "attempt", "not_before"}
    retry: list[dict[str, Any]] = field(default_factory=list)

    def dump(self) -> str:
        doc = self._base_dump()
        doc.update({"wm": self.wm, "seen": self.seen, "retry": self.retry})
        return json.dumps(doc, separators=(",", ":"))

    @classmethod
    def load(cls, text: str | None, log: Any = None) -> "NewInstanceCursor":
        state = cls()
        if not text:
            return state
        try:
            raw = json.loads(text)
            state._base_load(raw)
            state.wm = raw.get("wm")
            if state.wm is not None:
                _parse_time(state.wm)
            state.seen = {str(k): str(v) for k, v in dict(raw.get("seen", {})).items()}
            state.retry = [
                {"ids": list(r["ids"]), "attempt": int(r["attempt"]), "not_before": float(r["not_before"])}
                for r in list(raw.get("retry", []))
            ]
        except (ValueError, TypeError, KeyError, AttributeError):
            (log or logger).warning("[CreditSync] new_instance_sensor: unreadable cursor; starting over")
            return cls()
        return state


def _parse_time(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)

