"""The CTR model in the ranking: the blend, and the online variant used by the evaluator."""

from __future__ import annotations

import numpy as np
import pytest

from models.ctr.din import CtrConfig
from models.ctr.features import N_DENSE
from models.ctr.online import StreamrecCtr
from models.ctr.samples import SampleParams
from models.events import Event
from models.params import ModelParams
from models.ranking import RANK_FEATURES, Candidates, recommend
from models.simulation import TwoStage
from stream_app.datasets import synthetic_events
from tests.unit.systems import fed, synthetic


class Favour:
    """A rescorer that likes exactly one item."""

    def __init__(self, item: str, weight: float) -> None:
        self.item, self.weight = item, weight
        self.calls = 0

    def score(self, c: Candidates) -> np.ndarray:
        self.calls += 1
        nu, width = c.ids.shape
        assert len(c.user_ids) == nu == len(c.cnt) and c.context.shape == (nu, width, RANK_FEATURES)
        assert all(all(x is not None for x in row[:m]) for row, m in zip(c.ids, c.cnt, strict=True))
        assert (c.ids[np.arange(width) >= c.cnt[:, None]] == None).all()  # noqa: E711 (elementwise)
        return (c.ids == self.item).astype(np.float64)


def _system(params: ModelParams | None = None, n_items: int = 60) -> TwoStage:
    return fed(
        params or ModelParams(epsilon=0.0, n_recs=10), synthetic(n_users=40, n_items=n_items, n_events=3000, seed=2)
    )


def test_the_blend_reorders_candidates_and_is_batched_over_users() -> None:
    sy = _system()
    part, table = sy.parts[0], sy.table
    users = list(part.users)[:8]
    plain = recommend(part, table, users)
    last = plain[0].items[-1].item_id  # the weakest of user 0's candidates
    fav = Favour(last, weight=5.0)
    boosted = recommend(part, table, users, rescorer=fav)
    assert fav.calls == 1  # one call for the whole chunk of users
    assert boosted[0].items[0].item_id == last
    assert sorted(x.item_id for x in boosted[0].items) == sorted(x.item_id for x in plain[0].items)
    seen = set(part.user(users[0]).seen)
    assert not {part.item_index[x.item_id] for x in boosted[0].items} & seen
    zero = recommend(part, table, users, rescorer=Favour(last, weight=0.0))
    assert [r.items for r in zero] == [r.items for r in plain]  # weight 0: the ranking unchanged


def test_online_ctr_ranker_trains_and_recommends_unseen_items() -> None:
    rows = synthetic_events(n_users=50, n_items=80, n_events=4000, seed=3)
    m = StreamrecCtr(
        ModelParams(epsilon=0.0, n_recs=10),
        0.5,
        CtrConfig(buckets=4096, dim=4, hist_len=5, n_dense=N_DENSE),
        SampleParams(hist_len=5, sampled_negatives=2),
        batch_size=256,
    )
    had: dict[str, set[str]] = {}
    for r in rows:
        e = Event(str(r["user_id"]), str(r["item_id"]), str(r["type"]), int(r["ts"]))
        top = m.recommend(e.user_id, 10, had.get(e.user_id, set()))
        assert not set(top) & had.get(e.user_id, set())
        m.learn(e)
        had.setdefault(e.user_id, set()).add(e.item_id)
    assert m.steps > 5 and m.rescorer.reranker and m.lists > 300


def test_the_ranking_context_describes_each_candidate_as_retrieval_saw_it() -> None:
    sy = _system()
    part, table = sy.parts[0], sy.table
    users = list(part.users)[:5]
    seen: list[tuple[list[str], list[np.ndarray]]] = []

    class Keep:
        def observe(self, c: Candidates) -> None:
            seen.append((c.lists(), [x[:m] for x, m in zip(c.context, c.cnt, strict=True)]))

    lists = recommend(part, table, users, observer=Keep())
    ((cands, ctx),) = seen
    for rl, cs, x in zip(lists, cands, ctx, strict=True):
        assert [it.item_id for it in rl.items] == cs[: len(rl.items)]  # no exploration, no rescorer
        assert x.shape == (len(cs), RANK_FEATURES) and x.dtype == np.float32
        assert x[0, 0] == 1.0 and (np.diff(x[:, 0]) <= 1e-6).all() and (x >= 0).all()
        assert x[:, 1].tolist() == pytest.approx(np.log1p(np.arange(len(cs))) / 5)
        u = part.user(rl.user_id)
        nb, sc = table.sim_top(table.index[part.item_ids[u.history[-1][0]]])
        sims = dict(zip(nb.tolist(), sc.tolist(), strict=True))
        assert x[:, 4].tolist() == pytest.approx([sims.get(table.index[c], 0.0) for c in cs])
        assert len(set(x[:, 5].tolist())) == 1  # a user column


def test_a_reranker_sees_a_deeper_pool_than_a_list_draws_from() -> None:
    sy = _system(ModelParams(epsilon=0.0, n_recs=5, explore_pool=5, rerank_pool=30), n_items=200)
    part, table = sy.parts[0], sy.table
    users = list(part.users)[:6]
    plain = recommend(part, table, users)
    seen: list[list[str]] = []

    class Keep:
        def observe(self, c: Candidates) -> None:
            seen.extend(c.lists())

    observed = recommend(part, table, users, observer=Keep())
    assert [r.items for r in observed] == [r.items for r in plain]  # watching changes no list
    assert [len(cs) for cs in seen] == [30] * len(users)
    assert all(cs[:5] == [it.item_id for it in rl.items] for cs, rl in zip(seen, plain, strict=True))
    deep = seen[0][25]  # below the 10 candidates a list is drawn from
    assert deep not in {it.item_id for it in plain[0].items}
    boosted = recommend(part, table, users, rescorer=Favour(deep, weight=5.0))
    assert boosted[0].items[0].item_id == deep
    assert len(boosted[0].items) == 5
