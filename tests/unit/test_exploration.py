import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from models.exploration import epsilon_greedy
from models.hashing import stable_hash
from models.kernels import explore_users


def test_no_exploration_keeps_the_ranking() -> None:
    slots = epsilon_greedy([1, 2, 3], [8, 9], 3, 0.0, 0, "u", 1)
    assert [(s.item, s.explore, s.p) for s in slots] == [(1, False, 1.0), (2, False, 1.0), (3, False, 1.0)]


def test_full_exploration_draws_from_the_pool_with_its_probability() -> None:
    slots = epsilon_greedy([1, 2], [7, 8, 9, 10], 2, 1.0, 0, "u", 1)
    assert all(s.explore for s in slots)
    assert slots[0].p == 1.0 / 4 and slots[1].p == 1.0 / 3
    assert {s.item for s in slots} <= {7, 8, 9, 10}


def test_seeded_by_user_and_version() -> None:
    ranked, pool = list(range(20)), list(range(100, 200))
    a = epsilon_greedy(ranked, pool, 20, 0.3, 5, "u", 3)
    assert a == epsilon_greedy(ranked, pool, 20, 0.3, 5, "u", 3)
    assert a != epsilon_greedy(ranked, pool, 20, 0.3, 5, "u", 4)


def test_exploration_rate_matches_epsilon() -> None:
    ranked, pool = list(range(10)), list(range(100, 1000))
    n = explored = 0
    for v in range(2000):
        for s in epsilon_greedy(ranked, pool, 10, 0.2, 0, "u", v):
            n += 1
            explored += s.explore
    assert 0.18 < explored / n < 0.22


def test_no_duplicates_when_pool_overlaps_ranking() -> None:
    for v in range(200):
        slots = epsilon_greedy([1, 2, 3, 4], [3, 4, 5], 4, 0.5, 0, "u", v)
        items = [s.item for s in slots]
        assert len(items) == len(set(items)) == 4


def test_exploration_rate_and_pool_draws_match_epsilon() -> None:
    """Over many lists the share of explored slots is epsilon and the pool is drawn uniformly."""
    from collections import Counter

    from models.exploration import epsilon_greedy

    slots = [s for v in range(4000) for s in epsilon_greedy(list(range(20)), list(range(100, 150)), 20, 0.1, 0, "u", v)]
    explored = [s for s in slots if s.explore]
    assert abs(len(explored) / len(slots) - 0.1) < 0.01
    counts = Counter(s.item for s in explored)
    assert set(counts) == set(range(100, 150))
    assert max(counts.values()) < 2 * min(counts.values())


@settings(max_examples=200, deadline=None)
@given(
    n_items=st.integers(0, 40),
    n=st.integers(1, 12),
    epsilon=st.sampled_from([0.0, 0.05, 0.3, 0.9, 1.0]),
    version=st.integers(0, 10**6),
)
def test_the_compiled_exploration_places_what_epsilon_greedy_places(
    n_items: int, n: int, epsilon: float, version: int
) -> None:
    """``kernels.explore_users`` (all users of a block at once) is ``epsilon_greedy`` exactly:
    the same items in the same slots with the same propensities, from the same seed."""
    ranking = list(range(100, 100 + n_items))
    want = epsilon_greedy(ranking[:n], ranking[n:], n, epsilon, 0, "u", version)
    seeds = np.array([stable_hash(0, "u", version)], dtype=np.uint64)
    cnt, pos, explored, p = explore_users(np.array([n_items], dtype=np.int64), n, epsilon, seeds)
    got = [(ranking[pos[0, s]], bool(explored[0, s]), float(p[0, s])) for s in range(int(cnt[0]))]
    assert got == [(x.item, x.explore, x.p) for x in want]
