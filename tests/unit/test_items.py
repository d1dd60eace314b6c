"""The item stage's state: exact, order-independent aggregation over user partitions, each event
applied once, and the wire format between the stages."""

from __future__ import annotations

import math
import pickle
import random
from dataclasses import replace
from typing import Any
from unittest.mock import patch

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import models.items as items_mod
from models.deltas import DeltaMessage, cut, decode, encode, item_partition, split
from models.events import Event
from models.items import ItemPartition, PairCounts
from models.params import ModelParams
from models.simulation import user_partition
from models.table import ItemTable, TableEntry
from models.users import UserPartition
from tests.unit.strategies import event_logs
from tests.unit.systems import synthetic

WIDE = ModelParams(neighbours=10_000, pair_window=4, history_len=6, dim=8, w_long=0.0)  # rows never pruned


def messages(events: list[Event], params: ModelParams, users: int, items: int, batch: int) -> list[list[DeltaMessage]]:
    """Per user partition, its blocks' messages (one list per block, one message per item partition)."""
    parts = [UserPartition(params) for _ in range(users)]
    logs: list[list[Event]] = [[] for _ in range(users)]
    for e in events:
        logs[user_partition(e.user_id, users)].append(e)
    out = []
    for p, (part, log) in enumerate(zip(parts, logs, strict=True)):
        for k in range(0, len(log), batch):
            d = part.apply(log[k : k + batch], list(range(k, k + len(log[k : k + batch])))).deltas
            if d is not None and len(d):
                out.append(split(d, p, k, k + len(log[k : k + batch]), part.routes(items), items))
    return out


def aggregate(blocks: list[list[DeltaMessage]], params: ModelParams, items: int) -> list[ItemPartition]:
    parts = [ItemPartition(params, q, items) for q in range(items)]
    for msgs in blocks:
        for q, m in enumerate(msgs):
            parts[q].apply([m])
    return parts


def counts(parts: list[ItemPartition]) -> tuple[dict[str, float], dict[tuple[str, str], float]]:
    """Popularity and co-occurrence by item id, as of the newest event (landmarks factored out)."""
    pop: dict[str, float] = {}
    rows: dict[tuple[str, str], float] = {}
    for st_ in parts:
        ids, now = st_.item_ids, st_.scale_now()
        for i, x in enumerate(ids):
            assert pop.get(x, st_.pop[i] / now) == pytest.approx(st_.pop[i] / now, rel=1e-12)  # global everywhere
            pop[x] = st_.pop[i] / now
        for i in st_.slot:
            assert st_.own[i]
            for j, v in st_.row(i).items():
                rows[ids[i], ids[j]] = v / now
    return pop, rows


def assert_same_counts(a: list[ItemPartition], b: list[ItemPartition]) -> None:
    pa, ra = counts(a)
    pb, rb = counts(b)
    assert pa.keys() == pb.keys() and ra.keys() == rb.keys()
    for k in pa:
        assert pa[k] == pytest.approx(pb[k], rel=1e-12)
    for k in ra:
        assert ra[k] == pytest.approx(rb[k], rel=1e-12)


@settings(max_examples=25, deadline=None)
@given(event_logs(), st.integers(1, 4), st.integers(1, 3), st.integers(1, 30), st.randoms(use_true_random=False))
def test_counts_do_not_depend_on_partitioning_or_interleaving(
    events: list[Event], users: int, items: int, batch: int, rnd: random.Random
) -> None:
    """Any number of user and item partitions, any interleaving of the user partitions' blocks:
    the same popularity and co-occurrence counts as one partition of each, in log order. (Not
    for an event id shared by two users: duplicates are recognised within a user partition,
    which is where a re-sent event lands, under the same key.)"""
    events = [
        e if e.event_id is None or not e.event_id.startswith("dup") else replace(e, event_id=None) for e in events
    ]
    reference = aggregate(messages(events, WIDE, 1, 1, 1), WIDE, 1)
    blocks = messages(events, WIDE, users, items, batch)
    by_source: dict[int, list[list[DeltaMessage]]] = {}
    for b in blocks:
        by_source.setdefault(b[0].source, []).append(b)
    mixed = []  # each source's blocks stay in order; sources interleave at random
    while any(by_source.values()):
        src = rnd.choice([s for s, q in by_source.items() if q])
        mixed.append(by_source[src].pop(0))
    assert_same_counts(aggregate(mixed, WIDE, items), reference)


def test_a_message_delivered_twice_changes_nothing() -> None:
    events = synthetic(n_users=30, n_items=40, n_events=600, seed=3)
    (blocks,) = [messages(events, WIDE, 1, 1, 100)]
    once, twice = ItemPartition(WIDE), ItemPartition(WIDE)
    for (m,) in blocks:
        once.apply([m])
        eff = twice.apply([m, m])  # a redelivery within one poll
        assert eff.skipped == len(m)
    assert twice.apply([blocks[0][0]]).applied == 0  # and a late one
    assert pickle.dumps((once.pop, once.counts, once.context)) == pickle.dumps((twice.pop, twice.counts, twice.context))


def test_a_restarted_user_stage_cutting_other_blocks_is_applied_exactly_once() -> None:
    """A user partition restored from an older snapshot re-sends events in other blocks; the item
    stage applies only what it has not applied."""
    events = synthetic(n_users=30, n_items=40, n_events=900, seed=4)
    part = UserPartition(WIDE)
    items = ItemPartition(WIDE)
    snap = None
    for k in range(0, 600, 150):  # blocks [0,150) ... [450,600); snapshot after the second
        d = part.apply(events[k : k + 150], list(range(k, k + 150))).deltas
        assert d is not None
        msg = split(d, 0, k, k + 150, part.routes(1), 1)
        items.apply(msg)
        if k == 150:
            snap = pickle.dumps(part)
    assert snap is not None
    part = pickle.loads(snap)  # back at offset 300, re-cut in blocks of 70 up to the end
    for k in range(300, 900, 70):
        chunk = events[k : min(k + 70, 900)]
        d = part.apply(chunk, list(range(k, k + len(chunk)))).deltas
        assert d is not None
        items.apply(split(d, 0, k, k + len(chunk), part.routes(1), 1))
    whole = UserPartition(WIDE)
    d = whole.apply(events, list(range(900))).deltas
    assert d is not None
    ref = ItemPartition(WIDE)
    ref.apply(split(d, 0, 0, 900, whole.routes(1), 1))
    assert_same_counts([items], [ref])
    assert items.events_applied == 900


def ev(u: str, i: str, t: int, typ: str = "view") -> Event:
    return Event(u, i, typ, 1_700_000_000_000 + t * 1000)


def folded(events: list[Event], params: ModelParams) -> ItemPartition:
    (parts,) = [aggregate(messages(events, params, 1, 1, len(events)), params, 1)]
    return parts[0]


def test_cooccurrence_is_symmetric_and_type_weighted() -> None:
    p = ModelParams(type_weights={"view": 1.0, "click": 2.0, "purchase": 4.0})
    s = folded([ev("u", "a", 0, "view"), ev("u", "b", 1, "purchase"), ev("v", "a", 2, "view"), ev("v", "c", 3)], p)
    a, b, c = (s.item_index[x] for x in "abc")
    assert s.row(a)[b] == s.row(b)[a]
    # sqrt(1 * 4) = 2 for view-purchase against 1 for view-view, at nearly the same time
    assert math.isclose(s.row(a)[b] / s.row(a)[c], 2.0, rel_tol=1e-3)


def test_time_decay_favours_recent_pairs() -> None:
    day = 24 * 3600
    s = folded(
        [ev("u", "a", 0), ev("u", "b", 1), ev("v", "a", 2 * day), ev("v", "c", 2 * day + 1)],
        ModelParams(half_life_h=24.0),
    )
    a, b, c = (s.item_index[x] for x in "abc")
    assert math.isclose(s.row(a)[c] / s.row(a)[b], 4.0, rel_tol=1e-3)  # two half-lives later


def test_rebase_keeps_ratios() -> None:
    p = ModelParams(half_life_h=1.0)
    part, s = UserPartition(p), ItemPartition(p)
    for k, batch in enumerate([[ev("u", "a", 0), ev("u", "b", 1)], [ev("w", "z", 3600 * 100)]]):
        d = part.apply(batch, [10 * k, 10 * k + 1][: len(batch)]).deltas
        assert d is not None
        s.apply(split(d, 0, 10 * k, 10 * k + 2, part.routes(1), 1))
        if k == 0:
            a, b = s.item_index["a"], s.item_index["b"]
            before = s.row(a)[b] / s.pop[a]
    assert s.landmark == 1_700_000_000_000 + 3600 * 100 * 1000  # 100 half-lives: the landmark moved
    assert math.isclose(s.row(a)[b] / s.pop[a], before, rel_tol=1e-9)


@settings(max_examples=40, deadline=None)
@given(event_logs(), st.integers(1, 40))
def test_counts_never_negative_and_rows_bounded(events: list[Event], batch: int) -> None:
    p = ModelParams(neighbours=3, pair_window=4, dim=8, w_long=0.0)
    (s,) = aggregate(messages(events, p, 1, 1, batch), p, 1)
    assert (s.pop[: s.n_items] >= 0).all()
    for i in s.slot:
        row = s.row(i)
        assert all(v > 0 for v in row.values()) and len(row) == s.row_len[s.slot[i]] <= 2 * p.neighbours


def test_batching_changes_no_count_and_vectors_only_by_rounding() -> None:
    """One big message takes the sparse context update, single events the dense one."""
    p = ModelParams(w_long=0.0)
    events = synthetic(n_users=50, n_items=80, n_events=3000, seed=1)
    (whole,) = aggregate(messages(events, p, 1, 1, len(events)), p, 1)
    (single,) = aggregate(messages(events, p, 1, 1, 1), p, 1)
    assert whole.item_ids == single.item_ids
    assert whole.slot == single.slot
    for i in whole.slot:  # summed in another order: equal up to rounding
        a, b = whole.row(i), single.row(i)
        assert a.keys() == b.keys() and all(math.isclose(a[j], b[j], rel_tol=1e-12) for j in a)
    assert np.array_equal(whole.pop, single.pop)
    n = len(whole.slot)
    c1, c2 = whole.context[:n], single.context[:n]
    assert np.allclose(c1, c2, rtol=1e-4, atol=1e-6 * np.abs(c1).max())


def test_entries_are_published_once_a_row_or_popularity_grows_by_the_refresh_share() -> None:
    p = ModelParams(sim_refresh=0.45, w_long=0.0, pair_window=1)
    part, s = UserPartition(p), ItemPartition(p)
    published = []
    for k in range(12):
        d = part.apply([ev(f"u{k}", "a", 2 * k), ev(f"u{k}", "b", 2 * k + 1)], [2 * k, 2 * k + 1]).deltas
        assert d is not None
        eff = s.apply(split(d, 0, 2 * k, 2 * k + 2, part.routes(1), 1))
        assert set(eff.items) == set(s.unpublished)
        published.append(sorted(e.item_id for e in s.due_entries()))
    # a's row and popularity grow by 1 per round: published after 1, 2, 3, 5, 8 and 12 rounds,
    # each time more than 1.4 times the last published weight
    assert [k + 1 for k, got in enumerate(published) if "a" in got] == [1, 2, 3, 5, 8, 12]
    (e,) = s.entries([s.item_index["a"]])
    assert e.neighbours == ["b"] and np.isclose(np.linalg.norm(e.unit), 1.0)
    table = ItemTable(p.dim)
    table.apply([TableEntry.decode(e.encode())])
    nb, sc = table.sim_top(table.index["a"])
    assert [table.ids[j] for j in nb] == ["b"] and sc[0] == pytest.approx(e.scores[0])


def test_trending_breaks_ties_by_item_id() -> None:
    s = folded([ev("u", "b", 0), ev("v", "a", 0), ev("w", "c", 0), ev("w", "c", 0)], ModelParams(w_long=0.0))
    assert [x for x, _ in s.trending(3)] == ["c", "a", "b"]


@settings(max_examples=40, deadline=None)
@given(event_logs(), st.integers(1, 3), st.integers(1, 30), st.integers(64, 4096))
def test_messages_survive_the_wire_and_cutting(events: list[Event], items: int, batch: int, limit: int) -> None:
    blocks = messages(events, WIDE, 1, items, batch)
    direct = aggregate(blocks, WIDE, items)
    cut_parts = [ItemPartition(WIDE, q, items) for q in range(items)]
    for msgs in blocks:
        for q, m in enumerate(msgs):
            pieces = cut(m, limit)
            assert [(x.start, x.end) for x in pieces][0][0] == m.start and pieces[-1].end == m.end
            assert all(a.end == b.start for a, b in zip(pieces, pieces[1:], strict=False))
            cut_parts[q].apply([decode(encode(x)) for x in pieces])
    assert_same_counts(cut_parts, direct)


def test_garbage_is_not_a_delta_message() -> None:
    with pytest.raises(ValueError):
        decode(b"{not a delta}")
    m = messages(synthetic(n_users=5, n_items=40, n_events=20, seed=1), WIDE, 1, 1, 20)[0][0]
    with pytest.raises(ValueError):
        decode(encode(m)[:-9])


def test_items_are_routed_to_stable_partitions() -> None:
    assert [item_partition(x, 4) for x in ("a", "b", "42")] == [item_partition(x, 4) for x in ("a", "b", "42")]
    assert {item_partition(f"i{k}", 4) for k in range(100)} == {0, 1, 2, 3}


def test_entry_neighbour_lists_name_the_computed_neighbours_in_order() -> None:
    """A table entry's neighbour ids (joined from quoted ids, ``ItemPartition.entries``) are the
    JSON array orjson makes of the computed neighbours, best first, also for ids that need
    escaping, as items keep coming (the quoted ids' buffer grows), and after a restore (the
    quoted ids are a cache, not state)."""
    odd = ['q"uote', "back\\slash", "ünï", "tab\t"]
    events = [
        Event(f"u{k % 7}", odd[k % 4] if k % 3 == 0 else f"i{k % 11 + k // 100 * 11}", "view", k, None)
        for k in range(400)
    ]
    part = UserPartition(WIDE)
    s = ItemPartition(WIDE)
    for b in range(0, len(events), 100):
        eff = part.apply(events[b : b + 100], list(range(b, b + 100)))
        assert eff.deltas is not None
        s.apply(split(eff.deltas, 0, b, b + 100, part.routes(1), 1))
        for state in (s, pickle.loads(pickle.dumps(s))):
            items = sorted(state.slot)
            cnt, idx, _ = state.compute_sims(items)
            for q, e in enumerate(state.entries(items)):
                want = [state.item_ids[j] for j in idx[q, : cnt[q]].tolist()]
                assert e.ids_json == orjson.dumps(want) and e.neighbours == want and len(want) == len(e.scores) > 0
    assert s.n_items == 4 + 44


def test_table_string_columns_follow_the_catalogue_and_stay_out_of_snapshots() -> None:
    """``ItemTable.column`` is a cache: extended as items join, never pickled, rebuilt after."""
    table = ItemTable(4)
    for x in ("a", "b"):
        table.item(x)
    assert table.column("similar", lambda i: "similar to " + i)[:2].tolist() == ["similar to a", "similar to b"]
    for x in ("c", 'd"q'):
        table.item(x)
    col = table.column("similar", lambda i: "similar to " + i)
    assert col[: table.n_items].tolist() == ["similar to a", "similar to b", "similar to c", 'similar to d"q']
    restored = pickle.loads(pickle.dumps(table))
    assert not any(k.startswith("_col_") for k in vars(restored))
    assert restored.column("id", str)[np.array([3, 0])].tolist() == ['d"q', "a"]


def test_table_parses_a_batch_of_lists_as_one_at_a_time() -> None:
    """``ItemTable.parse`` decodes many pending lists in one compiled call; lists it cannot
    (an id new to the catalogue, one with an escape) are decoded one by one in order, so the
    catalogue numbers and every neighbour list are those of parsing the entries singly."""
    rng = np.random.default_rng(5)
    known = [f"i{k}" for k in range(40)]
    entries = []
    for k in range(30):
        nb = [known[j] for j in rng.choice(len(known), 12, replace=False)]
        if k in (4, 11, 12, 20):  # some lists name ids no table has seen yet, one in several
            nb[3] = f"new-{k}é"
            nb[7] = 'q"uote'
        scores = rng.random(12).astype(np.float32)
        entries.append(TableEntry.of(known[k], float(k), nb, scores, np.zeros(4, np.float32)))
    batch, single = ItemTable(4), ItemTable(4)
    for t in (batch, single):
        for x in known:
            t.item(x)
        t.apply(entries)
    batch.parse(range(batch.n_items))
    for i in range(single.n_items):
        single.parse([i])
    assert batch.ids == single.ids and len(batch.ids) > len(known)
    assert not any(e is not None for t in (batch, single) for e in t.pending)
    for i, e in enumerate(entries):  # item i is known[i]
        got, want = batch.sim_top(i), single.sim_top(i)
        assert [batch.ids[j] for j in got[0]] == [single.ids[j] for j in want[0]] == e.neighbours
        assert got[1].tolist() == want[1].tolist() == e.scores.tolist()
    assert all(len(batch.sim_top(i)[0]) == 0 for i in range(len(entries), len(known)))


@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(
        st.one_of(
            st.tuples(
                st.just("add"), st.dictionaries(st.tuples(st.integers(0, 5), st.integers(0, 30)), st.integers(1, 9))
            ),
            st.tuples(st.just("prune"), st.tuples(st.integers(0, 5), st.integers(0, 4))),
        ),
        max_size=40,
    )
)
def test_pair_counts_are_a_dictionary_of_counts(ops: list[tuple[str, Any]]) -> None:
    """``PairCounts`` (a main and a recent sorted array, merged as the recent one fills) keeps
    what a plain dictionary would, whenever merges happen: the values, the rows of entries that
    were zero or absent before each add, each row's entries and the pruning to the heaviest."""
    pc, ref = PairCounts(), dict[int, float]()
    for op, arg in ops:
        if op == "add":
            keys = sorted((r << 32) | c for r, c in arg)
            inc = np.array([float(arg[(k >> 32, k & 0xFFFFFFFF)]) for k in keys])
            with patch.object(items_mod, "_RECENT_MIN", 3):  # merges every few adds
                fresh = pc.add(np.array(keys, dtype=np.int64), inc)
            assert sorted(fresh.tolist()) == sorted(k >> 32 for k in keys if ref.get(k, 0.0) == 0.0)
            for k, v in zip(keys, inc.tolist(), strict=True):
                ref[k] = ref.get(k, 0.0) + v
        else:
            r, keep = arg
            row = sorted(
                ((v, k & 0xFFFFFFFF) for k, v in ref.items() if k >> 32 == r and v != 0), key=lambda x: (-x[0], x[1])
            )
            for _, c in row[keep:]:
                ref[(r << 32) | c] = 0.0
            assert pc.prune(r, keep) == min(keep, len(row))
        for r in range(6):
            cols, vals = pc.row(r)
            want = sorted((k & 0xFFFFFFFF, v) for k, v in ref.items() if k >> 32 == r and v != 0)
            assert sorted(zip(cols.tolist(), vals.tolist(), strict=True)) == want
        assert len(pc) == sum(v != 0 for v in ref.values())
