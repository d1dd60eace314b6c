"""streamrec with the CTR model in its ranking, learning online: for prequential evaluation.

The same parts as the running system, in one process: ``SampleBuilder`` turns each event into
samples, the DIN model trains on them in micro-batches (``train_step``), and ``recommend``
blends its scores in through ``CtrRescorer``. What the evaluation then measures is the lift
of the CTR model over the same system without it, in the same pass.
"""

from __future__ import annotations

from collections.abc import Collection

import torch

from models.baselines import Streamrec
from models.ctr.din import DIN, CtrConfig
from models.ctr.features import FeatureHasher, Sample
from models.ctr.rescorer import CtrRescorer
from models.ctr.samples import SampleBuilder, SampleParams
from models.ctr.train import optimizers, train_step
from models.events import Event
from models.params import ModelParams
from models.ranking import recommend


class StreamrecCtr(Streamrec):
    name = "streamrec+ctr"

    def __init__(
        self, params: ModelParams, weight: float, cfg: CtrConfig, samples: SampleParams, batch_size: int = 1024
    ) -> None:
        super().__init__(params)
        torch.manual_seed(params.seed)
        self.model = DIN(cfg)
        self.opts = optimizers(self.model, cfg.lr)
        self.hasher = FeatureHasher(cfg.buckets, cfg.hist_len)
        self.builder = SampleBuilder(samples)
        self.rescorer = CtrRescorer(self.model, 0, weight, self.builder.categories)
        self.buffer: list[Sample] = []
        self.batch_size = batch_size
        self.steps = 0

    def recommend(self, user: str, k: int, exclude: Collection[str]) -> list[str]:
        if self.steps == 0 or user not in self.state.users:
            return super().recommend(user, k, exclude)
        (rl,) = recommend(self.state, [user], rescorer=self.rescorer)
        return [it.item_id for it in rl.items][:k]

    def learn(self, event: Event) -> None:
        self.buffer.extend(self.builder.feed([event]))
        if len(self.buffer) >= self.batch_size:
            train_step(self.model, self.opts, self.hasher.batch(self.buffer))
            self.buffer.clear()
            self.steps += 1
        super().learn(event)
