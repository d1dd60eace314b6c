"""Item-level deltas: what a block of one user partition tells the item stage.

A block's ``BlockDeltas`` (from ``UserPartition.apply``) hold, per applied event, its source
offset, time, item and type weight (the popularity increment), and per co-occurrence pair the
event it came from, the window item it pairs the event's item with, and the pair's weight.
``split`` turns them into one ``DeltaMessage`` per item partition: every message carries every
event (each item partition keeps the global popularity that neighbour scores are normalised
by), a message carries the pairs with a *row* the partition owns (the event's item's, the window
item's or both, as flags: a pair adds to both rows), and the message for item partition 0 also
carries the user-profile records the long-term model is fitted from, and the forget requests
(``streamrec forget``) of the block, each at its offset, so that item partition 0 drops the
user's profile in order with those records. No other item-stage state holds a user id.

Every event and pair is attributed to its source offset, so the item stage can apply exactly the
part of a message it has not applied yet (a restarted user stage may cut its blocks differently
from the run it replaces). ``encode``/``decode`` are the wire format of the internal deltas topic:
a JSON header with the dictionaries of item and user ids, then raw little-endian arrays.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import orjson

_MAGIC = b"SRD1"
# wire layout of the arrays after the header: name, dtype (fixed widths, little-endian)
_EVENT_ARRAYS = (("ev_offset", "<i8"), ("ev_ts", "<i8"), ("ev_w", "<f8"), ("ev_item", "<i4"), ("pr_n", "<i4"))
_PAIR_ARRAYS = (("pr_j", "<i4"), ("pr_w", "<f4"), ("pr_rows", "u1"))
_PROFILE_ARRAYS = (("ev_user", "<i4"), ("ev_new", "u1"))
# per-event and per-pair bytes on the wire, for cutting oversized messages
_EVENT_BYTES = 32
_PAIR_BYTES = 9
ROW_I = 1  # ``pr_rows`` flags: the pair adds to the row of the event's item,
ROW_J = 2  # and (or) to the row of the window item
_EMPTY_I8 = np.zeros(0, dtype=np.int64)


def item_partition(item_id: str, partitions: int) -> int:
    """The item partition that owns ``item_id``'s co-occurrence row (CRC-32, like the user key)."""
    return zlib.crc32(item_id.encode()) % partitions


@dataclass
class BlockDeltas:
    """A block's deltas in the user partition's item numbering (``ids``: its ``item_ids``)."""

    ids: Sequence[str]
    ev_offset: np.ndarray  # int64, increasing
    ev_ts: np.ndarray  # int64
    ev_item: np.ndarray  # int64, into ids
    ev_w: np.ndarray  # float64, the event type's weight
    ev_user: Sequence[str]
    ev_new: np.ndarray  # bool: the item is new to the user's profile
    pr_ev: np.ndarray  # int64, event position; non-decreasing
    pr_i: np.ndarray  # int64: the event's item
    pr_j: np.ndarray  # int64: an item of the user's window
    pr_w: np.ndarray  # float64: sqrt(w_i * w_j) * pair_decay ** (d - 1)
    fg_offset: np.ndarray = field(default_factory=lambda: _EMPTY_I8)  # int64: offsets of forget requests
    fg_user: Sequence[str] = ()  # their users

    def __len__(self) -> int:
        return len(self.ev_offset)


@dataclass
class DeltaMessage:
    """One item partition's share of a block: events ``[start, end)`` of source partition
    ``source`` (offsets of invalid or duplicate events are in the range, not in the arrays).
    Event ``e`` has ``pr_n[e]`` pairs, laid out event after event; item and user fields index the
    message's own ``ids`` and ``users``."""

    source: int
    start: int
    end: int
    ids: list[str]
    ev_offset: np.ndarray
    ev_ts: np.ndarray
    ev_w: np.ndarray
    ev_item: np.ndarray
    pr_n: np.ndarray
    pr_j: np.ndarray
    pr_w: np.ndarray
    pr_rows: np.ndarray  # ROW_I | ROW_J flags: which rows of this partition the pair adds to
    users: list[str]  # empty unless the message carries profile records (item partition 0)
    ev_user: np.ndarray
    ev_new: np.ndarray
    # forget requests (item partition 0's message only): their offsets, increasing, and users
    fg_offset: np.ndarray = field(default_factory=lambda: _EMPTY_I8)
    fg_user: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ev_offset)

    def row_updates(self, first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """The message's row updates from event ``first`` on: (event position - first, row item,
        column item, pair weight), dictionary-coded, event by event."""
        p0 = int(self.pr_n[:first].sum())
        ev = np.repeat(np.arange(len(self.pr_n) - first), self.pr_n[first:])
        i = self.ev_item[first:][ev]
        j, w, rows = self.pr_j[p0:], self.pr_w[p0:], self.pr_rows[p0:]
        a = (rows & ROW_I) > 0
        b = (rows & ROW_J) > 0
        order = np.argsort(np.concatenate([ev[a], ev[b]]), kind="stable")
        cat = np.concatenate
        return (
            cat([ev[a], ev[b]])[order],
            cat([i[a], j[b]])[order],
            cat([j[a], i[b]])[order],
            cat([w[a], w[b]])[order],
        )


def split(d: BlockDeltas, source: int, start: int, end: int, routes: np.ndarray, partitions: int) -> list[DeltaMessage]:
    """One message per item partition (``routes[i]``: the partition of local item ``i``)."""
    qi, qj = routes[d.pr_i], routes[d.pr_j]
    wts = d.pr_w.astype(np.float32)
    n_ev = len(d.ev_item)
    out = []
    for q in range(partitions):
        flags = (qi == q).astype(np.uint8) * ROW_I | (qj == q).astype(np.uint8) * ROW_J
        keep = flags > 0
        j = d.pr_j[keep]
        local, inv = np.unique(np.concatenate([d.ev_item, j]), return_inverse=True)
        ids = [d.ids[k] for k in local.tolist()]
        if q == 0:
            users, ev_user = _dictionary(d.ev_user)
            ev_new = d.ev_new.astype(np.uint8)
            fg_offset, fg_user = d.fg_offset, list(d.fg_user)
        else:
            users, ev_user, ev_new = [], _EMPTY_I4, _EMPTY_U1
            fg_offset, fg_user = _EMPTY_I8, []
        out.append(
            DeltaMessage(
                source,
                start,
                end,
                ids,
                d.ev_offset,
                d.ev_ts,
                d.ev_w,
                inv[:n_ev].astype(np.int32),
                np.bincount(d.pr_ev[keep], minlength=n_ev).astype(np.int32),
                inv[n_ev:].astype(np.int32),
                wts[keep],
                flags[keep],
                users,
                ev_user,
                ev_new,
                fg_offset,
                fg_user,
            )
        )
    return out


def _dictionary(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    index: dict[str, int] = {}
    codes = np.fromiter((index.setdefault(v, len(index)) for v in values), dtype=np.int32, count=len(values))
    return list(index), codes


def cut(m: DeltaMessage, max_bytes: int) -> list[DeltaMessage]:
    """``m`` as consecutive messages of at most about ``max_bytes`` each, cut between events:
    the first covers ``[m.start, o_k)``, the next ``[o_k, ...)`` and so on, so each applies on its
    own. Every piece repeats the dictionaries (cut only when a block is very large)."""
    n = len(m)
    if n <= 1:
        return [m]
    per_event = _EVENT_BYTES + _PAIR_BYTES * m.pr_n.astype(np.int64) + (5 if m.users else 0)
    fixed = 64 + sum(len(x) + 3 for x in m.ids) + sum(len(x) + 3 for x in m.users) + sum(len(x) + 24 for x in m.fg_user)
    if fixed + int(per_event.sum()) <= max_bytes:
        return [m]
    cum = np.cumsum(per_event)
    budget = max(max_bytes - fixed, 1)
    cuts = [0]
    while cuts[-1] < n:
        base = cum[cuts[-1] - 1] if cuts[-1] else 0
        nxt = int(np.searchsorted(cum, base + budget, side="right"))
        cuts.append(min(max(nxt, cuts[-1] + 1), n))
    pairs_at = np.concatenate([[0], np.cumsum(m.pr_n.astype(np.int64))])
    out = []
    for a, b in zip(cuts[:-1], cuts[1:], strict=True):
        pa, pb = int(pairs_at[a]), int(pairs_at[b])
        start = m.start if a == 0 else int(m.ev_offset[a])
        end = m.end if b == n else int(m.ev_offset[b])
        fa, fb = np.searchsorted(m.fg_offset, [start, end]).tolist()  # the forgets in [start, end)
        out.append(
            DeltaMessage(
                m.source,
                start,
                end,
                m.ids,
                m.ev_offset[a:b],
                m.ev_ts[a:b],
                m.ev_w[a:b],
                m.ev_item[a:b],
                m.pr_n[a:b],
                m.pr_j[pa:pb],
                m.pr_w[pa:pb],
                m.pr_rows[pa:pb],
                m.users,
                m.ev_user[a:b] if m.users else m.ev_user,
                m.ev_new[a:b] if m.users else m.ev_new,
                m.fg_offset[fa:fb],
                m.fg_user[fa:fb],
            )
        )
    return out


def encode(m: DeltaMessage) -> bytes:
    header = orjson.dumps(
        {
            "source": m.source,
            "start": m.start,
            "end": m.end,
            "events": len(m.ev_offset),
            "pairs": len(m.pr_j),
            "ids": m.ids,
            "users": m.users,
            # only where there are some: the header stays as it was for every other message
            **({"forget": [[o, u] for o, u in zip(m.fg_offset.tolist(), m.fg_user, strict=True)]} if m.fg_user else {}),
        }
    )
    parts = [_MAGIC, len(header).to_bytes(4, "little"), header]
    size = 8 + len(header)
    arrays = _EVENT_ARRAYS + _PAIR_ARRAYS + (_PROFILE_ARRAYS if m.users else ())
    for name, dt in arrays:
        pad = -size % 8  # keep every array 8-byte aligned in the buffer
        parts.append(b"\0" * pad)
        raw = np.ascontiguousarray(getattr(m, name), dtype=dt).tobytes()
        parts.append(raw)
        size += pad + len(raw)
    return b"".join(parts)


def decode(blob: bytes) -> DeltaMessage:
    """The message ``encode`` wrote; ValueError if ``blob`` is not one."""
    if blob[:4] != _MAGIC:
        raise ValueError("not a streamrec delta message (bad magic)")
    n = int.from_bytes(blob[4:8], "little")
    try:
        h = orjson.loads(blob[8 : 8 + n])
        pos = 8 + n
        n_ev, n_pr = int(h["events"]), int(h["pairs"])
        forget = h.get("forget") or []
        fg_offset = np.asarray([int(o) for o, _ in forget], dtype=np.int64)
        fg_user = [str(u) for _, u in forget]
        arrays = [(x, n_ev) for x in _EVENT_ARRAYS] + [(x, n_pr) for x in _PAIR_ARRAYS]
        if h["users"]:
            arrays += [(x, n_ev) for x in _PROFILE_ARRAYS]
        got: dict[str, np.ndarray] = {}
        for (name, dt), count in arrays:
            pos += -pos % 8
            size = np.dtype(dt).itemsize * count
            if pos + size > len(blob):
                raise ValueError("truncated")
            got[name] = np.frombuffer(blob, dtype=dt, count=count, offset=pos)
            pos += size
    except (orjson.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"malformed delta message header ({type(e).__name__})") from None
    if int(got["pr_n"].sum()) != n_pr:
        raise ValueError("malformed delta message (pair counts do not add up)")
    return DeltaMessage(
        int(h["source"]),
        int(h["start"]),
        int(h["end"]),
        list(h["ids"]),
        got["ev_offset"],
        got["ev_ts"],
        got["ev_w"],
        got["ev_item"],
        got["pr_n"],
        got["pr_j"],
        got["pr_w"],
        got["pr_rows"],
        list(h["users"]),
        got.get("ev_user", _EMPTY_I4),
        got.get("ev_new", _EMPTY_U1),
        fg_offset,
        fg_user,
    )


_EMPTY_I4 = np.zeros(0, dtype=np.int32)
_EMPTY_U1 = np.zeros(0, dtype=np.uint8)
