"""The event contract: decoding and validation of one raw Kafka message value.

Producers publish JSON objects (see README, "Events in"). ``decode`` turns raw bytes into an
``Event`` or raises ``InvalidEvent`` with a short, log-safe reason (it never echoes the payload,
which may hold personal data).

The events topic also carries *control* messages, which producers never send: a JSON object with
a ``control`` field, today only ``{"control": "forget", "user_id": ..., "ts": ...}`` (written by
``streamrec forget``, keyed by the user like their events). It travels on the events topic, and
not on a topic of its own, so that the owner of the user's partition meets it in order with the
user's events. ``decode_message`` returns it as a ``Forget``; ``decode`` still accepts events
only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

DEFAULT_TYPE_WEIGHTS: Mapping[str, float] = {"view": 1.0, "click": 1.5, "purchase": 2.0}
MAX_ID_CHARS = 128
# A timestamp outside [1970, 2300) is almost certainly seconds-vs-ms confusion or garbage.
_MIN_TS_MS = 0
_MAX_TS_MS = 10_413_792_000_000


class InvalidEvent(ValueError):
    """A message that breaks the event contract; ``reason`` is safe to log and to put in the DLQ."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Event:
    """One validated interaction. ``ts`` is event time in milliseconds since the epoch."""

    user_id: str
    item_id: str
    type: str
    ts: int
    event_id: str | None = None
    props: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"user_id": self.user_id, "item_id": self.item_id, "type": self.type, "ts": self.ts}
        if self.event_id is not None:
            d["event_id"] = self.event_id
        if self.props is not None:
            d["props"] = self.props
        return d


_SLOTS = Event.__dict__
_SET_USER, _SET_ITEM, _SET_TYPE, _SET_TS, _SET_EID, _SET_PROPS = (
    _SLOTS[f].__set__ for f in ("user_id", "item_id", "type", "ts", "event_id", "props")
)


def _event(uid: str, item: str, etype: str, ts: int, eid: str | None, props: dict[str, Any] | None) -> Event:
    """``Event(uid, item, etype, ts, eid, props)``, its slots set directly: half the time of a
    frozen dataclass's ``__init__`` (one ``object.__setattr__`` call per field). The arguments
    must already be valid (``EventSchema.from_obj``)."""
    e: Event = object.__new__(Event)
    _SET_USER(e, uid)
    _SET_ITEM(e, item)
    _SET_TYPE(e, etype)
    _SET_TS(e, ts)
    _SET_EID(e, eid)
    _SET_PROPS(e, props)
    return e


CONTROL_FIELD = "control"
FORGET = "forget"


@dataclass(frozen=True, slots=True)
class Forget:
    """A control message: forget everything kept about ``user_id`` (``streamrec forget``).
    ``ts``: when it was requested (wall clock, ms), for the audit trail only; it moves no event
    time, so a replay of the log forgets the same way whenever it runs."""

    user_id: str
    ts: int | None = None


def forget_message(user_id: str, ts: int | None = None) -> bytes:
    """The value of a forget request on the events topic (key: ``user_id``, as its events)."""
    obj: dict[str, Any] = {CONTROL_FIELD: FORGET, "user_id": user_id}
    if ts is not None:
        obj["ts"] = ts
    return orjson.dumps(obj)


def check_user_id(user_id: str) -> str:
    """``user_id`` if the event contract accepts it, else ``InvalidEvent``."""
    return _id({"user_id": user_id}, "user_id")


@dataclass(frozen=True, slots=True)
class EventSchema:
    """What counts as valid: the accepted types and the size limits (all configurable)."""

    types: frozenset[str] = frozenset(DEFAULT_TYPE_WEIGHTS)
    max_bytes: int = 16_384
    max_props_bytes: int = 4_096

    def decode(self, raw: bytes | None) -> Event:
        """Validate one message value; raise ``InvalidEvent`` with the first rule it breaks."""
        return self.from_obj(self._object(raw))

    def decode_message(self, raw: bytes | None) -> Event | Forget:
        """An event, or a control message (``Forget``); ``InvalidEvent`` for anything else,
        including a control message of an unknown kind."""
        obj = self._object(raw)
        if CONTROL_FIELD in obj:
            return self.control_from_obj(obj)
        return self.from_obj(obj)

    def control_from_obj(self, obj: Mapping[str, Any]) -> Forget:
        kind = obj.get(CONTROL_FIELD)
        if kind != FORGET:
            shown = kind[:32] if isinstance(kind, str) else type(kind).__name__
            raise InvalidEvent(f"unknown control message: {shown!r}")
        user_id = _id(obj, "user_id")
        ts = obj.get("ts")
        return Forget(user_id, parse_ts(ts) if ts is not None else None)

    def _object(self, raw: bytes | None) -> dict[str, Any]:
        if raw is None or len(raw) == 0:
            raise InvalidEvent("empty message")
        if len(raw) > self.max_bytes:
            raise InvalidEvent(f"oversize message: {len(raw)} bytes > {self.max_bytes}")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise InvalidEvent("not valid UTF-8 JSON") from None
        if not isinstance(obj, dict):
            raise InvalidEvent(f"expected a JSON object, got {type(obj).__name__}")
        return obj

    def from_obj(self, obj: Mapping[str, Any]) -> Event:
        """Validate an already-parsed JSON object (the replay tool and tests use this too).

        The usual event (string ids, integer milliseconds, props an object if any) is checked
        inline and built without the frozen dataclass's ``__init__``: a worker decodes every
        event, and those two cost more than the JSON parse. Anything else takes ``_checked``,
        which says what is wrong; both accept exactly the same events."""
        u, i, t, ts, eid = obj.get("user_id"), obj.get("item_id"), obj.get("type"), obj.get("ts"), obj.get("event_id")
        if (
            type(u) is str
            and 0 < len(u) <= MAX_ID_CHARS
            and type(i) is str
            and 0 < len(i) <= MAX_ID_CHARS
            and type(t) is str
            and t in self.types
            and type(ts) is int
            and _MIN_TS_MS <= ts < _MAX_TS_MS
            and (eid is None or (type(eid) is str and 0 < len(eid) <= MAX_ID_CHARS))
            and ((props := obj.get("props")) is None or (type(props) is dict and self._props_fit(props)))
        ):
            return _event(u, i, t, ts, eid, props)
        return self._checked(obj)

    def _props_fit(self, props: dict[str, Any]) -> bool:
        return len(orjson.dumps(props)) <= self.max_props_bytes

    def _checked(self, obj: Mapping[str, Any]) -> Event:
        user_id = _id(obj, "user_id")
        item_id = _id(obj, "item_id")
        etype = obj.get("type")
        if not isinstance(etype, str):
            raise InvalidEvent("missing or non-string field: type")
        if etype not in self.types:
            raise InvalidEvent(f"unknown event type: {etype[:32]!r}")
        ts = parse_ts(obj.get("ts"))
        event_id = obj.get("event_id")
        if event_id is not None:
            if not isinstance(event_id, (str, int)) or isinstance(event_id, bool):
                raise InvalidEvent("event_id must be a string")
            event_id = str(event_id)
            if not 1 <= len(event_id) <= MAX_ID_CHARS:
                raise InvalidEvent(f"event_id must be 1-{MAX_ID_CHARS} chars")
        props = obj.get("props")
        if props is not None:
            if not isinstance(props, dict):
                raise InvalidEvent("props must be an object")
            if not self._props_fit(props):
                raise InvalidEvent(f"props larger than {self.max_props_bytes} bytes")
        return Event(user_id, item_id, etype, ts, event_id, props)


def _id(obj: Mapping[str, Any], field: str) -> str:
    v = obj.get(field)
    if isinstance(v, str):
        s = v
    elif isinstance(v, int) and not isinstance(v, bool):
        s = str(v)
    elif v is None:
        raise InvalidEvent(f"missing field: {field}")
    else:
        raise InvalidEvent(f"{field} must be a string or an integer, got {type(v).__name__}")
    if not 1 <= len(s) <= MAX_ID_CHARS:
        raise InvalidEvent(f"{field} must be 1-{MAX_ID_CHARS} chars, got {len(s)}")
    return s


def parse_ts(v: object) -> int:
    """Event time in ms: an integer of milliseconds, or an ISO-8601 string (naive means UTC).

    >>> parse_ts(1700000000000)
    1700000000000
    >>> parse_ts("2023-11-14T22:13:20Z")
    1700000000000
    """
    if isinstance(v, int) and not isinstance(v, bool):
        ts = v
    elif isinstance(v, str):
        try:
            dt = datetime.fromisoformat(v)
        except ValueError:
            raise InvalidEvent("ts is not an ISO-8601 timestamp") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=UTC)
        ts = int(round(dt.timestamp() * 1000))
    elif v is None:
        raise InvalidEvent("missing field: ts")
    else:
        raise InvalidEvent(f"ts must be integer milliseconds or an ISO-8601 string, got {type(v).__name__}")
    if not _MIN_TS_MS <= ts < _MAX_TS_MS:
        raise InvalidEvent("ts out of range (expects milliseconds since the epoch)")
    return ts
