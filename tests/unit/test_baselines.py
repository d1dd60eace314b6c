"""Each baseline on a log small enough to work its answer out by hand."""

from __future__ import annotations

from models.baselines import ISGD, ItemCF, Popularity, RiverFunkMF
from models.events import Event


def ev(u: str, i: str, ts: int = 0) -> Event:
    return Event(u, i, "click", ts)


def test_popularity_ranks_by_count_with_ties_by_first_appearance() -> None:
    m = Popularity()
    for u, i in [("a", "x"), ("b", "y"), ("c", "y"), ("d", "z"), ("e", "z"), ("f", "z")]:
        m.learn(ev(u, i))
    assert m.recommend("new", 3, set()) == ["z", "y", "x"]
    assert m.recommend("new", 3, {"z"}) == ["y", "x"]


def test_itemcf_scores_are_cosine_normalised_cooccurrence_summed_over_recent_items() -> None:
    m = ItemCF()
    # u1: x, y   u2: x, y, z   u3: x, w   -> c(x,y)=2, c(x,z)=1, c(y,z)=1, c(x,w)=1
    for u, i in [("u1", "x"), ("u1", "y"), ("u2", "x"), ("u2", "y"), ("u2", "z"), ("u3", "x"), ("u3", "w")]:
        m.learn(ev(u, i))
    # n: x=3, y=2, z=1, w=1. For a user with history [x]:
    #   y: 2/sqrt(3*2)=0.816, z: 1/sqrt(3*1)=0.577, w: 1/sqrt(3*1)=0.577 (tie: z seen first)
    m.learn(ev("u4", "x"))  # now n(x)=4 and u4's history is [x]; u4 pairs with nothing yet
    # y: 2/sqrt(4*2)=0.707, z and w: 1/sqrt(4)=0.5
    assert m.recommend("u4", 3, {"x"}) == ["y", "z", "w"]
    m.learn(ev("u4", "w"))  # history [x, w]: w adds c(w,x)/sqrt(n_w n_x) to x only (already seen)
    assert m.recommend("u4", 2, {"x", "w"}) == ["y", "z"]


def test_isgd_and_funkmf_learn_a_user_who_keeps_coming_back_to_one_item() -> None:
    for m in (ISGD(seed=1), RiverFunkMF(seed=1)):
        for k in range(30):
            m.learn(ev("u", f"other{k % 10}", k))
            m.learn(ev("fan", "target", k))
            m.learn(ev("fan", f"other{k % 10}", k))
        top = m.recommend("fan", 1, set())
        assert top == ["target"], (m.name, top)
        assert m.recommend("stranger", 5, set()) == []  # no latent vector for an unknown user
