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
        out: torch.Tensor = self(*to_tensors(b, self.emb.weight.device))
        return out

    def score_lists(
        self, user: torch.Tensor, hist: torch.Tensor, item: torch.Tensor, cat: torch.Tensor, dense: torch.Tensor
    ) -> torch.Tensor:
        """``forward`` for lists: U users, each with one history and W candidates -> (U, W)
        logits, the same function as ``forward`` on the U * W rows.

        ``user`` (U,), ``hist`` (U, L), ``item`` and ``cat`` (U, W), ``dense`` (U, W, F). The
        history's part of the attention is computed once per user, and its first layer over all
        (candidate, slot) pairs is one batched product: the worker ranks a few users with a
        hundred or more candidates each, where the row form repeats each history W times.
        """
        e, att = self.emb, self.att
        first, last = cast(nn.Linear, att.mlp[0]), cast(nn.Linear, att.mlp[2])
        w1, w2, w3, w4 = first.weight.chunk(4, dim=1)  # each (H, D)
        nu, width = item.shape
        n_slots, (n_hidden, d) = hist.shape[1], w1.shape
        h = e(hist)  # (U, L, D)
        t = e(item)  # (U, W, D)
        # first layer at (candidate t, slot h): (W1 + W4) h + (W2 - W4) t + W3 (h * t) + b, as
        # [t, 1] @ K with K (D + 1, L * H) per user: rows d < D hold h_d W3[:, d] + (W2 - W4)[:, d]
        # (the parts linear in t), the last row (W1 + W4) h + b (the parts without t)
        k_t = h.unsqueeze(-1) * w3.T + (w2 - w4).T  # (U, L, D, H)
        k_1 = h @ (w1 + w4).T + first.bias  # (U, L, H)
        k = torch.cat([k_t.permute(0, 2, 1, 3), k_1.unsqueeze(1)], dim=1).reshape(nu, d + 1, n_slots * n_hidden)
        t1 = torch.cat([t, t.new_ones(nu, width, 1)], dim=-1)  # (U, W, D + 1)
        pre = torch.bmm(t1, k).view(nu, width, n_slots, n_hidden).relu_()
        logits = (pre @ last.weight.T).squeeze(-1) + last.bias  # (U, W, L)
        # softmax over the filled slots; torch.softmax is slow over a last dimension this short
        w = (logits - logits.amax(dim=-1, keepdim=True)).exp_() * (hist != 0).unsqueeze(1)
        w /= w.sum(dim=-1, keepdim=True).clamp_(min=1e-30)  # an empty history: no weight
        pooled = torch.bmm(w, h)  # (U, W, D)
        x = torch.cat([e(user).unsqueeze(1).expand(nu, width, d), t, e(cat), pooled, t * pooled, dense], dim=-1)
        out: torch.Tensor = self.mlp(x).squeeze(-1)
        return out


def to_tensors(
    b: CtrBatch, device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The batch's inputs as tensors on ``device`` (on the CPU they share the arrays' memory)."""
    arrays = (b.user, b.item, b.cat, b.hist if b.hist.flags.writeable else b.hist.copy(), b.dense)
    u, i, c, h, d = (torch.from_numpy(a).to(device) if device is not None else torch.from_numpy(a) for a in arrays)
    return u, i, c, h, d
