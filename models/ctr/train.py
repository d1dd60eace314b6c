"""Training and scoring, outside the models: plain functions over a model and a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, Protocol

import numpy as np
import torch
from scipy.special import expit
from torch import nn

from models.ctr.features import CtrBatch


class CtrModel(Protocol):
    def forward_batch(self, b: CtrBatch) -> torch.Tensor: ...

    def parameters(self) -> object: ...


def optimizers(model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """SparseAdam for the embedding tables (only the rows a batch touches are updated, so a step
    costs the batch, not the table) and Adam for the dense layers."""
    sparse = [p for m in model.modules() if isinstance(m, nn.Embedding) and m.sparse for p in m.parameters()]
    ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in ids]
    out: list[torch.optim.Optimizer] = [torch.optim.SparseAdam(sparse, lr=lr)]
    if dense:
        out.append(torch.optim.Adam(dense, lr=lr))
    return out


def train_step(
    model: nn.Module, opts: Sequence[torch.optim.Optimizer], batch: CtrBatch, lr_scale: float = 1.0
) -> float:
    """One step on ``batch`` (``batch_loss``); returns the batch's loss before the step.

    ``lr_scale`` multiplies every optimiser's base learning rate for this step (the trainer
    raises it for a while after drift).
    """
    model.train()
    for o in opts:
        for g in o.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * lr_scale
        o.zero_grad(set_to_none=True)
    loss = batch_loss(model.forward_batch(batch), batch)  # type: ignore[operator]
    loss.backward()  # type: ignore[no-untyped-call]
    for o in opts:
        o.step()
    return float(loss.detach())


def batch_loss(logits: torch.Tensor, batch: CtrBatch) -> torch.Tensor:
    """Binary cross-entropy of the ungrouped rows and ``list_loss`` of the served lists, as one
    mean in which every row weighs the same (a list of n rows counts n times its loss): a lone
    list in a batch of single samples must not outweigh them all."""
    label = torch.from_numpy(batch.label).to(logits.device)
    if batch.group is None:
        return nn.functional.binary_cross_entropy_with_logits(logits, label)
    group = torch.from_numpy(batch.group).to(logits.device)
    point = group < 0
    total = list_loss(logits[~point], label[~point], group[~point], reduce="sum_rows")
    if bool(point.any()):
        total = total + nn.functional.binary_cross_entropy_with_logits(logits[point], label[point], reduction="sum")
    return total / len(label)


def list_loss(
    logits: torch.Tensor, label: torch.Tensor, group: torch.Tensor, reduce: Literal["mean", "sum_rows"] = "mean"
) -> torch.Tensor:
    """Softmax cross-entropy of each list's chosen row, ``logsumexp(list) - logit(chosen)``:
    its mean over the lists with ``reduce="mean"``, or its sum weighted by each list's number
    of rows with ``"sum_rows"``. ``group`` (B,) holds list ids >= 0; a list without a positive
    (cut off by a micro-batch boundary) adds nothing. Ordering the candidates of one list is
    what a re-ranker does, and this trains exactly that: in prequential tests on MovieLens,
    per-row cross-entropy on the same lists ranked worse than no re-ranker at all."""
    pos = label > 0
    if group.numel() == 0 or not bool(pos.any()):
        return logits.sum() * 0.0
    g = int(group.max()) + 1
    mx = logits.new_full((g,), float("-inf")).scatter_reduce(0, group, logits.detach(), "amax")
    lse = torch.log(logits.new_zeros(g).index_add(0, group, torch.exp(logits - mx[group]))) + mx
    ce = lse[group[pos]] - logits[pos]
    if reduce == "mean":
        return ce.mean()
    rows = torch.bincount(group, minlength=g)[group[pos]].to(ce.dtype)
    return (ce * rows).sum()


def list_losses(batch: CtrBatch, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per served list with a positive: (softmax cross-entropy, rank of the positive, 0 = first)
    under ``logits`` (B,). Empty arrays without lists."""
    if batch.group is None:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    rows = np.flatnonzero(batch.group >= 0)
    if rows.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    g, y, z = batch.group[rows], batch.label[rows] > 0, logits[rows]
    n = int(g.max()) + 1
    mx = np.full(n, -np.inf)
    np.maximum.at(mx, g, z)
    lse = np.log(np.bincount(g, weights=np.exp(z - mx[g]), minlength=n)) + mx
    pos = np.flatnonzero(y)
    best = np.full(n, -np.inf)
    best[g[pos]] = z[pos]
    ranks = np.bincount(g, weights=(z > best[g]).astype(np.float64), minlength=n)[g[pos]].astype(np.int64)
    return lse[g[pos]] - z[pos], ranks


def log_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy of probabilities ``p`` (clipped away from 0 and 1)."""
    q = np.clip(p, 1e-7, 1 - 1e-7)
    out: np.ndarray = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    return out


def logits(model: nn.Module, batch: CtrBatch) -> np.ndarray:
    """The model's logits per row, (B,) float64; no gradients."""
    model.eval()
    with torch.inference_mode():
        out: np.ndarray = model.forward_batch(batch).double().cpu().numpy()  # type: ignore[operator]
    return out


def predict(model: nn.Module, batch: CtrBatch) -> np.ndarray:
    """P(interaction) per row, (B,) float64; no gradients, no training-mode side effects."""
    return sigmoid(logits(model, batch))


def sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = expit(z)  # no overflow warning for large |z|
    return out
