"""The CTR model as a ``ranking.Rescorer``: all users' candidates scored in one batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import chain

import numpy as np
import torch

from models.ctr.din import DIN
from models.ctr.features import N_DENSE, CtrBatch, FeatureHasher, rerank_inputs
from models.ctr.train import logits, predict


class CtrRescorer:
    """Scores (user, candidate) pairs with a trained model; ``version`` names it in the lists.

    A model with ``N_DENSE`` dense inputs reads each candidate's ranking context (a re-ranker,
    trained with a softmax over served lists), and its logit is the score added to the blend.
    A model without them (``n_dense = 0``) scores P(click) from ids alone.
    """

    def __init__(self, model: DIN, version: int, weight: float, categories: Mapping[str, str]) -> None:
        self.model = model.eval()
        self.version = version
        self.weight = weight
        self.categories = categories
        self.reranker = model.cfg.n_dense == N_DENSE
        self.hasher = FeatureHasher(model.cfg.buckets, model.cfg.hist_len, n_dense=model.cfg.n_dense)

    def batch(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]],
        context: Sequence[np.ndarray] | None = None,
    ) -> CtrBatch:
        """One batch of every user's candidates: rows grouped by user, in order."""
        fh, cats, L = self.hasher, self.categories, self.hasher.hist_len
        counts = np.fromiter(map(len, candidates), dtype=np.int64, count=len(candidates))
        n = int(counts.sum())
        hist = np.zeros((len(user_ids), L), dtype=np.int64)
        for r, h in enumerate(histories):
            hh = h[-L:]
            if hh:
                hist[r, L - len(hh) :] = fh.buckets("i", hh)
        items = list(chain.from_iterable(candidates))
        dense = np.zeros((n, fh.n_dense), dtype=np.float32)
        if self.reranker and n:
            if context is None:
                raise ValueError("a re-ranking model needs the candidates' ranking context")
            dense[:] = np.concatenate(rerank_inputs(histories, candidates, context, cats))
        return CtrBatch(
            np.repeat(fh.buckets("u", user_ids), counts),
            fh.buckets("i", items),
            fh.buckets("c", list(map(cats.get, items))),
            np.repeat(hist, counts, axis=0),
            dense,
            np.zeros(n, dtype=np.float32),
        )

    def score(
        self,
        user_ids: Sequence[str],
        histories: Sequence[Sequence[str]],
        candidates: Sequence[Sequence[str]],
        context: Sequence[np.ndarray] | None = None,
    ) -> list[np.ndarray]:
        b = self.batch(user_ids, histories, candidates, context)
        if len(b) == 0:
            return [np.zeros(0) for _ in candidates]
        with torch.inference_mode():
            p = logits(self.model, b) if self.reranker else predict(self.model, b)
        bounds = np.cumsum([len(c) for c in candidates])[:-1]
        return list(np.split(p, bounds))
