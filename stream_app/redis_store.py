"""Redis adapter: every key streamrec reads or writes, and every format, lives here.

Layout (prefix configurable, default ``streamrec:``), see README "Recommendations out":

- ``rec:{user}`` a user's list (JSON), written by the user stage, guarded by version;
- ``sim:{item}`` an item's neighbours (JSON), written by the item stage owning the item;
- ``trending`` the most popular items (JSON), written by the owner of item partition 0;
- ``unavailable`` set of item ids never to recommend (the catalogue topic);
- ``state:{group}:{topic}:{partition}`` a partition's snapshot (user or item stage) with its offset;
- ``table:{group}:{topic}`` a snapshot of a worker's item table with the table topic's offsets;
- ``long:model`` the long-term model's current version (hash: version, blob);
- ``ctr:model``, ``ctr:control``, ``ctr:metrics`` the CTR model, the trainer's exploration
  override and its metrics.

Every write of a micro-batch goes out at once (one round trip, as a pipeline).
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
# '"version":' is always the top-level one. Many keys per call: under Redis Cluster the calls
# would have to be grouped by hash slot (the README says a cluster client is not wired up).
# Set each KEYS[i] to ARGV[2i] unless it holds a list of version >= ARGV[2i-1]; returns how many
# were set. One call for many lists: redis-py spends about half as much CPU (and GIL) per list
# as with one call each.
_GUARDED_SET = """
local n = 0
for i, key in ipairs(KEYS) do
  local cur = redis.call('GET', key)
  local v = cur and tonumber(string.match(cur, '"version":(%d+)'))
  if not (v and v >= tonumber(ARGV[2 * i - 1])) then
    redis.call('SET', key, ARGV[2 * i])
    n = n + 1
  end
end
return n
"""
_GUARDED_CHUNK = 500  # lists per call: Redis runs a script alone, so keep each call short

# Publish a model version (hash fields version and blob) only over an older one.
_GUARDED_HSET = """
local cur = tonumber(redis.call('HGET', KEYS[1], 'version'))
if cur and cur >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'version', ARGV[1], 'blob', ARGV[2])
return 1
"""

_SNAPSHOT_MAGIC = b"SRS2"  # SRS1: the single-stage PartitionState of releases before the item stage

Sims = Iterable[tuple[str, list[tuple[str, float]]]]


def rec_doc(rl: RecList, now_ms: int, model: str) -> bytes:
    return orjson.dumps(
        {
            "version": rl.version,
            "user_id": rl.user_id,
            "items": [
                {"item_id": i, "score": s, "explore": e, "p": p, "reason": r}
                for i, s, e, p, r in zip(rl.item_ids, rl.scores, rl.explore, rl.p, rl.reasons, strict=True)
            ],
            "event_ts": rl.event_ts,
            "generated_at": now_ms,
            "model": model,
        }
    )


def _pack(out: list[bytes], args: Sequence[bytes]) -> None:
    """Append one command in the Redis protocol (RESP): an array of bulk strings."""
    out.append(b"*%d\r\n" % len(args))
    for a in args:
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))


def sim_doc(sim: list[tuple[str, float]]) -> bytes:
    return orjson.dumps([{"item_id": j, "score": round(s, 6)} for j, s in sim])


def trending_doc(trending: Sequence[tuple[str, float]]) -> bytes:
    return orjson.dumps([{"item_id": j, "score": round(s, 3)} for j, s in trending])


class RedisStore:
    """One client per process, passed in (it must not decode responses)."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.r = client
        self.prefix = prefix
        self._guarded = client.register_script(_GUARDED_SET)  # for its sha; called by EVALSHA in write
        self._guarded_hset = client.register_script(_GUARDED_HSET)

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- outputs of the stages ---------------------------------------------------------------
    def write(
        self,
        lists: Sequence[RecList] = (),
        sims: Sims = (),
        trending: Sequence[tuple[str, float]] | None = None,
        model: str = "",
        forget: Sequence[str] = (),
    ) -> int:
        """Write one micro-batch's outputs in one round trip; returns the number of keys it set or
        deleted (a list whose stored version is newer counts too).

        ``forget``: users whose ``rec:`` key is deleted first (``streamrec forget``): ``lists``
        then holds only lists ranked after their forget (a user who came back), which start again
        at version 1 and so must not meet the old list's version guard."""
        try:
            return self._write(lists, sims, trending, model, forget)
        except redis.exceptions.NoScriptError:
            # the server lost its script cache (a restart): load the script, write again (every
            # command here is idempotent: deletes, plain SETs and version-guarded lists)
            self._guarded.sha = self.r.script_load(_GUARDED_SET)
            return self._write(lists, sims, trending, model, forget)

    def _write(
        self,
        lists: Sequence[RecList],
        sims: Sims,
        trending: Sequence[tuple[str, float]] | None,
        model: str,
        forget: Sequence[str],
    ) -> int:
        now = int(time.time() * 1000)
        out: list[bytes] = []  # the commands, packed (RESP)
        commands = n = 0
        for user in dict.fromkeys(forget):
            _pack(out, (b"DEL", self.key("rec", user).encode()))
            commands += 1
            n += 1
        rec = self.key("rec", "").encode()
        sha = self._guarded.sha.encode()
        for a in range(0, len(lists), _GUARDED_CHUNK):
            chunk = lists[a : a + _GUARDED_CHUNK]
            args: list[bytes] = [b"EVALSHA", sha, b"%d" % len(chunk)]
            args += [rec + rl.user_id.encode() for rl in chunk]
            for rl in chunk:
                args += (b"%d" % rl.version, rec_doc(rl, now, model))
            _pack(out, args)
            commands += 1
            n += len(chunk)
        for item, sim in sims:
            _pack(out, (b"SET", self.key("sim", item).encode(), sim_doc(sim)))
            commands += 1
            n += 1
        if trending:
            _pack(out, (b"SET", self.key("trending").encode(), trending_doc(trending)))
            commands += 1
            n += 1
        if commands:
            self._execute(b"".join(out), commands)
        return n

    def _execute(self, packed: bytes, commands: int) -> None:
        """Send ``commands`` packed commands at once and read their replies: one round trip, as a
        pipeline, without redis-py packing each argument in Python (about 5 µs a list, GIL held,
        beside the stage's thread). An error reply is raised once every reply is read, so the
        connection stays in step; any other error drops the connection (the caller retries:
        every command here is idempotent)."""
        pool = self.r.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([packed])  # type: ignore[no-untyped-call]
            error: redis.exceptions.ResponseError | None = None
            for _ in range(commands):
                try:
                    conn.read_response()
                except redis.exceptions.ResponseError as e:
                    error = error or e
            if error is not None:
                raise error
        except redis.exceptions.ResponseError:
            raise
        except BaseException:
            conn.disconnect()  # type: ignore[no-untyped-call]
            raise
        finally:
            pool.release(conn)

    # -- what readers read -------------------------------------------------------------------
    def rec_key(self, user_id: str) -> str:
        return self.key("rec", user_id)

    def get_rec(self, user_id: str) -> dict[str, Any] | None:
        raw = self.r.get(self.rec_key(user_id))
        return orjson.loads(raw) if raw else None

    def get_recs(self, user_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """Several users' lists in one round trip (None where a user has none)."""
        if not user_ids:
            return []
        raws = self.r.mget([self.rec_key(u) for u in user_ids])
        return [orjson.loads(x) if x else None for x in raws]

    def get_sim(self, item_id: str) -> list[dict[str, Any]] | None:
        raw = self.r.get(self.key("sim", item_id))
        return orjson.loads(raw) if raw else None

    def get_sims(self, item_ids: Sequence[str]) -> list[list[dict[str, Any]] | None]:
        if not item_ids:
            return []
        raws = self.r.mget([self.key("sim", i) for i in item_ids])
        return [orjson.loads(x) if x else None for x in raws]

    def get_trending(self) -> list[dict[str, Any]]:
        raw = self.r.get(self.key("trending"))
        return orjson.loads(raw) if raw else []

    def top_items(self, user_id: str, k: int) -> list[str]:
        """What a reader shows ``user_id``: their list's first ``k`` items, else trending."""
        doc = self.get_rec(user_id)
        items = doc["items"] if doc is not None else self.get_trending()
        return [it["item_id"] for it in items][:k]

    # -- catalogue ---------------------------------------------------------------------------
    def unavailable(self) -> set[str]:
        members = self.r.smembers(self.key("unavailable"))
        return {m.decode() if isinstance(m, bytes) else str(m) for m in members}

    def set_availability(self, item_id: str, available: bool) -> None:
        if available:
            self.r.srem(self.key("unavailable"), item_id)
        else:
            self.r.sadd(self.key("unavailable"), item_id)

    # -- snapshots ---------------------------------------------------------------------------
    def snapshot_key(self, group: str, topic: str, partition: int) -> str:
        return self.key("state", group, topic, str(partition))

    def save_snapshot(self, group: str, topic: str, partition: int, offset: int, state: object) -> int:
        """Store state and the offset it reflects in one SET (atomic); returns bytes written."""
        blob = _SNAPSHOT_MAGIC + pickle.dumps({"offset": offset, "state": state}, protocol=5)
        self.r.set(self.snapshot_key(group, topic, partition), blob)
        return len(blob)

    def load_snapshot(self, group: str, topic: str, partition: int) -> tuple[int, Any] | None:
        """(offset, state) of the newest snapshot, or None. Snapshots are trusted data: they are
        pickles written by our own workers into our own Redis."""
        d = self._load(self.snapshot_key(group, topic, partition), f"partition {partition} of {topic}")
        return None if d is None else (int(d["offset"]), d["state"])

    def save_table(self, group: str, topic: str, offsets: dict[int, int], table: object) -> int:
        blob = _SNAPSHOT_MAGIC + pickle.dumps({"offsets": offsets, "table": table}, protocol=5)
        self.r.set(self.key("table", group, topic), blob)
        return len(blob)

    def load_table(self, group: str, topic: str) -> tuple[dict[int, int], Any] | None:
        """(table topic offsets, table) of the newest table snapshot, or None."""
        d = self._load(self.key("table", group, topic), f"the item table of {topic}")
        return None if d is None else ({int(p): int(o) for p, o in d["offsets"].items()}, d["table"])

    def _load(self, key: str, what: str) -> dict[str, Any] | None:
        blob = self.r.get(key)
        if blob is None:
            return None
        if not isinstance(blob, bytes):
            raise TypeError("the Redis client must not decode responses")
        if not blob.startswith(_SNAPSHOT_MAGIC):
            raise ValueError(
                f"the snapshot of {what} ({key}) has a format this version cannot read (written by an "
                "older release?); delete it to rebuild the state from the log"
            )
        d: dict[str, Any] = pickle.loads(blob[len(_SNAPSHOT_MAGIC) :])
        return d

    # -- models ------------------------------------------------------------------------------
    def publish_long_model(self, version: int, blob: bytes) -> bool:
        """Publish a long-term model version unless a newer one is there; True if written."""
        return bool(self._guarded_hset(keys=[self.key("long", "model")], args=[version, blob]))

    def long_model_version(self) -> int | None:
        return self._version(self.key("long", "model"))

    def long_model(self) -> bytes | None:
        return self._blob(self.key("long", "model"))

    def publish_ctr_model(self, version: int, blob: bytes) -> None:
        self.r.hset(self.key("ctr", "model"), mapping={"version": version, "blob": blob})

    def ctr_model_version(self) -> int | None:
        return self._version(self.key("ctr", "model"))

    def ctr_model(self) -> bytes | None:
        return self._blob(self.key("ctr", "model"))

    def _version(self, key: str) -> int | None:
        """The ``version`` field of a published model's hash, or None."""
        raw = self.r.hget(key, "version")
        return None if raw is None else int(raw)

    def _blob(self, key: str) -> bytes | None:
        """The ``blob`` field of a published model's hash, or None."""
        blob = self.r.hget(key, "blob")
        return blob if isinstance(blob, bytes) else None

    def set_ctr_control(self, epsilon: float, drift: bool) -> None:
        self.r.set(self.key("ctr", "control"), orjson.dumps({"epsilon": epsilon, "drift": drift}))

    def ctr_epsilon(self) -> float | None:
        """The trainer's exploration override after drift, or None."""
        raw = self.r.get(self.key("ctr", "control"))
        return float(orjson.loads(raw)["epsilon"]) if raw else None

    def set_ctr_metrics(self, metrics: dict[str, Any]) -> None:
        self.r.set(self.key("ctr", "metrics"), orjson.dumps(metrics))

    def ctr_metrics(self) -> dict[str, Any] | None:
        raw = self.r.get(self.key("ctr", "metrics"))
        return orjson.loads(raw) if raw else None

    # -- housekeeping ------------------------------------------------------------------------
    def delete_all(self) -> int:
        """Delete every key under the prefix (throw-away runs: demo, bench, tests)."""
        n = 0
        for k in self.r.scan_iter(f"{self.prefix}*", count=1000):
            n += int(self.r.delete(k))
        return n
