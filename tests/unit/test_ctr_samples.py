"""The sample joiner: labels, windows, bounds, determinism, and no features from the future."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from models.ctr.samples import SampleBuilder, SampleParams
from models.events import Event
from models.ranking import RANK_FEATURES, Candidates

MIN = 60_000


def ev(u: str, i: str, t: str, ts: int, cat: str | None = None) -> Event:
    return Event(u, i, t, ts, None, {"category": cat} if cat else None)


def test_clicks_are_positives_with_the_history_before_them() -> None:
    b = SampleBuilder(SampleParams(sampled_negatives=0))
    out = b.feed([ev("u", "a", "purchase", 1, "x"), ev("u", "b", "click", 2), ev("u", "c", "click", 3)])
    assert [(s.item_id, s.label, s.history) for s in out] == [
        ("a", 1.0, ()),
        ("b", 1.0, ("a",)),
        ("c", 1.0, ("a", "b")),
    ]
    assert out[0].category == "x"


def test_a_view_without_a_click_becomes_a_negative_once_the_window_has_passed() -> None:
    p = SampleParams(window_ms=10 * MIN, lateness_ms=MIN, sampled_negatives=0)
    b = SampleBuilder(p)
    assert b.feed([ev("u", "a", "view", 0)]) == []
    early = b.feed([ev("v", "z", "click", 10 * MIN)])  # deadline reached, but lateness not yet
    assert [s.label for s in early] == [1.0]
    out = b.feed([ev("v", "y", "click", 11 * MIN + 1)])
    negs = [s for s in out if s.label == 0.0]
    assert [(s.user_id, s.item_id, s.history) for s in negs] == [("u", "a", ())]


def test_a_clicked_view_is_not_a_negative_even_if_the_click_comes_first() -> None:
    p = SampleParams(window_ms=10 * MIN, lateness_ms=MIN, sampled_negatives=0)
    b = SampleBuilder(p)
    out = b.feed([ev("u", "a", "view", 0), ev("u", "a", "click", 5 * MIN)])  # view then click
    out += b.feed([ev("u", "b", "click", 6 * MIN), ev("u", "b", "view", 6 * MIN + 5)])  # click, then a late view
    out += b.feed([ev("w", "q", "click", 60 * MIN)])  # pushes event time far past every deadline
    assert all(s.label == 1.0 for s in out) and len(out) == 3


def test_open_views_are_bounded() -> None:
    b = SampleBuilder(SampleParams(max_pending=10, sampled_negatives=0))
    out = b.feed([ev("u", f"i{k}", "view", k) for k in range(100)])
    assert len(b.pending) == 10 and len(out) == 90 and all(s.label == 0.0 for s in out)
    assert len(b.flush()) == 10 and not b.pending


def test_sampled_negatives_are_seeded_and_never_the_target_or_history() -> None:
    events = [ev(f"u{k % 7}", f"i{(k * 13) % 29}", "click", k) for k in range(500)]
    a = SampleBuilder(SampleParams(sampled_negatives=4, seed=3))
    b = SampleBuilder(SampleParams(sampled_negatives=4, seed=3))
    sa, sb = a.feed(events[:250]), pickle.loads(pickle.dumps(a)).feed(events[250:])
    assert sa + sb == b.feed(events)  # same log, same samples, also across a snapshot
    negs = [s for s in sa + sb if s.label == 0.0]
    assert len(negs) > 500  # draws that hit the target or the history are dropped
    pos = {(s.user_id, s.ts): s.item_id for s in sa + sb if s.label == 1.0}
    assert all(s.item_id != pos[(s.user_id, s.ts)] and s.item_id not in s.history for s in negs)


def test_history_is_bounded_and_never_includes_the_event_or_later_ones() -> None:
    b = SampleBuilder(SampleParams(hist_len=3, sampled_negatives=0))
    out = b.feed([ev("u", f"i{k}", "click", k) for k in range(10)])
    for k, s in enumerate(out):
        assert s.history == tuple(f"i{j}" for j in range(max(0, k - 3), k))


def _serve(b: SampleBuilder, user: str, cands: list[str], hist: list[str]) -> np.ndarray:
    """Show the builder a ranked list, as the worker does; returns the context it was given."""
    ctx = np.arange(len(cands) * RANK_FEATURES, dtype=np.float32).reshape(len(cands), RANK_FEATURES) / 100
    b.observe(Candidates.of_lists([user], [hist], [cands], [ctx]))
    return ctx


def test_a_click_on_a_served_candidate_becomes_a_list_sample_with_the_inputs_it_was_ranked_with() -> None:
    b = SampleBuilder(SampleParams(sampled_negatives=0, list_negatives=3, seed=5))
    b.feed([ev("u", "h1", "click", 1, "drama"), ev("u", "x0", "view", 2, "drama"), ev("u", "x1", "view", 2, "comedy")])
    cands = [f"x{k}" for k in range(2, 10)]
    b.categories.update({"x4": "drama", "x5": "comedy"})
    ctx = _serve(b, "u", cands, ["h1", "x0", "x1"])
    out = b.feed([ev("u", "x4", "purchase", 3)])
    point = [s for s in out if s.group is None]
    group = [s for s in out if s.group is not None]
    assert [(s.item_id, s.label) for s in point] == [("x4", 1.0)]
    assert group[0].item_id == "x4" and group[0].label == 1.0
    assert len(group) == 4 and {s.label for s in group[1:]} == {0.0}
    assert len({s.group for s in group}) == 1
    assert {s.item_id for s in group[1:]} <= set(cands) - {"x4"}
    assert all(s.history == ("h1", "x0", "x1") and s.ts == 3 for s in group)  # as at event time
    for s in group:
        j = cands.index(s.item_id)
        assert s.dense[:RANK_FEATURES] == pytest.approx(ctx[j].tolist())
        share = {"drama": 2 / 3, "comedy": 1 / 3}.get(b.categories.get(s.item_id, ""), 0.0)
        assert s.dense[RANK_FEATURES] == pytest.approx(share)
    # the list is used once, and a click outside the list makes no list sample
    assert all(s.group is None for s in b.feed([ev("u", "x5", "click", 4)]))
    _serve(b, "u", cands, ["h1"])
    assert all(s.group is None for s in b.feed([ev("u", "zz", "click", 5)]))
    # the same log and lists give the same samples
    b2 = SampleBuilder(SampleParams(sampled_negatives=0, list_negatives=3, seed=5))
    b2.feed([ev("u", "h1", "click", 1, "drama"), ev("u", "x0", "view", 2, "drama"), ev("u", "x1", "view", 2, "comedy")])
    b2.categories.update({"x4": "drama", "x5": "comedy"})
    _serve(b2, "u", cands, ["h1", "x0", "x1"])
    assert [s for s in b2.feed([ev("u", "x4", "purchase", 3)]) if s.group] == group


def test_served_lists_are_bounded_and_the_event_types_that_take_an_item_are_configurable() -> None:
    b = SampleBuilder(SampleParams(sampled_negatives=0, list_negatives=2, served_users=2))
    for u in ("a", "b", "c"):
        _serve(b, u, ["i1", "i2", "i3"], [])
    assert list(b.served) == ["b", "c"]
    out = b.feed([ev("b", "i1", "view", 1)])  # by default any event takes an item
    assert [(s.item_id, s.label) for s in out] == [("i1", 1.0), ("i2", 0.0), ("i3", 0.0)]
    clicks = SampleBuilder(SampleParams(sampled_negatives=0, list_negatives=2, list_types=frozenset({"click"})))
    _serve(clicks, "b", ["i1", "i2", "i3"], [])
    assert clicks.feed([ev("b", "i1", "view", 1)]) == [] and "b" in clicks.served
    assert sum(s.group is not None for s in clicks.feed([ev("b", "i2", "click", 2)])) == 3
    assert SampleBuilder(SampleParams(list_negatives=0)).served == {}
