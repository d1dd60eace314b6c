"""The long-term model: the EASE closed form, its refit schedule, and its place in the ranking."""

from __future__ import annotations

import dataclasses
import pickle
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.events import Event
from models.longterm import PROFILE_LEN, FitInput, LongTermOwner, decode_model, encode_model, fit
from models.params import ModelParams
from models.simulation import TwoStage
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


def test_fits_come_due_at_fixed_event_counts_and_are_installed_half_a_period_later() -> None:
    sy = TwoStage(LONG)
    due, installed = [], []
    owner = sy.items.long
    assert owner is not None
    for k, e in enumerate(cluster_log(), 1):
        version = owner.version
        before = sy.table.long
        sy.learn(e)
        if owner.version != version:
            due.append(k)
        if sy.table.long is not before:
            installed.append(k)
    # inputs taken at 100, then after each quarter's growth (at most every 100 events): 125,
    # 156, 195, 243, 303, 378; each fit installed half its period later
    assert due == [100, 125, 156, 195, 243, 303] and owner.next_fit == 378
    assert installed == [100 + 12, 125 + 15, 156 + 19, 195 + 24, 243 + 30, 303 + 37]
    assert sy.table.long_version == 6


def test_the_owner_keeps_the_newest_items_of_the_most_recently_active_users() -> None:
    owner = LongTermOwner(dataclasses.replace(LONG, long_users=2))
    owner.feed(["a", "b", "a", "c"], np.array([1, 2, 3, 4]), np.array([True, True, True, False]))
    assert list(owner.profiles) == ["a", "c"]  # b was the least recently active
    assert list(owner.profiles["a"]) == [1, 3] and list(owner.profiles["c"]) == []  # c's item was not new
    owner.feed(["a"] * (PROFILE_LEN + 5), np.arange(PROFILE_LEN + 5), np.ones(PROFILE_LEN + 5, dtype=bool))
    assert list(owner.profiles["a"]) == list(range(5, PROFILE_LEN + 5))
    assert owner.events == 4 + PROFILE_LEN + 5


def test_a_model_survives_its_wire_format() -> None:
    w = np.random.default_rng(1).random((3, 3)).astype(np.float32)
    version, ids, got = decode_model(encode_model(7, ["a", "b", "c"], w))
    assert (version, ids) == (7, ["a", "b", "c"]) and np.array_equal(got, w)
    with pytest.raises(ValueError):
        decode_model(b"SRL1" + encode_model(7, ["a"], w[:1, :1])[4:-1])


def test_an_item_partition_with_the_owner_restores_to_the_same_fits() -> None:
    events = cluster_log()
    a = TwoStage(LONG)
    for e in events[:120]:
        a.learn(e)
    b = pickle.loads(pickle.dumps(a))
    for e in events[120:]:
        a.learn(e)
        b.learn(e)
    assert a.table.long is not None and b.table.long is not None
    np.testing.assert_array_equal(a.table.long.weights, b.table.long.weights)
    assert a.table.long_version == b.table.long_version


def test_the_long_term_model_ranks_the_users_own_cluster_first() -> None:
    params = dataclasses.replace(LONG, w_cooc=0.0, w_pop=0.0)
    sy = TwoStage(params)
    out = {}
    for e in cluster_log(rounds=8):  # one event at a time, so that fits are installed on the way
        sy.learn(e)
        out[e.user_id] = sy.recommend(e.user_id)
    assert sy.table.long is not None
    part = sy.parts[0]
    checked = 0
    for uid, rl in out.items():
        assert rl is not None
        cluster = int(uid[1:]) % 3
        seen = {part.item_ids[i] for i in part.user(uid).seen}
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
    sy = TwoStage(params)
    part = sy.parts[0]
    for k in range(0, len(events), batch):
        for rl in sy.block(events[k : k + batch]):
            seen = {part.item_ids[i] for i in part.user(rl.user_id).seen}
            ids = [it.item_id for it in rl.items]
            assert not set(ids) & seen and len(ids) == len(set(ids))
