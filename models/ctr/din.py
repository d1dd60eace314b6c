"""DIN-style CTR model (Zhou et al., 2018): target attention over the user's recent items.

The user's interest is not one fixed vector: for each candidate, the recent items that resemble
it get more weight. Shapes below use B (batch), L (history length) and D (embedding size).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from models.ctr.features import CtrBatch


@dataclass(frozen=True)
class CtrConfig:
    buckets: int = 1 << 18  # hashed ids share one embedding table (bucket 0 is padding)
    dim: int = 8
    hist_len: int = 10
    att_hidden: int = 32
    hidden: tuple[int, ...] = (64, 32)
    lr: float = 0.01
    n_dense: int = 0  # numeric inputs (``Sample.dense``) fed to the top MLP as they are


class TargetAttention(nn.Module):
    """Weights each history item by an MLP of (item, target, item*target, item-target).

    ``hist`` (B, L, D), ``target`` (B, D), ``mask`` (B, L) bool, True where a slot holds an item
    -> (B, D): the attention-weighted sum of the history (zeros for an empty history).
    """

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(4 * dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, hist: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # The first layer on the concatenation, W [h, t, h*t, h-t] + b, computed as
        # [W1 + W4, W3] [h, h*t] + ((W2 - W4) t + b): the same function with half the work over
        # the (B, L) history (the target's part is computed once per row, not once per slot).
        first, last = cast(nn.Linear, self.mlp[0]), self.mlp[2]
        w1, w2, w3, w4 = first.weight.chunk(4, dim=1)  # each (H, D)
        t = target.unsqueeze(1)  # (B, 1, D)
        pre = torch.cat([hist, hist * t], dim=-1) @ torch.cat([w1 + w4, w3], dim=1).T  # (B, L, H)
        pre += t @ (w2 - w4).T + first.bias
        logits = last(pre.relu_()).squeeze(-1)  # (B, L)
        logits = logits.masked_fill(~mask, float("-inf"))
        w = torch.softmax(logits, dim=1).nan_to_num(0.0)  # an all-empty row gives NaN: no weight
        return torch.bmm(w.unsqueeze(1), hist).squeeze(1)


class DIN(nn.Module):
    """Logits of P(interaction) for a ``CtrBatch``: (B,) float32.

    Input to the top MLP (B, 5D + F): user, target item, target category, attention-pooled
    history, target * pooled history (the interest match, explicitly) and the F dense inputs.
    """

    def __init__(self, cfg: CtrConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        self.emb = nn.Embedding(cfg.buckets, d, padding_idx=0, sparse=True)
        nn.init.normal_(self.emb.weight, 0.0, 0.01)
        with torch.no_grad():
            self.emb.weight[0].zero_()
        self.att = TargetAttention(d, cfg.att_hidden)
        layers: list[nn.Module] = []
        width = 5 * d + cfg.n_dense
        for h in cfg.hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, 1))
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, user: torch.Tensor, item: torch.Tensor, cat: torch.Tensor, hist: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        e = self.emb
        t = e(item)  # (B, D)
        h = e(hist)  # (B, L, D)
        pooled = self.att(h, t, hist != 0)
        x = torch.cat([e(user), t, e(cat), pooled, t * pooled, dense], dim=1)
        out: torch.Tensor = self.mlp(x).squeeze(1)
        return out

    def forward_batch(self, b: CtrBatch) -> torch.Tensor:
        out: torch.Tensor = self(*to_tensors(b))
        return out


def to_tensors(b: CtrBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(b.user),
        torch.from_numpy(b.item),
        torch.from_numpy(b.cat),
        torch.from_numpy(b.hist if b.hist.flags.writeable else b.hist.copy()),
        torch.from_numpy(b.dense),
    )
