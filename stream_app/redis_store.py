"""Redis adapter: the reader-facing lists (one pipeline per micro-batch) and state snapshots.

Layout (prefix configurable, default ``streamrec:``), see README "Recommendations out":
``rec:{user}`` JSON list doc, ``sim:{item}`` JSON list, ``trending`` JSON list,
``unavailable`` set of item ids, ``state:{group}:{topic}:{partition}`` worker snapshots.
"""

from __future__ import annotations

import logging
import pickle
import time
from collections.abc import Iterable, Sequence
from typing import Any

import orjson
import redis

from models.ranking import RecList

log = logging.getLogger(__name__)

# Replace a list only when the stored one is older. The version is the first key of the
# document we write, and item ids are JSON-escaped strings, so the first unescaped
# '"version":' is always the top-level one. One key per call: fine under Redis Cluster.
_GUARDED_SET = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local v = tonumber(string.match(cur, '"version":(%d+)'))
  if v and v >= tonumber(ARGV[1]) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""

_SNAPSHOT_MAGIC = b"SRS1"


def rec_doc(rl: RecList, now_ms: int, model: str) -> bytes:
    return orjson.dumps(
        {
            "version": rl.version,
            "user_id": rl.user_id,
            "items": [
                {"item_id": it.item_id, "score": it.score, "explore": it.explore, "p": it.p, "reason": it.reason}
                for it in rl.items
            ],
            "event_ts": rl.event_ts,
            "generated_at": now_ms,
            "model": model,
        }
    )


class RedisStore:
    """One client per process, passed in; every write is batched into a single pipeline."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.prefix = prefix
        self._guarded = client.register_script(_GUARDED_SET)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def write(
        self,
        lists: Sequence[RecList],
        sims: Iterable[tuple[str, list[tuple[str, float]]]],
        trending: Sequence[tuple[str, float]] | None,
        model: str,
    ) -> int:
        """Write one micro-batch's outputs in one round trip; returns the number of commands."""
        now = int(time.time() * 1000)
        pipe = self.r.pipeline(transaction=False)
        n = 0
        for rl in lists:
            self._guarded(keys=[self.key("rec", rl.user_id)], args=[rl.version, rec_doc(rl, now, model)], client=pipe)
            n += 1
        for item, sim in sims:
            pipe.set(self.key("sim", item), orjson.dumps([{"item_id": j, "score": round(s, 6)} for j, s in sim]))
            n += 1
        if trending:
            pipe.set(self.key("trending"), orjson.dumps([{"item_id": j, "score": round(s, 3)} for j, s in trending]))
            n += 1
        if n:
            pipe.execute()
        return n

    def get_rec(self, user_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.key("rec", user_id))
        return orjson.loads(raw) if raw else None

    def unavailable(self) -> set[str]:
        members = self.r.smembers(self.key("unavailable"))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def set_availability(self, item_id: str, available: bool) -> None:
        if available:
            self.r.srem(self.key("unavailable"), item_id)
        else:
            self.r.sadd(self.key("unavailable"), item_id)

    # -- snapshots ---------------------------------------------------------------------------
    def _snap_key(self, group: str, topic: str, partition: int) -> str:
        return self.key("state", group, topic, str(partition))

    def save_snapshot(self, group: str, topic: str, partition: int, offset: int, state: object) -> int:
        """Store state and the offset it reflects in one SET (atomic); returns bytes written."""
        blob = _SNAPSHOT_MAGIC + pickle.dumps({"offset": offset, "state": state}, protocol=5)
        self.r.set(self._snap_key(group, topic, partition), blob)
        return len(blob)

    def load_snapshot(self, group: str, topic: str, partition: int) -> tuple[int, Any] | None:
        """(offset, state) of the newest snapshot, or None. Snapshots are trusted data: they are
        pickles written by our own workers into our own Redis."""
        blob = self.r.get(self._snap_key(group, topic, partition))
        if blob is None:
            return None
        if not isinstance(blob, bytes):
            raise TypeError("the Redis client must not decode responses")
        if not blob.startswith(_SNAPSHOT_MAGIC):
            raise ValueError(f"snapshot for partition {partition} has an unknown format")
        d = pickle.loads(blob[len(_SNAPSHOT_MAGIC) :])
        return int(d["offset"]), d["state"]
