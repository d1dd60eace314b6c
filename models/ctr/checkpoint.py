"""The CTR model's checkpoint format: what the trainer writes and workers load."""

from __future__ import annotations

import io
from typing import Any

import torch

from models.ctr.din import DIN, CtrConfig


def to_bytes(model: DIN, version: int, extra: dict[str, Any]) -> bytes:
    buf = io.BytesIO()
    state = {k: v.cpu() for k, v in model.state_dict().items()}  # trained on a GPU or not: loads anywhere
    torch.save({"version": version, "config": model.cfg.__dict__, "state": state, **extra}, buf)
    return buf.getvalue()


def from_bytes(blob: bytes) -> tuple[int, DIN]:
    """A published checkpoint: (version, model). Only tensors and plain values are unpickled."""
    d = torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)
    cfg = d["config"]
    model = DIN(CtrConfig(**{**cfg, "hidden": tuple(cfg["hidden"])}))
    model.load_state_dict(d["state"])
    model.eval()
    return int(d["version"]), model
