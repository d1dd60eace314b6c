"""Small, honest baselines for prequential evaluation, behind one contract with streamrec.

Every model here is an ``OnlineRanker``: ``recommend(user, k, exclude)`` returns up to k item ids
best first, never one in ``exclude``; ``learn(event)`` folds one event in. Item indices are kept
dense so scoring is one numpy operation per call.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from typing import Protocol

import numpy as np

from models.events import Event
from models.hashing import stable_hash
from models.params import ModelParams
from models.simulation import TwoStage
from models.table import top_indices


class OnlineRanker(Protocol):
    name: str

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]: ...

    def learn(self, event: Event) -> None: ...


class _Catalogue:
    """Dense item indices, grown on demand."""

    def __init__(self) -> None:
        self.ids: list[str] = []
        self.index: dict[str, int] = {}

    def item(self, item_id: str) -> int:
        i = self.index.get(item_id)
        if i is None:
            i = self.index[item_id] = len(self.ids)
            self.ids.append(item_id)
        return i

    def top(self, scores: np.ndarray, k: int, exclude: Collection[str]) -> list[str]:
        s = scores.astype(np.float64, copy=True)
        ex = [self.index[x] for x in exclude if x in self.index]
        if ex:
            s[ex] = -np.inf
        top = top_indices(s, k)
        return [self.ids[j] for j in top.tolist() if np.isfinite(s[j])]


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if n <= a.shape[0]:
        return a
    out = np.zeros((max(n, 2 * a.shape[0]),) + a.shape[1:], dtype=a.dtype)
    out[: a.shape[0]] = a
    return out


class Popularity:
    """Most interacted-with items so far (every event counts once)."""

    name = "pop"

    def __init__(self) -> None:
        self.cat = _Catalogue()
        self.counts = np.zeros(1024)

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        return self.cat.top(self.counts[: len(self.cat.ids)], k, exclude)

    def learn(self, event: Event) -> None:
        i = self.cat.item(event.item_id)
        self.counts = _grow(self.counts, i + 1)
        self.counts[i] += 1


class ItemCF:
    """Plain item-based CF: co-occurrence over each user's last 50 items, cosine normalised
    (``c_ij / sqrt(n_i n_j)``), candidates scored by summing over the user's last 20 items."""

    name = "itemcf"

    def __init__(self, window: int = 50, score_last: int = 20) -> None:
        self.cat = _Catalogue()
        self.window, self.score_last = window, score_last
        self.cooc = np.zeros((256, 256), dtype=np.float32)
        self.n = np.zeros(256)
        self.hist: dict[str, list[int]] = {}

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        m = len(self.cat.ids)
        h = self.hist.get(user, [])[-self.score_last :]
        if not h or m == 0:
            return self.cat.top(self.n[:m], k, exclude)  # cold user: popularity
        inv = 1.0 / np.sqrt(np.maximum(self.n[:m], 1.0))
        rows = self.cooc[h, :m] * inv[h][:, None]
        return self.cat.top(rows.sum(axis=0) * inv, k, exclude)

    def learn(self, event: Event) -> None:
        i = self.cat.item(event.item_id)
        if i >= self.cooc.shape[0]:
            size = max(i + 1, 2 * self.cooc.shape[0])
            c = np.zeros((size, size), dtype=np.float32)
            c[: self.cooc.shape[0], : self.cooc.shape[1]] = self.cooc
            self.cooc = c
            self.n = _grow(self.n, size)
        h = self.hist.setdefault(event.user_id, [])
        prev = [j for j in set(h[-self.window :]) if j != i]
        if prev:
            self.cooc[i, prev] += 1.0
            self.cooc[prev, i] += 1.0
        self.n[i] += 1
        h.append(i)
        if len(h) > 2 * self.window:
            del h[: -self.window]


class ISGD:
    """Incremental SGD matrix factorisation for positive-only feedback (Vinagre, Jorge and Gama,
    2014): each event is a target of 1; one SGD step on the user and the item vector."""

    name = "isgd"

    def __init__(self, factors: int = 10, lr: float = 0.05, reg: float = 0.01, seed: int = 0) -> None:
        self.cat = _Catalogue()
        self.factors, self.lr, self.reg, self.seed = factors, lr, reg, seed
        self.q = np.zeros((1024, factors))
        self.p: dict[str, np.ndarray] = {}

    def _init(self, *key: object) -> np.ndarray:
        return np.random.default_rng(stable_hash(self.seed, *key)).normal(0.0, 0.1, self.factors)

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        m = len(self.cat.ids)
        pu = self.p.get(user)
        if pu is None or m == 0:
            return []
        return self.cat.top(self.q[:m] @ pu, k, exclude)

    def learn(self, event: Event) -> None:
        new = event.item_id not in self.cat.index
        i = self.cat.item(event.item_id)
        self.q = _grow(self.q, i + 1)
        if new:
            self.q[i] = self._init("item", event.item_id)
        pu = self.p.get(event.user_id)
        if pu is None:
            pu = self.p[event.user_id] = self._init("user", event.user_id)
        qi = self.q[i].copy()
        err = 1.0 - float(pu @ qi)
        pu += self.lr * (err * qi - self.reg * pu)
        self.q[i] += self.lr * (err * pu - self.reg * qi)


class RiverFunkMF:
    """river's ``reco.FunkMF`` learning each event as a rating of 1; scoring reads its latent
    vectors directly (one matrix product instead of a ``predict_one`` per item)."""

    name = "funkmf"

    def __init__(self, factors: int = 10, seed: int = 0) -> None:
        from river import optim, reco

        self.model = reco.FunkMF(
            n_factors=factors,
            optimizer=optim.SGD(0.05),
            l2=0.01,
            seed=seed,
            initializer=optim.initializers.Normal(mu=0.0, sigma=0.1, seed=seed),
        )
        self.cat = _Catalogue()

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        m = len(self.cat.ids)
        if m == 0 or user not in self.model.u_latents:
            return []
        items = np.stack([self.model.i_latents[j] for j in self.cat.ids])
        return self.cat.top(items @ self.model.u_latents[user], k, exclude)

    def learn(self, event: Event) -> None:
        self.cat.item(event.item_id)
        self.model.learn_one(event.user_id, event.item_id, 1.0)  # type: ignore[no-untyped-call]


class Streamrec:
    """The project's own models in their two-stage topology (``models.simulation``), lists without
    exploration (evaluation scores the ranking); unknown users get trending items."""

    name = "streamrec"

    def __init__(self, params: ModelParams, partitions: int = 1, lag: int = 0) -> None:
        self.sim = TwoStage(params, partitions, lag)

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        rl = self.sim.recommend(user)  # the user's own seen set equals ``exclude``
        if rl is None:
            return self.sim.trending(k, exclude)
        return [it.item_id for it in rl.items][:k]

    def learn(self, event: Event) -> None:
        self.sim.learn(event)


BASELINES = ("pop", "itemcf", "isgd", "funkmf")


def make(name: str, params: ModelParams, seed: int, partitions: int = 1, lag: int = 0) -> OnlineRanker:
    """A model by its ``--baselines`` name, or ``streamrec`` (with ``partitions`` user partitions
    and a table ``lag`` events behind)."""
    if name == "streamrec":
        return Streamrec(params, partitions, lag)
    if name == "pop":
        return Popularity()
    if name == "itemcf":
        return ItemCF()
    if name == "isgd":
        return ISGD(seed=seed)
    if name == "funkmf":
        return RiverFunkMF(seed=seed)
    raise ValueError(f"unknown model {name!r}; choose from {', '.join(BASELINES)}")


def ndcg_at(rank: int) -> float:
    """Gain of a hit at 0-based ``rank`` (one relevant item, so the ideal DCG is 1)."""
    return 1.0 / math.log2(rank + 2)
