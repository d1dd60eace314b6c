"""The long-term model: the EASE closed form, its refit schedule, and its place in the ranking."""

from __future__ import annotations

import dataclasses
import pickle
import random
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.engine import step
from models.events import Event
from models.longterm import FitInput, fit
from models.params import ModelParams
from models.state import PartitionState
from tests.unit.strategies import event_logs

LONG = ModelParams(n_recs=5, explore_pool=5, epsilon=0.0, dim=8, w_long=0.5, long_refit_events=100, long_items=50)


def cluster_log(n_users: int = 60, rounds: int = 6, seed: int = 0) -> list[Event]:
    """Users 0, 3, 6, ... touch items of cluster 0, users 1, 4, ... cluster 1, and so on."""
    rng = random.Random(seed)
    out, ts = [], 1_700_000_000_000
    for _ in range(rounds):
        for u in range(n_users):
            out.append(Event(f"u{u}", f"c{u % 3}-{rng.randrange(12)}", "view", ts, None))
            ts += 60_000
    return out


def run(events: list[Event], params: ModelParams, sizes: list[int], executor: object = None) -> tuple:
    state = PartitionState(params)
    state.executor = executor  # type: ignore[assignment]
    lists, k = [], 0
    for n in sizes:
        lists += [
            (r.user_id, r.version, [(i.item_id, round(i.score, 9)) for i in r.items])
            for r in step(state, events[k : k + n]).lists
        ]
        k += n
    return state, lists


def test_fit_is_the_closed_form() -> None:
    rng = np.random.default_rng(0)
    x = (rng.random((30, 8)) < 0.4).astype(np.float64)
    lam = 3.0
    rows, cols = np.nonzero(x)
    got = fit(FitInput(np.arange(8), rows, cols, 30, 8, lam))
    p = np.linalg.inv(x.T @ x + lam * np.eye(8))
    want = -p / np.diag(p)  # B_ij = -P_ij / P_jj, and B_jj = 0
    np.fill_diagonal(want, 0.0)
    np.testing.assert_allclose(got.weights, want, rtol=1e-4, atol=1e-6)
    # and it is what it claims: the best ridge regression of each column on the others
    j = 3
    others = [c for c in range(8) if c != j]
    a = x[:, others]
    ridge = np.linalg.solve(a.T @ a + lam * np.eye(7), a.T @ x[:, j])
    np.testing.assert_allclose(got.weights[others, j], ridge, rtol=1e-3, atol=1e-5)


def test_fits_are_taken_and_installed_at_fixed_event_counts() -> None:
    state = PartitionState(LONG)
    installed = []
    for k, e in enumerate(cluster_log(), 1):
        before = state.long
        state.apply([e])
        if state.long is not before:
            installed.append(k)
    # inputs taken at 100, then after each quarter's growth (at most every 100 events): 125,
    # 156, 195, 243, 303, 378; each fit installed half its period later
    assert installed == [100 + 12, 125 + 15, 156 + 19, 195 + 24, 243 + 30, 303 + 37]
    assert state.long_pending is None and state.long_next_fit == 378


def test_a_background_fit_gives_the_same_lists_as_an_inline_one() -> None:
    events = cluster_log()
    sizes = [random.Random(1).randint(1, 30) for _ in range(40)]
    with ThreadPoolExecutor(1) as pool:
        a, la = run(events, LONG, sizes, pool)
    b, lb = run(events, LONG, sizes)
    assert la == lb
    assert a.long is not None and b.long is not None
    np.testing.assert_array_equal(a.long.weights, b.long.weights)


def test_a_snapshot_with_a_fit_pending_restores_to_the_same_lists() -> None:
    events = cluster_log()
    state, _ = run(events[:120], LONG, [120])
    assert state.long_pending is not None  # inputs taken at 120, installed at 120 + 15
    with ThreadPoolExecutor(1) as pool:
        state.executor = pool
        restored = pickle.loads(pickle.dumps(state))
        rest = [1] * (len(events) - 120)
        la = [step(state, [e]).lists for e in events[120:]]
    lb = [step(restored, [e]).lists for e in events[120:]]
    assert la == lb and len(rest) == len(la)


def test_the_long_term_model_ranks_the_users_own_cluster_first() -> None:
    params = dataclasses.replace(LONG, w_cooc=0.0, w_pop=0.0)
    state = PartitionState(params)
    out = {}
    for e in cluster_log(rounds=8):  # one event at a time, so that fits are installed on the way
        out.update({r.user_id: r for r in step(state, [e]).lists})
    assert state.long is not None
    checked = 0
    for uid, rl in out.items():
        cluster = int(uid[1:]) % 3
        seen = {state.item_ids[i] for i in state.users[uid].seen}
        if len({f"c{cluster}-{k}" for k in range(12)} - seen) < 3:
            continue
        assert [it.item_id.split("-")[0] for it in rl.items[:3]] == [f"c{cluster}"] * 3, rl
        assert all(it.reason == "close to your taste" for it in rl.items[:3])
        checked += 1
    assert checked > 20


@settings(max_examples=40, deadline=None)
@given(event_logs(), st.integers(1, 40))
def test_lists_with_the_long_term_model_never_contain_seen_items(events: list[Event], batch: int) -> None:
    params = dataclasses.replace(LONG, long_refit_events=10, long_items=6)
    state = PartitionState(params)
    for k in range(0, len(events), batch):
        for rl in step(state, events[k : k + batch]).lists:
            seen = {state.item_ids[i] for i in state.users[rl.user_id].seen}
            ids = [it.item_id for it in rl.items]
            assert not set(ids) & seen and len(ids) == len(set(ids))


class _BrokenPool:
    """An executor that refuses work, as a process pool does once its process has died."""

    def submit(self, *args: object) -> None:
        raise RuntimeError("pool is broken")


def test_a_broken_executor_falls_back_to_inline_fits() -> None:
    events = cluster_log()
    sizes = [20] * (len(events) // 20)
    a, la = run(events, LONG, sizes, _BrokenPool())
    b, lb = run(events, LONG, sizes)
    assert la == lb and a.long is not None
