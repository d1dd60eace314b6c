"""The CTR model in the ranking: the blend, and the online variant used by the evaluator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from models.ctr.din import CtrConfig
from models.ctr.online import StreamrecCtr
from models.ctr.samples import SampleParams
from models.events import Event
from models.params import ModelParams
from models.ranking import recommend
from models.state import PartitionState
from stream_app.datasets import synthetic_events


class Favour:
    """A rescorer that likes exactly one item."""

    def __init__(self, item: str, weight: float) -> None:
        self.item, self.weight = item, weight
        self.calls = 0

    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        self.calls += 1
        assert len(user_ids) == len(histories) == len(candidates)
        return [np.array([1.0 if c == self.item else 0.0 for c in cs]) for cs in candidates]


def _state() -> PartitionState:
    st = PartitionState(ModelParams(epsilon=0.0, n_recs=10))
    rows = synthetic_events(n_users=40, n_items=60, n_events=3000, seed=2)
    st.apply([Event(str(r["user_id"]), str(r["item_id"]), str(r["type"]), int(r["ts"])) for r in rows])
    return st


def test_the_blend_reorders_candidates_and_is_batched_over_users() -> None:
    st = _state()
    users = list(st.users)[:8]
    plain = recommend(st, users)
    last = plain[0].items[-1].item_id  # the weakest of user 0's candidates
    fav = Favour(last, weight=5.0)
    boosted = recommend(st, users, rescorer=fav)
    assert fav.calls == 1  # one call for the whole chunk of users
    assert boosted[0].items[0].item_id == last
    assert sorted(x.item_id for x in boosted[0].items) == sorted(x.item_id for x in plain[0].items)
    seen = set(st.users[users[0]].seen)
    assert not {st.item_index[x.item_id] for x in boosted[0].items} & seen
    zero = recommend(st, users, rescorer=Favour(last, weight=0.0))
    assert [r.items for r in zero] == [r.items for r in plain]  # weight 0: the ranking unchanged


def test_online_ctr_ranker_trains_and_recommends_unseen_items() -> None:
    rows = synthetic_events(n_users=50, n_items=80, n_events=4000, seed=3)
    m = StreamrecCtr(
        ModelParams(epsilon=0.0, n_recs=10),
        0.5,
        CtrConfig(buckets=4096, dim=4, hist_len=5),
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
    assert m.steps > 5
