"""The CTR model as a ``ranking.Rescorer``: all users' candidates scored in one batch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from models.ctr.din import DIN
from models.ctr.features import CtrBatch, FeatureHasher
from models.ctr.train import predict


class CtrRescorer:
    """Scores (user, candidate) pairs with a trained model; ``version`` names it in the lists."""

    def __init__(self, model: DIN, version: int, weight: float, categories: Mapping[str, str]) -> None:
        self.model = model.eval()
        self.version = version
        self.weight = weight
        self.categories = categories
        self.hasher = FeatureHasher(model.cfg.buckets, model.cfg.hist_len, n_dense=model.cfg.n_dense)

    def batch(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]
    ) -> CtrBatch:
        """One batch of every user's candidates: rows grouped by user, in order."""
        bk, cats, L = self.hasher.bucket, self.categories, self.hasher.hist_len
        counts = np.fromiter(map(len, candidates), dtype=np.int64, count=len(candidates))
        n = int(counts.sum())
        hist = np.zeros((len(user_ids), L), dtype=np.int64)
        for r, h in enumerate(histories):
            hh = list(h)[-L:]
            if hh:
                hist[r, L - len(hh) :] = [bk("i", x) for x in hh]
        items = [x for c in candidates for x in c]
        return CtrBatch(
            np.repeat(np.fromiter((bk("u", u) for u in user_ids), dtype=np.int64, count=len(user_ids)), counts),
            np.fromiter((bk("i", x) for x in items), dtype=np.int64, count=n),
            np.fromiter((bk("c", cats[x]) if x in cats else 0 for x in items), dtype=np.int64, count=n),
            np.repeat(hist, counts, axis=0),
            np.zeros((n, self.hasher.n_dense), dtype=np.float32),
            np.zeros(n, dtype=np.float32),
        )

    def score(
        self, user_ids: Sequence[str], histories: Sequence[Sequence[str]], candidates: Sequence[Sequence[str]]
    ) -> list[np.ndarray]:
        b = self.batch(user_ids, histories, candidates)
        if len(b) == 0:
            return [np.zeros(0) for _ in candidates]
        with torch.inference_mode():
            p = predict(self.model, b)
        bounds = np.cumsum([len(c) for c in candidates])[:-1]
        return list(np.split(p, bounds))
