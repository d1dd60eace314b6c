"""The user stage's state and lists: bounded, deterministic, restorable, and never a seen item."""

from __future__ import annotations

import dataclasses
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.deltas import BlockDeltas
from models.events import Event
from models.params import ModelParams
from models.ranking import RecList
from models.simulation import TwoStage
from models.table import ItemTable
from models.users import UserPartition, row_of
from tests.unit.strategies import event_logs
from tests.unit.systems import fed, synthetic

P = ModelParams(neighbours=3, pair_window=4, history_len=6, n_recs=5, sim_list_len=4, explore_pool=5, dim=8)


def run(events: list[Event], batch: int, params: ModelParams = P) -> tuple[TwoStage, dict[str, RecList]]:
    sy = TwoStage(params)
    lists = {}
    for k in range(0, len(events), batch):
        for rl in sy.block(events[k : k + batch]):
            lists[rl.user_id] = rl
    return sy, lists


def fingerprint(s: UserPartition) -> tuple:
    return (
        s.item_ids,
        {st.uid: (st.history, st.seen, st.n_events, None if st.vec is None else st.vec.tolist()) for st in s.views()},
        s.events_applied,
    )


def deltas_fingerprint(d: BlockDeltas | None) -> tuple:
    if d is None:
        return ()
    ids = d.ids
    return (
        d.ev_offset.tolist(),
        d.ev_ts.tolist(),
        [ids[i] for i in d.ev_item.tolist()],
        d.ev_w.tolist(),
        list(d.ev_user),
        d.ev_new.tolist(),
        d.pr_ev.tolist(),
        [(ids[i], ids[j]) for i, j in zip(d.pr_i.tolist(), d.pr_j.tolist(), strict=True)],
        d.pr_w.tolist(),
    )


@settings(max_examples=60, deadline=None)
@given(event_logs(), st.integers(1, 40))
def test_histories_are_bounded_and_pairs_come_from_the_window(events: list[Event], batch: int) -> None:
    part = UserPartition(P)
    for k in range(0, len(events), batch):
        d = part.apply(events[k : k + batch], list(range(k, k + batch))).deltas
        assert d is not None
        assert (d.pr_i != d.pr_j).all() and (d.pr_w > 0).all()
        assert np.bincount(d.pr_ev, minlength=len(d)).max(initial=0) <= P.pair_window
        assert (np.diff(d.ev_offset) > 0).all()
    for u in part.views():
        assert len(u.history) <= P.history_len


@settings(max_examples=60, deadline=None)
@given(event_logs(), st.integers(1, 40))
def test_lists_never_contain_seen_items_or_duplicates(events: list[Event], batch: int) -> None:
    sy, lists = run(events, batch)
    part = sy.parts[0]
    for uid, rl in lists.items():
        ids = [it.item_id for it in rl.items]
        seen = {part.item_ids[i] for i in part.user(uid).seen}
        assert not set(ids) & seen
        assert len(ids) == len(set(ids)) <= P.n_recs
        assert all(0 < it.p <= 1 for it in rl.items)


@settings(max_examples=40, deadline=None)
@given(event_logs(), st.integers(1, 40))
def test_same_log_same_state_and_lists(events: list[Event], batch: int) -> None:
    a, la = run(events, batch)
    b, lb = run(events, batch)
    assert fingerprint(a.parts[0]) == fingerprint(b.parts[0])
    assert la == lb


@settings(max_examples=30, deadline=None)
@given(event_logs(), st.integers(1, 20), st.data())
def test_a_restored_snapshot_continues_identically(events: list[Event], batch: int, data: st.DataObject) -> None:
    """A pickled user partition restored mid-log ends where an uninterrupted one ends, and sends
    the item stage the same deltas on the way (exactly-once effects)."""
    cut = data.draw(st.integers(0, len(events) // batch)) * batch
    whole, first = UserPartition(P), UserPartition(P)
    for k in range(0, cut, batch):
        whole.apply(events[k : k + batch], list(range(k, k + batch)))
        first.apply(events[k : k + batch], list(range(k, k + batch)))
    restored = pickle.loads(pickle.dumps(first))
    for k in range(cut, len(events), batch):
        a = whole.apply(events[k : k + batch], list(range(k, k + batch)))
        b = restored.apply(events[k : k + batch], list(range(k, k + batch)))
        assert deltas_fingerprint(a.deltas) == deltas_fingerprint(b.deltas)
        assert a.users == b.users
    assert fingerprint(restored) == fingerprint(whole)


def ev(u: str, i: str, t: int, typ: str = "view", eid: str | None = None) -> Event:
    return Event(u, i, typ, 1_700_000_000_000 + t * 1000, eid)


def test_pairs_are_type_weighted_and_nearer_pairs_weigh_more() -> None:
    p = ModelParams(type_weights={"view": 1.0, "click": 2.0, "purchase": 4.0}, pair_decay=0.5)
    part = UserPartition(p)
    d = part.apply([ev("u", "a", 0, "view"), ev("u", "b", 1, "purchase"), ev("u", "c", 2, "view")])
    assert d.deltas is not None
    ids = part.item_ids
    got = {(ids[i], ids[j]): w for i, j, w in zip(d.deltas.pr_i, d.deltas.pr_j, d.deltas.pr_w, strict=True)}
    # sqrt(4 * 1) for b-a; c pairs with b one step back (weight 2) and with a two steps back (1 * 0.5)
    assert got == pytest.approx({("b", "a"): 2.0, ("c", "b"): 2.0, ("c", "a"): 0.5})
    assert d.deltas.ev_new.tolist() == [True, True, True]


def test_duplicate_event_ids_are_applied_once() -> None:
    s = UserPartition(ModelParams())
    eff = s.apply([ev("u", "a", 0, eid="x"), ev("u", "a", 0, eid="x"), ev("u", "b", 1, eid="y")], [0, 1, 2])
    assert eff.applied == 2 and eff.duplicates == 1
    assert s.user("u").n_events == 2
    assert eff.deltas is not None and eff.deltas.ev_offset.tolist() == [0, 2]


def test_user_cap_evicts_least_recently_active() -> None:
    s = UserPartition(ModelParams(max_users=2))
    s.apply([ev("a", "i", 0), ev("b", "i", 1), ev("a", "j", 2), ev("c", "i", 3)])
    assert list(s.users) == ["a", "c"]


def test_user_vectors_are_unit_length_and_need_no_item_stage() -> None:
    s = UserPartition(ModelParams())
    s.apply([ev("u", "a", 0), ev("u", "b", 1), ev("v", "a", 2)])
    v = s.user_vectors(["u", "v"])
    assert np.allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    # v has seen only a: its vector is a's index vector, to float16's precision (2^-11)
    a = s.index_vecs[s.item_index["a"]]
    assert np.allclose(v[1], a / np.linalg.norm(a), rtol=1e-3, atol=1e-4)
    assert not np.allclose(v[0], v[1], rtol=1e-3, atol=1e-4)


def test_similar_items_come_first() -> None:
    log = []
    for k in range(30):
        log += [ev(f"u{k}", "a", 10 * k), ev(f"u{k}", "b", 10 * k + 1)]
        log += [ev(f"w{k}", "x", 10 * k + 2), ev(f"w{k}", "y", 10 * k + 3)]
    sy = fed(ModelParams(epsilon=0.0), log)
    (rl,) = sy.block([ev("new", "a", 1000)])
    assert rl.items[0].item_id == "b"
    assert rl.items[0].reason == "similar to a"
    assert rl.version == 1 and rl.event_ts == 1_700_000_000_000 + 1_000_000


def test_blocked_items_are_not_recommended() -> None:
    from models.ranking import recommend

    sy = fed(ModelParams(epsilon=0.0), [ev("u", "a", 0), ev("u", "b", 1), ev("v", "a", 2), ev("v", "c", 3)])
    sy.block([ev("w", "a", 4)])
    (rl,) = recommend(sy.parts[0], sy.table, ["w"])
    assert {it.item_id for it in rl.items} == {"b", "c"}
    (rl,) = recommend(sy.parts[0], sy.table, ["w"], blocked={"b"})
    assert [it.item_id for it in rl.items] == ["c"]


def _reference_ranking(part: UserPartition, table: ItemTable, uid: str) -> list[tuple[int, float, int]]:
    """A user's ranking, (item, score, named source or -1) best first, computed the plain way:
    dicts per candidate and dense long-term and vector scores, from the documented rules."""
    import math

    from models.ranking import _MS_PER_H
    from models.table import top_indices

    p = part.params
    cat = part.catalogue_map(table)
    decay = math.log(2.0) / (p.user_half_life_h * _MS_PER_H)
    view = part.user(uid)
    # sources: the newest distinct history items; the n-th newest weighs its event type's weight
    # times source_decay ** n times exp(-decay * its age behind the user's last event)
    srcs: list[int] = []
    hs: list[float] = []
    for i, ts, w in reversed(view.history):
        if i not in srcs and len(srcs) < p.sources:
            hs.append(w * p.source_decay ** len(srcs) * math.exp(-decay * (view.last_ts - ts)))
            srcs.append(i)
    cooc: dict[int, float] = {}
    best: dict[int, tuple[float, int]] = {}
    for j, h in zip(cat[srcs].tolist(), hs, strict=True):
        nb, sc = table.sim_top(j)
        for i, x in zip(nb.tolist(), sc.tolist(), strict=True):
            c = x * h
            cooc[i] = cooc.get(i, 0.0) + c
            if c > best.get(i, (0.0, -1))[0]:
                best[i] = (c, j)
    n = table.n_items
    seen = set(cat[part.user(uid).seen].tolist())
    pop = table.pop()
    members = (set(cooc) | set(top_indices(pop, p.trending_len).tolist())) - seen
    vec: dict[int, float] = {}
    if p.w_vec > 0:
        sims = table.unit[:n] @ part.user_vectors([uid])[0]
        order = [i for i in np.argsort(-sims, kind="stable").tolist() if i not in seen][: p.vector_candidates]
        vec = {i: max(float(sims[i]), 0.0) for i in order}
    lng: dict[int, float] = {}
    if table.long is not None and p.w_long > 0:
        lt = table.long
        items = cat[np.array([i for i, _, _ in part.user(uid).history], dtype=np.int64)]
        w = 0.5 ** ((len(items) - 1 - np.arange(len(items))) / p.long_half_life)
        x = np.zeros(len(lt.pool))
        for i, wi in zip(items.tolist(), w.tolist(), strict=True):
            if i < len(lt.pos) and lt.pos[i] >= 0:
                x[lt.pos[i]] += wi
        sc = x @ lt.weights.astype(np.float64)
        ranked = sorted((j for j in range(len(lt.pool)) if lt.pool[j] not in seen and sc[j] > 0), key=lambda j: -sc[j])
        lng = {int(lt.pool[j]): float(sc[j]) for j in ranked[: p.long_candidates]}
    members |= (set(vec) | set(lng)) - seen
    hsum = sum(hs) or 1.0
    ct = {i: p.w_cooc * cooc.get(i, 0.0) / hsum for i in members}
    scale = 1.0
    if lng:
        scale = (max(max(ct.values()), 0.0) or 1.0) / (max(lng.values()) or 1.0)
    out = []
    for i in members:
        taste = p.w_vec * vec.get(i, 0.0) + p.w_long * lng.get(i, 0.0) * scale
        score = p.w_pop * pop[i] / pop.max() + ct[i] + taste
        out.append((i, score, -1 if taste > ct[i] else best.get(i, (0.0, -1))[1]))
    return sorted(out, key=lambda t: (-t[1], t[0]))


@pytest.mark.parametrize(
    "blend", [{"long_refit_events": 1000}, {"w_long": 0.0, "w_vec": 0.2}], ids=["long-term", "user-vector"]
)
def test_compiled_ranking_agrees_with_a_plain_reference(blend: dict) -> None:
    """The kernels (``models.kernels``) rank as the documented rules say: same lists, scores,
    and named sources as a dict-per-candidate implementation."""
    from models.ranking import recommend

    p = ModelParams(epsilon=0.0, **blend)
    sy = TwoStage(p)
    for e in synthetic(n_users=60, n_items=300, n_events=4000, seed=5):
        sy.learn(e)  # one at a time, so that a long-term fit is installed on the way
    assert (sy.table.long is not None) == (p.w_long > 0)
    part, table = sy.parts[0], sy.table
    users = list(part.users)
    for rl in recommend(part, table, users):
        ref = _reference_ranking(part, table, rl.user_id)[: p.n_recs]
        assert len(rl.items) == len(ref) == p.n_recs
        assert np.allclose(rl.scores, [s for _, s, _ in ref], rtol=1e-5)
        ref_scores = [s for _, s, _ in ref]
        for k, (it, (i, s, src)) in enumerate(zip(rl.items, ref, strict=True)):
            if sum(abs(x - s) < 1e-6 for x in ref_scores) == 1:  # near-ties may list either item first
                assert it.item_id == table.ids[i]
                named = "similar to " + table.ids[src] if src >= 0 else None
                assert it.reason == named or (named is None and it.reason != "exploration"), k


def test_restored_state_takes_new_ranking_settings_but_refuses_structural_ones() -> None:
    s = UserPartition(P)
    s.apply([ev("u", "a", 0), ev("u", "b", 1)])
    assert s.reconfigure(dataclasses.replace(P, epsilon=0.3, n_recs=7)) == ["n_recs", "epsilon"]
    assert s.params.epsilon == 0.3
    with pytest.raises(ValueError, match="dim=8"):
        s.reconfigure(dataclasses.replace(P, dim=16))


def test_a_neighbour_list_naming_items_the_worker_never_heard_of_ranks_them() -> None:
    """Entries are parsed when first ranked with; an entry can name an item whose own entry has
    not arrived yet (another item partition publishes it), growing the catalogue mid-ranking."""
    from models.ranking import recommend
    from models.table import ItemTable, TableEntry

    p = ModelParams(epsilon=0.0, dim=8, w_long=0.0)
    part, table = UserPartition(p), ItemTable(p.dim)
    part.apply([ev("u", "a", 0)])
    unit = np.zeros(p.dim, dtype=np.float32)
    table.apply([TableEntry.of("a", 0.0, ["x", "y"], np.array([0.9, 0.5], dtype=np.float32), unit)])
    assert "x" not in table.index
    (rl,) = recommend(part, table, ["u"])
    assert [it.item_id for it in rl.items] == ["x", "y"] and rl.items[0].reason == "similar to a"


def _plain_users(events: list[Event], p: ModelParams) -> dict[str, tuple]:
    """Each user's history, seen items (oldest first), event count and last time, kept the plain
    way (lists and dicts per user, least recently active evicted beyond ``max_users``)."""
    from collections import OrderedDict

    users: OrderedDict[str, tuple[list, dict, list]] = OrderedDict()
    ids: set[str] = set()
    for e in events:
        if e.event_id is not None:
            if e.event_id in ids:
                continue
            ids.add(e.event_id)
        if e.user_id not in users:
            users[e.user_id] = ([], {}, [0, 0])
            if len(users) > p.max_users:
                users.popitem(last=False)
        users.move_to_end(e.user_id)
        hist, seen, counts = users[e.user_id]
        hist.append((e.item_id, e.ts, p.type_weights[e.type]))
        del hist[: -p.history_len]
        if e.item_id not in seen:
            seen[e.item_id] = None
            if len(seen) > p.max_seen:
                del seen[next(iter(seen))]
        counts[0] += 1
        counts[1] = max(counts[1], e.ts)
    return {u: (h, list(s), c[0], c[1]) for u, (h, s, c) in users.items()}


@settings(max_examples=80, deadline=None)
@given(event_logs(), st.integers(1, 40), st.sampled_from([(6, 3, 3), (6, 100, 8), (4, 5, 2)]))
def test_flat_user_records_keep_what_a_plain_model_keeps(events: list[Event], batch: int, bounds: tuple) -> None:
    """Histories, seen items (implied by the history until it drops an entry, then a set of their
    own, also when ``max_seen`` is below ``history_len``), counts and evictions, whatever the
    blocks."""
    history_len, max_seen, max_users = bounds
    p = dataclasses.replace(P, history_len=history_len, pair_window=min(4, history_len), max_seen=max_seen)
    p = dataclasses.replace(p, max_users=max_users)
    part = UserPartition(p)
    for k in range(0, len(events), batch):
        part.apply(events[k : k + batch])
    ids = part.item_ids
    got = {
        v.uid: ([(ids[i], ts, w) for i, ts, w in v.history], [ids[i] for i in v.seen], v.n_events, v.last_ts)
        for v in part.views()
    }
    assert got == _plain_users(events, p)
    assert list(got) == list(_plain_users(events, p))  # least recently active first
    # every live user has a row of its own
    rows = [row_of(rec) for rec in part.users.values()]
    assert len(set(rows)) == len(rows) and not set(rows) & set(part.free_rows)


def test_a_shorter_history_on_restore_keeps_every_seen_item() -> None:
    """``reconfigure`` trims histories to a shorter ``history_len``; items that leave the history
    stay seen, and stay out of the user's list."""
    from models.ranking import recommend

    sy = TwoStage(dataclasses.replace(P, epsilon=0.0))
    others = [ev(u, f"i{k}", 10 * k + j) for k in range(10) for j, u in enumerate(("a", "b"))]
    sy.block(others + [ev("u", f"i{k}", 1000 + k) for k in range(5)])
    part = sy.parts[0]
    assert "u" not in part.seen  # the history still holds every item the user has seen
    restored = pickle.loads(pickle.dumps(part))
    assert restored.reconfigure(dataclasses.replace(P, epsilon=0.0, history_len=4)) == ["history_len"]
    v = restored.user("u")
    assert [restored.item_ids[i] for i, _, _ in v.history] == ["i1", "i2", "i3", "i4"]
    assert [restored.item_ids[i] for i in v.seen] == [f"i{k}" for k in range(5)]
    (rl,) = recommend(restored, sy.table, ["u"])
    assert rl.items and not {x.item_id for x in rl.items} & {f"i{k}" for k in range(5)}


def test_a_list_does_not_depend_on_what_was_ranked_before_it() -> None:
    """Nothing of one ranking call carries into the next: a user ranked alone, after other
    users, after a call with blocked items, or in one chunk with all of them gets the same list."""
    from models.ranking import recommend

    sy = TwoStage(dataclasses.replace(P, epsilon=0.0))
    for e in synthetic(n_users=30, n_items=80, n_events=1500, seed=9):
        sy.learn(e)
    part, table = sy.parts[0], sy.table
    users = sorted(part.users)
    together = {rl.user_id: rl.item_ids for rl in recommend(part, table, users)}
    hot = together[users[0]][:3]
    blocked = recommend(part, table, users[:5], blocked=hot)
    assert all(not set(hot) & set(rl.item_ids) for rl in blocked)
    for uid in reversed(users):
        (alone,) = recommend(part, table, [uid])
        assert alone.item_ids == together[uid], uid


@pytest.mark.parametrize("blend", [{"long_refit_events": 1000}, {"w_long": 0.0, "w_vec": 0.2}])
def test_lists_are_the_same_on_any_number_of_rank_threads(blend: dict) -> None:
    """A block's users cut into parts ranked on several threads (``RANK_THREADS``) get the
    lists, scores, reasons and exploration draws one thread gives them, and parts did run off
    the caller's thread (an idle pool thread may take two parts)."""
    import threading

    from models import threads
    from models.ranking import recommend

    sy = TwoStage(ModelParams(**blend))
    for e in synthetic(n_users=90, n_items=300, n_events=5000, seed=3):
        sy.learn(e)
    part, table = sy.parts[0], sy.table
    users = sorted(part.users)
    assert len(users) >= 3 * threads.MIN_USERS_PER_PART
    one = recommend(part, table, users)
    seen: list[int] = []
    try:
        threads.set_threads(3)
        real = threads.by_users

        def spy(nu: int, call):  # type: ignore[no-untyped-def]
            def mark(a: int, b: int):  # type: ignore[no-untyped-def]
                seen.append(threading.get_ident())
                return call(a, b)

            return real(nu, mark)

        threads.by_users = spy  # type: ignore[assignment]
        many = recommend(part, table, users)
    finally:
        threads.by_users = real  # type: ignore[assignment]
        threads.set_threads(1)
    assert many == one
    assert len(seen) >= 3 and len(set(seen)) >= 2 and threading.get_ident() in seen


def test_users_split_across_threads_come_back_in_order() -> None:
    """``threads.by_users`` covers every user once, in order, in as many parts as threads
    (no part under ``MIN_USERS_PER_PART``), and joins each output array the same way."""
    from models import threads

    def call(a: int, b: int) -> tuple[np.ndarray, ...]:
        r = np.arange(a, b)
        return r, np.stack([r, -r], axis=1)

    try:
        for n, nu, parts in [(1, 100, 1), (2, 100, 2), (4, 100, 4), (4, 40, 2), (3, 15, 1), (2, 0, 1)]:
            threads.set_threads(n)
            cuts: list[int] = []

            def count(a: int, b: int, cuts: list[int] = cuts) -> tuple[np.ndarray, ...]:
                cuts.append(a)
                return call(a, b)

            ids, pairs = threads.by_users(nu, count)
            assert len(cuts) == parts, (n, nu)
            assert ids.tolist() == list(range(nu))
            assert pairs.tolist() == [[r, -r] for r in range(nu)]
    finally:
        threads.set_threads(1)
    with pytest.raises(ValueError, match="at least 1"):
        threads.set_threads(0)


@settings(max_examples=40, deadline=None)
@given(event_logs(), st.integers(1, 12), st.floats(0.3, 1.0))
def test_sources_kernel_matches_the_documented_rule_exactly(events: list[Event], k: int, step: float) -> None:
    """``kernels.user_sources`` over records laid end to end gives every user's newest distinct
    items with the weights of the plain rule, bit for bit (replays must rank identically)."""
    import math

    from models.kernels import history_items, user_sources

    part = UserPartition(P)
    part.apply(events)
    uids = list(part.users)
    recs = [part.users[u] for u in uids]
    flat = np.frombuffer(b"".join(recs), dtype=np.int64)
    ptr = np.concatenate([[0], np.cumsum([len(r) for r in recs])]).astype(np.int64)
    decay = 1e-7
    s_ptr, s_item, s_w, hsum = user_sources(flat, ptr, np.asarray(part.weights), k, decay, step)
    hist: list[int] = []
    for r, uid in enumerate(uids):
        view = part.user(uid)
        hist.extend(i for i, _, _ in view.history)
        srcs: list[int] = []
        hs: list[float] = []
        f = 1.0
        for i, ts, w in reversed(view.history):
            if i not in srcs and len(srcs) < k:
                srcs.append(i)
                hs.append(w * f * math.exp(-decay * (view.last_ts - ts)))
                f *= step
        a, b = s_ptr[r], s_ptr[r + 1]
        assert s_item[a:b].tolist() == srcs
        assert s_w[a:b].tolist() == hs
        assert hsum[r] == sum(hs)
    assert history_items(flat, ptr).tolist() == hist
