"""Small in-process systems for unit tests: the two stages fed directly (models.simulation)."""

from __future__ import annotations

from typing import Any

from models.events import Event
from models.params import ModelParams
from models.simulation import TwoStage
from stream_app.datasets import synthetic_events


def events_of(rows: list[dict[str, Any]]) -> list[Event]:
    return [Event(str(r["user_id"]), str(r["item_id"]), str(r["type"]), int(r["ts"]), r.get("event_id")) for r in rows]


def synthetic(**kw: Any) -> list[Event]:
    return events_of(synthetic_events(**kw))


def fed(params: ModelParams, events: list[Event], block: int | None = None) -> TwoStage:
    """A one-partition system that has taken ``events`` in blocks of ``block`` (default: one)."""
    s = TwoStage(params)
    b = block or max(len(events), 1)
    for k in range(0, len(events), b):
        s.block(events[k : k + b])
    return s
