"""The Redis writes readers rely on: a list never replaces a newer one, in batches of any size."""

from __future__ import annotations

import orjson
import pytest
import redis

from models.ranking import RecList
from stream_app.redis_store import _GUARDED_CHUNK, RedisStore


def _list(user: str, version: int, item: str) -> RecList:
    return RecList(user, version, 1_700_000_000_000 + version, [item], [1.0], [False], [1.0], ["why"])


def test_a_list_never_replaces_a_newer_one_across_script_calls(redis_url: str, run_id: str) -> None:
    store = RedisStore(redis.Redis.from_url(redis_url), f"t{run_id}:")
    users = [f"u{k}" for k in range(_GUARDED_CHUNK + 7)]  # more than one script call
    assert store.write([_list(u, 5, "a") for u in users], model="m") == len(users)
    # older for the even users, newer for the odd ones, in one write
    store.write([_list(u, 4 if k % 2 == 0 else 6, "b") for k, u in enumerate(users)], model="m")
    docs = store.get_recs(users)
    assert [d["version"] if d else None for d in docs] == [5 if k % 2 == 0 else 6 for k in range(len(users))]
    items = [d["items"][0]["item_id"] if d else None for d in docs]
    assert items == ["a" if k % 2 == 0 else "b" for k in range(len(users))]
    # the same version again is not newer
    store.write([_list(users[1], 6, "c")], model="m")
    assert store.get_rec(users[1])["items"][0]["item_id"] == "b"  # type: ignore[index]
    # a forgotten user starts again at version 1, in the same write that deletes the old list
    store.write([_list(users[0], 1, "d")], model="m", forget=[users[0]])
    raw = redis.Redis.from_url(redis_url).get(store.rec_key(users[0]))
    assert raw is not None and orjson.loads(raw)["version"] == 1


def test_lists_are_written_after_the_server_lost_its_scripts(redis_url: str, run_id: str) -> None:
    """Lists go out by EVALSHA without asking first whether the server has the script: a server
    whose script cache was emptied (a restart) gets it loaded again and the write redone."""
    client = redis.Redis.from_url(redis_url)
    store = RedisStore(client, f"t{run_id}:")
    client.script_flush()
    assert store.write([_list("u1", 3, "a"), _list("u2", 1, "b")], sims=[("a", [("b", 0.5)])], model="m") == 3
    assert client.script_exists(store._guarded.sha) == [True]
    assert [d["items"][0]["item_id"] if d else None for d in store.get_recs(["u1", "u2"])] == ["a", "b"]
    assert store.get_sim("a") == [{"item_id": "b", "score": 0.5}]
    # and the guard still holds on the reloaded script
    store.write([_list("u1", 2, "c")], model="m")
    assert store.get_rec("u1")["items"][0]["item_id"] == "a"  # type: ignore[index]


def test_an_error_reply_fails_the_write_and_leaves_the_connection_in_step(redis_url: str, run_id: str) -> None:
    """The commands of a write go out at once and every reply is read: an error reply (here a
    ``rec:`` key that someone made a hash) fails the write after the others have run, and the
    connection serves the next commands with their own replies."""
    client = redis.Redis.from_url(redis_url, max_connections=1)  # one connection: the same one again
    store = RedisStore(client, f"t{run_id}:")
    client.hset(store.rec_key("broken"), "x", "1")
    with pytest.raises(redis.exceptions.ResponseError, match="WRONGTYPE"):
        store.write([_list("u1", 1, "a"), _list("broken", 1, "b")], sims=[("a", [("b", 0.5)])], model="m")
    assert client.ping() is True  # its own reply
    assert store.get_sim("a") == [{"item_id": "b", "score": 0.5}]  # the command after the error ran
    assert store.get_rec("u1") is not None  # and the script had set the lists before the bad key
    client.delete(store.rec_key("broken"))
    assert store.write([_list("u2", 1, "c"), _list("broken", 2, "d")], model="m") == 2
    assert [d["items"][0]["item_id"] if d else None for d in store.get_recs(["u2", "broken"])] == ["c", "d"]
