"""Training and scoring, outside the models: plain functions over a model and a batch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch
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
    """One binary cross-entropy step on ``batch``; returns the batch's mean loss before the step.

    ``lr_scale`` multiplies every optimiser's base learning rate for this step (the trainer
    raises it for a while after drift).
    """
    model.train()
    for o in opts:
        for g in o.param_groups:
            g["lr"] = g.setdefault("base_lr", g["lr"]) * lr_scale
        o.zero_grad(set_to_none=True)
    logits = model.forward_batch(batch)  # type: ignore[operator]
    loss = nn.functional.binary_cross_entropy_with_logits(logits, torch.from_numpy(batch.label))
    loss.backward()  # type: ignore[no-untyped-call]
    for o in opts:
        o.step()
    return float(loss.detach())


def log_losses(y: np.ndarray, p: np.ndarray) -> np.ndarray:
    """Per-sample binary cross-entropy of probabilities ``p`` (clipped away from 0 and 1)."""
    q = np.clip(p, 1e-7, 1 - 1e-7)
    out: np.ndarray = -(y * np.log(q) + (1 - y) * np.log(1 - q))
    return out


def predict(model: nn.Module, batch: CtrBatch) -> np.ndarray:
    """P(interaction) per row, (B,) float64; no gradients, no training-mode side effects."""
    model.eval()
    with torch.inference_mode():
        p = torch.sigmoid(model.forward_batch(batch))  # type: ignore[operator]
    return p.double().numpy()
