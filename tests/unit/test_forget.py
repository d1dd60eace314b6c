"""Forgetting a user (``streamrec forget``) in the models: the control message, the user state,
the sample builder, the deltas and the long-term profiles; in order, once, and deterministic."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from array import array
from collections import OrderedDict, deque
from pathlib import Path

import numpy as np
import orjson
import pytest

from models.ctr.samples import SampleBuilder, SampleParams
from models.deltas import cut, decode, encode, split
from models.engine import user_step
from models.events import Event, EventSchema, Forget, InvalidEvent, forget_message
from models.items import ItemPartition
from models.params import ModelParams
from models.ranking import Candidates
from models.simulation import TwoStage
from models.table import ItemTable
from models.users import UserPartition, UserState

P = ModelParams(neighbours=5, pair_window=3, history_len=6, n_recs=4, explore_pool=4, dim=8, epsilon=0.0)
LONG = ModelParams(n_recs=4, explore_pool=4, dim=8, w_long=0.5, long_refit_events=10**9, epsilon=0.0)
GONE = "alice-7f3a9c"  # distinctive, so that a search of pickled bytes is meaningful
T0 = 1_700_000_000_000
MIN = 60_000


def ev(u: str, i: str, k: int, t: str = "click", eid: bool = True) -> Event:
    return Event(u, i, t, T0 + k * MIN, f"{u}-e{k}" if eid else None)


def log(n: int = 40) -> list[Event]:
    """Three users interleaved, event ids that embed the user id (like ml-100k's)."""
    users = [GONE, "bob", "carol"]
    return [ev(users[k % 3], f"i{(k * 7) % 11}", k) for k in range(n)]


def test_the_control_message_round_trips_and_is_not_an_event() -> None:
    s = EventSchema()
    raw = forget_message(GONE, T0)
    assert orjson.loads(raw) == {"control": "forget", "user_id": GONE, "ts": T0}
    assert s.decode_message(raw) == Forget(GONE, T0)
    assert s.decode_message(b'{"control": "forget", "user_id": 42}') == Forget("42", None)
    with pytest.raises(InvalidEvent):  # events only: a producer's path never takes one for an event
        s.decode(raw)
    for bad, why in [
        (b'{"control": "reset", "user_id": "u"}', "unknown control message"),
        (b'{"control": "forget"}', "missing field: user_id"),
        (b'{"control": "forget", "user_id": "u", "ts": "soon"}', "ts is not an ISO-8601"),
    ]:
        with pytest.raises(InvalidEvent) as e:
            s.decode_message(bad)
        assert e.value.reason.startswith(why)
    with pytest.raises(InvalidEvent) as e:  # the reason never echoes the id (personal data)
        s.decode_message(orjson.dumps({"control": "forget", "user_id": GONE * 20}))
    assert GONE not in e.value.reason
    ok = s.decode_message(orjson.dumps({"user_id": "u", "item_id": "i", "type": "view", "ts": T0}))
    assert isinstance(ok, Event)


def test_forget_removes_every_trace_of_the_user_from_the_partition_state() -> None:
    part = UserPartition(P)
    events = log()
    part.apply(events)
    assert GONE.encode() in pickle.dumps(part)  # the test can see it when it is there
    eff = part.apply([Forget(GONE)], [len(events)])
    assert eff.forgotten == [GONE] and eff.users == [] and eff.applied == 0
    assert GONE not in part.users
    assert not any(GONE in e or o == GONE for e, o in part.recent_event_ids.items())
    assert GONE.encode() not in pickle.dumps(part)
    assert {"bob", "carol"} <= set(part.users)  # the others are untouched
    d = eff.deltas
    assert d is not None and d.fg_offset.tolist() == [len(events)] and list(d.fg_user) == [GONE]
    # idempotent, and harmless for a user never seen
    before = pickle.dumps(part)
    assert part.apply([Forget(GONE), Forget("nobody")]).forgotten == [GONE, "nobody"]
    assert pickle.dumps(part) == before


def _legacy_snapshot(part: UserPartition) -> bytes:
    """``part`` pickled as releases before ``forget`` wrote it: one ``UserState`` object per user
    (history in a deque, no ``uid``) and event ids without owners."""
    legacy = UserPartition.__new__(UserPartition)
    skip = ("users", "seen", "weights", "vecs", "free_rows", "n_rows", "recent_event_ids")
    legacy.__dict__.update({k: v for k, v in part.__dict__.items() if k not in skip})
    users = OrderedDict()
    for v in part.views():
        u = users[v.uid] = UserState()
        u.history, u.seen, u.seen_arr = deque(v.history), dict.fromkeys(v.seen), array("q", v.seen)
        u.n_events, u.last_ts, u.vec, u.vec_ts = v.n_events, v.last_ts, v.vec, v.last_ts
        u.win_items, u.win_sw = [], []
    legacy.__dict__["users"] = users
    legacy.__dict__["recent_event_ids"] = dict.fromkeys(part.recent_event_ids)
    return pickle.dumps(legacy)


def test_a_snapshot_of_an_earlier_release_is_adopted() -> None:
    """A snapshot of the object-per-user layout, written before ``forget`` existed, loads as the
    same state in the flat layout, and the restore (``reconfigure``) gives its event ids owners
    as new events come, so that a forget finds them."""
    part = UserPartition(P)
    part.apply(log(12))
    restored = pickle.loads(_legacy_snapshot(part))
    assert restored.reconfigure(P) == []
    assert [(v.uid, v.history, v.seen, v.n_events, v.last_ts) for v in restored.views()] == [
        (v.uid, v.history, v.seen, v.n_events, v.last_ts) for v in part.views()
    ]
    for a, b in zip(restored.views(), part.views(), strict=True):
        assert (a.vec is None and b.vec is None) or np.array_equal(a.vec, b.vec)
    restored.apply([ev(GONE, "x", 50), ev("bob", "y", 51)])
    assert restored.recent_event_ids[f"{GONE}-e50"] == GONE
    restored.apply([Forget(GONE)])
    assert f"{GONE}-e50" not in restored.recent_event_ids and GONE not in restored.users


def test_a_forget_applies_in_order_within_a_block() -> None:
    """What came before is applied then dropped; events after it start a new user, exactly as if
    the user's earlier events had never been seen (vectors equal up to rounding)."""
    before = [ev(GONE, "a", 0), ev("bob", "a", 1), ev(GONE, "b", 2)]
    after = [ev(GONE, "c", 3), ev("bob", "c", 4), ev(GONE, "d", 5)]
    part = UserPartition(P)
    eff = part.apply([*before, Forget(GONE), *after])
    fresh = UserPartition(P)
    fresh.apply([e for e in after if e.user_id == GONE])
    u, f = part.user(GONE), fresh.user(GONE)
    ids = part.item_ids
    assert [ids[i] for i, _, _ in u.history] == ["c", "d"] and u.n_events == 2
    assert [ids[i] for i in u.seen] == ["c", "d"]
    assert u.vec is not None and f.vec is not None
    np.testing.assert_allclose(u.vec, f.vec, rtol=1e-6)
    assert eff.users == [GONE, "bob"] and eff.forgotten == [GONE] and eff.applied == 6
    assert part.user("bob").n_events == 2
    # the deltas keep every event (popularity is aggregate), the forget at its place
    d = eff.deltas
    assert d is not None and d.ev_offset.tolist() == [0, 1, 2, 4, 5, 6] and d.fg_offset.tolist() == [3]


def test_replaying_a_log_with_forgets_gives_the_same_state() -> None:
    events: list[Event | Forget] = [*log(30), Forget(GONE), *log(60)[30:], Forget("bob"), Forget(GONE)]
    states = []
    for _ in range(2):
        part = UserPartition(P)
        for k in range(0, len(events), 7):
            part.apply(events[k : k + 7], list(range(k, min(k + 7, len(events)))))
        states.append(pickle.dumps(part))
    assert states[0] == states[1]
    part = pickle.loads(states[0])
    assert set(part.users) == {"carol"}


def test_a_block_with_only_a_forget_still_tells_the_item_stage() -> None:
    part = UserPartition(LONG)
    out = user_step(part, ItemTable(LONG.dim), [Forget(GONE)], [17], span=(17, 18), item_partitions=2)
    assert out.lists == [] and out.effect.forgotten == [GONE]
    assert len(out.messages) == 2
    m0, m1 = out.messages
    assert (m0.start, m0.end, m0.fg_offset.tolist(), m0.fg_user) == (17, 18, [17], [GONE])
    assert m1.fg_user == []  # only item partition 0 keeps user profiles


def test_forgets_survive_the_wire_and_cutting() -> None:
    part = UserPartition(LONG)
    events: list[Event | Forget] = [*log(20), Forget(GONE), *log(40)[20:], Forget("carol")]
    d = part.apply(events, list(range(100, 100 + len(events)))).deltas
    assert d is not None
    (m,) = split(d, 0, 100, 100 + len(events), part.routes(1), 1)
    got = decode(encode(m))
    assert got.fg_offset.tolist() == [120, 141] and got.fg_user == [GONE, "carol"]
    pieces = cut(m, 400)
    assert len(pieces) > 2
    assert [u for p in pieces for u in p.fg_user] == [GONE, "carol"]
    for p in pieces:
        assert all(p.start <= o < p.end for o in p.fg_offset.tolist())
    # a message without forgets has the header it always had
    (plain,) = split(UserPartition(LONG).apply(log(5)).deltas, 0, 0, 5, part.routes(1), 1)
    assert b'"forget"' not in encode(plain)


def test_item_partition_0_drops_the_long_term_profile_once_in_order() -> None:
    part = UserPartition(LONG)
    events: list[Event | Forget] = [ev(GONE, "a", 0), ev(GONE, "b", 1), Forget(GONE), ev(GONE, "c", 3)]
    d = part.apply(events, [0, 1, 2, 3]).deltas
    assert d is not None
    (m,) = split(d, 0, 0, 4, part.routes(1), 1)
    items = ItemPartition(LONG, 0, 1)
    assert items.long is not None
    eff = items.apply([m])
    assert eff.forgotten == 1
    prof = items.long.profiles[GONE]
    assert [items.item_ids[i] for i in prof] == ["c"]  # what came after the forget only
    # delivered again (a restarted user stage): applied once
    assert items.apply([m]).forgotten == 0
    assert [items.item_ids[i] for i in items.long.profiles[GONE]] == ["c"]
    # a later forget with no events in its block
    (f,) = split(part.apply([Forget(GONE)], [4]).deltas, 0, 4, 5, part.routes(1), 1)
    assert items.apply([f]).forgotten == 1
    assert GONE not in items.long.profiles
    assert GONE.encode() not in pickle.dumps(items)


def test_the_sample_builder_forgets_history_open_views_clicks_and_served_lists() -> None:
    p = SampleParams(window_ms=10 * MIN, lateness_ms=MIN, sampled_negatives=0, list_negatives=2)

    def run(forget: bool) -> tuple[SampleBuilder, list]:
        b = SampleBuilder(p)
        b.feed([ev(GONE, "a", 0, "view"), ev(GONE, "b", 1, "click"), ev("bob", "a", 2, "view")])
        b.observe(Candidates.of_lists([GONE], [["b"]], [["x", "y", "z"]], [np.zeros((3, 7), dtype=np.float32)]))
        if forget:
            assert b.feed([Forget(GONE)]) == []
        # an hour later: every open view is settled
        return b, b.feed([ev("bob", "c", 60, "click"), ev("carol", "d", 61, "click")])

    kept, out_kept = run(False)
    assert any(s.user_id == GONE for s in out_kept)  # without the forget, their view would be published
    b, out = run(True)
    assert not any(s.user_id == GONE for s in out)
    assert GONE not in b.users and GONE not in b.served
    assert not any(k[0] == GONE for k in [*b.pending, *b.recent_clicks])
    assert GONE.encode() not in pickle.dumps(b)
    assert [s.user_id for s in out if s.label == 0.0] == ["bob"]  # others' views still settle


def test_in_process_the_forgotten_user_gets_no_list_and_comes_back_fresh() -> None:
    sy = TwoStage(LONG)
    sy.block(log(30))
    assert sy.recommend(GONE) is not None
    lists = sy.block([ev(GONE, "i1", 40), Forget(GONE), ev("bob", "i2", 41)])
    assert [rl.user_id for rl in lists] == ["bob"]
    assert sy.recommend(GONE) is None
    assert sy.items.long is not None and GONE not in sy.items.long.profiles
    (rl,) = sy.block([ev(GONE, "i3", 42)])
    assert rl.user_id == GONE and rl.version == 1


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["forget", ""], "USER_ID: user_id must be 1-128 chars"),
        (["forget", "x" * 129], "USER_ID: user_id must be 1-128 chars"),
        (["forget", "u1", "--partitioner", "java"], "--partitioner 'java': expected one of consistent_random"),
    ],
)
def test_the_command_refuses_bad_usage_before_it_connects(args: list[str], says: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}
    env["STREAMREC_KAFKA_BOOTSTRAP_SERVERS"] = "127.0.0.1:1"  # nothing listens: it must not get that far
    res = subprocess.run(
        [str(Path(sys.executable).parent / "streamrec"), *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert res.stderr.startswith("error: " + says), res.stderr
