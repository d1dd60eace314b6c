"""streamrec with the CTR model in its ranking, learning online: for prequential evaluation.

The same parts as the running system, in one process: every list ``recommend`` ranks is shown
to a ``SampleBuilder`` (as the worker's lists are), which turns each event into samples (list
samples when the item taken was among the user's last candidates); the model trains on them in
micro-batches of ``batch_size`` samples (``train_step``, as the trainer does) and re-ranks
through ``CtrRescorer`` once it has taken a step. What the evaluation then measures is the
lift of the CTR model over the same system without it, in the same pass.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import torch

from models.baselines import Streamrec
from models.ctr.din import DIN, CtrConfig
from models.ctr.features import FeatureHasher, Sample
from models.ctr.rescorer import CtrRescorer
from models.ctr.samples import SampleBuilder, SampleParams
from models.ctr.train import optimizers, train_step
from models.events import Event
from models.params import ModelParams
from models.ranking import Candidates


class _Untrained:
    """The rescorer until the model's first step: an untrained model would only add noise."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def score(self, c: Candidates) -> np.ndarray:
        return np.zeros(c.ids.shape)


class StreamrecCtr(Streamrec):
    name = "streamrec+ctr"

    def __init__(
        self, params: ModelParams, weight: float, cfg: CtrConfig, samples: SampleParams, batch_size: int = 1024
    ) -> None:
        super().__init__(params)
        torch.manual_seed(params.seed)
        self.model = DIN(cfg)
        self.opts = optimizers(self.model, cfg.lr)
        self.hasher = FeatureHasher(cfg.buckets, cfg.hist_len, n_dense=cfg.n_dense)
        self.builder = SampleBuilder(samples)
        self.rescorer = CtrRescorer(self.model, 0, weight, self.builder.categories)
        self.untrained = _Untrained(weight)
        self.buffer: list[Sample] = []
        self.batch_size = batch_size
        self.steps = 0
        self.lists = 0  # list samples made (events that took one of the user's candidates)

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        rescorer = self.rescorer if self.steps else self.untrained
        rl = self.sim.recommend(user, rescorer=rescorer, observer=self.builder)
        if rl is None:
            return super().recommend(user, k, exclude)
        return [it.item_id for it in rl.items][:k]

    def learn(self, event: Event) -> None:
        smp = self.builder.feed([event])
        self.lists += sum(1 for x in smp if x.group is not None and x.label > 0)
        self.buffer.extend(smp)
        if len(self.buffer) >= self.batch_size:
            train_step(self.model, self.opts, self.hasher.batch(self.buffer))
            self.buffer.clear()
            self.steps += 1
        super().learn(event)
