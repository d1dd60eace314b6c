"""The CTR model as a ``ranking.Rescorer``: a chunk's candidates scored in one batch."""

from __future__ import annotations

from collections.abc import Mapping
from itertools import chain

import numpy as np
import torch

from models.ctr.din import DIN
from models.ctr.features import N_DENSE, FeatureHasher, rerank_dense
from models.ctr.train import sigmoid
from models.ranking import Candidates


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

    def inputs(self, c: Candidates) -> tuple[torch.Tensor, ...]:
        """``DIN.score_lists``' inputs for the chunk: user (U,), history (U, L) right-aligned,
        item and category (U, width) buckets (0 past ``c.cnt``), dense (U, width, F)."""
        fh, L = self.hasher, self.hasher.hist_len
        nu, width = c.ids.shape
        recent = c.recent(L)
        lens = np.fromiter(map(len, recent), dtype=np.int64, count=nu)
        hist = np.zeros((nu, L), dtype=np.int64)
        hist[np.arange(L) >= L - lens[:, None]] = fh.buckets("i", list(chain.from_iterable(recent)))
        ids = c.ids.ravel().tolist()
        item = fh.buckets("i", ids).reshape(nu, width)
        cats = list(map(self.categories.get, ids))
        cat = fh.buckets("c", cats).reshape(nu, width)
        if self.reranker:
            dense = rerank_dense(c, self.categories, cats)
        else:
            dense = np.zeros((nu, width, fh.n_dense), dtype=np.float32)
        user = fh.buckets("u", c.user_ids)
        return tuple(map(torch.from_numpy, (user, hist, item, cat, dense)))

    def score(self, c: Candidates) -> np.ndarray:
        """(U, width) float64: logits for a re-ranker, else P(click)."""
        if c.ids.size == 0:
            return np.zeros(c.ids.shape)
        with torch.inference_mode():
            z = self.model.score_lists(*self.inputs(c)).double().numpy()
        return z if self.reranker else sigmoid(z)
