"""Logistic regression on the CTR model's features: the baseline it must beat.

One weight per hashed bucket for the user, the item, its category, and the mean over the
history items; no interactions between them (that is what the DIN model adds).
"""

from __future__ import annotations

import torch
from torch import nn

from models.ctr.din import CtrConfig, to_tensors
from models.ctr.features import CtrBatch


class LogReg(nn.Module):
    """(B,) logits = bias + w[user] + w[item] + w[cat] + mean_l w[hist_l] + v . dense."""

    def __init__(self, cfg: CtrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w = nn.Embedding(cfg.buckets, 1, padding_idx=0, sparse=True)
        nn.init.zeros_(self.w.weight)
        self.bias = nn.Parameter(torch.zeros(1))
        self.v = nn.Linear(cfg.n_dense, 1, bias=False) if cfg.n_dense else None

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, cat: torch.Tensor, hist: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        w = self.w
        n = (hist != 0).sum(dim=1).clamp(min=1)
        h = w(hist).squeeze(-1).sum(dim=1) / n
        out: torch.Tensor = self.bias + w(user).squeeze(-1) + w(item).squeeze(-1) + w(cat).squeeze(-1) + h
        if self.v is not None:
            out = out + self.v(dense).squeeze(-1)
        return out

    def forward_batch(self, b: CtrBatch) -> torch.Tensor:
        out: torch.Tensor = self(*to_tensors(b, self.w.weight.device))
        return out
