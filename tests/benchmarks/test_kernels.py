"""Benchmarks of the per-block hot paths on MovieLens-100K (pytest-benchmark).

They run in CI with the rest of the suite and have no thresholds: their numbers are there to be
compared between commits (``pytest tests/benchmarks --benchmark-only``; ``--benchmark-json``
keeps them). Each benchmark also checks what it computed, so a broken kernel fails here too.
The state is the one a worker holds after the first 30,000 events; each benchmark times one
block of the next 2,000.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import orjson
import pytest
from pytest_benchmark.fixture import BenchmarkFixture

from models.deltas import split
from models.events import Event
from models.items import ItemPartition
from models.ranking import recommend
from models.simulation import TwoStage
from models.users import UserPartition
from stream_app.config import Settings
from stream_app.datasets import fetch_ml100k, read_log

WARM = 30_000
BLOCK = 2_000


@dataclass
class Warm:
    system: TwoStage
    block: list[Event]
    users: list[str]


@pytest.fixture(scope="module")
def warm() -> Warm:
    s = Settings()
    schema = s.event_schema()
    rows = read_log(fetch_ml100k(s.data_dir), "jsonl")[: WARM + BLOCK]  # in event time, as a replay sends them
    events = [schema.decode(orjson.dumps(r)) for r in rows]
    sy = TwoStage(s.params())
    for b in range(0, WARM, BLOCK):
        sy.block(events[b : b + BLOCK])
    block = events[WARM:]
    return Warm(sy, block, list(dict.fromkeys(e.user_id for e in block)))


def _copy_users(part: UserPartition) -> UserPartition:
    import pickle

    copy: UserPartition = pickle.loads(pickle.dumps(part))
    return copy


def test_user_state_update(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """One block into the user state: histories, seen sets, vectors and the block's pairs."""
    effects = benchmark.pedantic(
        lambda part: part.apply(warm.block, list(range(WARM, WARM + BLOCK))),
        setup=lambda: ((_copy_users(warm.system.parts[0]),), {}),
        rounds=5,
    )
    assert effects.applied == BLOCK and len(effects.deltas.pr_i) > BLOCK  # type: ignore[union-attr]


def test_ranking(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """The lists of every user one block touches (candidates, scores, top-N, exploration)."""
    sy = warm.system
    users = [u for u in warm.users if u in sy.parts[0].users]
    lists = benchmark(recommend, sy.parts[0], sy.table, users)
    assert len(lists) == len(users) and all(len(rl.items) == sy.params.n_recs for rl in lists)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_ranking_a_live_block(benchmark: BenchmarkFixture, warm: Warm, n_threads: int) -> None:
    """The lists of every user the state holds (334 after 30,000 events) at once, as a live block
    of a few hundred events brings them (a list per event or so, where the log's blocks bring
    one per 45), on one thread and with the
    users cut into two parts ranked at once (``RANK_THREADS=2``, the worker's default): the same
    lists, in less time where a core is free."""
    from models import threads

    sy = warm.system
    users = sorted(sy.parts[0].users)
    one = recommend(sy.parts[0], sy.table, users)
    try:
        threads.set_threads(n_threads)
        lists = benchmark(recommend, sy.parts[0], sy.table, users)
    finally:
        threads.set_threads(1)
    assert len(users) > 300 and lists == one


def test_item_state_update(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """One block's deltas into the item state (popularity, co-occurrence rows, context vectors)
    and the table entries then due."""
    import pickle

    sy = warm.system
    part = _copy_users(sy.parts[0])
    d = part.apply(warm.block, list(range(WARM, WARM + BLOCK))).deltas
    assert d is not None
    msgs = split(d, 0, WARM, WARM + BLOCK, part.routes(1), 1)

    def step(items: ItemPartition) -> int:
        items.apply(msgs)
        return len(items.due_entries())

    entries = benchmark.pedantic(step, setup=lambda: ((pickle.loads(pickle.dumps(sy.items)),), {}), rounds=5)
    assert entries > 0


def test_item_state_update_of_a_live_block(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """The deltas of a block of 5 events into the item state, as live traffic cuts them: its
    cost is mostly per block (new co-occurrence entries go into a sorted array of recent ones
    as large as an eighth of all of them)."""
    import pickle

    sy = warm.system
    part = _copy_users(sy.parts[0])
    d = part.apply(warm.block[:5], list(range(WARM, WARM + 5))).deltas
    assert d is not None
    msgs = split(d, 0, WARM, WARM + 5, part.routes(1), 1)

    def step(items: ItemPartition) -> int:
        return items.apply(msgs).applied

    applied = benchmark.pedantic(step, setup=lambda: ((pickle.loads(pickle.dumps(sy.items)),), {}), rounds=20)
    assert applied == 5


def test_neighbour_lists(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """Neighbour lists (normalised co-occurrence, top ``sim_list_len``) of 500 items at once."""
    items = warm.system.items
    rows = list(items.slot)[:500]
    cnt, idx, sc = benchmark(items.compute_sims, rows)
    assert cnt.max() == items.params.sim_list_len and np.all(np.diff(sc[0, : cnt[0]]) <= 0)


def test_ranking_one_user_a_call(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """The same lists, one call per user, as live blocks of a few events rank them: what a
    ranked chunk costs beyond its users (kernel calls, numpy calls) shows here."""
    sy = warm.system
    users = [u for u in warm.users if u in sy.parts[0].users][:100]

    def one_by_one() -> list[int]:
        return [len(recommend(sy.parts[0], sy.table, [u])[0].items) for u in users]

    assert benchmark(one_by_one) == [sy.params.n_recs] * len(users)


def test_table_entries(benchmark: BenchmarkFixture, warm: Warm) -> None:
    """Table entries of 500 items (neighbour lists, their ids as one JSON array, unit vectors)."""
    items = warm.system.items
    rows = list(items.slot)[:500]
    entries = benchmark(items.entries, rows)
    assert len(entries) == 500 and all(len(e.neighbours) == len(e.scores) > 0 for e in entries)


def test_top_k_of_a_rising_pool(benchmark: BenchmarkFixture) -> None:
    """The kernels' top-k (``kernels._top``): the best 100 of 1,682 scores that rise along the
    input, as long-term scores over a pool listed by popularity tend to (a plain heap's worst
    order)."""
    from models.kernels import _top

    rng = np.random.default_rng(1)
    score = np.sort(rng.exponential(1.0, 1682)) * rng.uniform(0.8, 1.2, 1682)
    item = np.arange(1682, dtype=np.int64)
    sel = benchmark(_top, score, item, 100)
    assert sel.tolist() == np.lexsort((item, -score))[:100].tolist()
