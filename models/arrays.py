"""Small array helpers shared by the model modules."""

from __future__ import annotations

import numpy as np


def grown(a: np.ndarray, cap: int) -> np.ndarray:
    """``a`` copied into a zeroed array of ``cap`` rows (the other dimensions kept)."""
    out = np.zeros((cap,) + a.shape[1:], dtype=a.dtype)
    out[: len(a)] = a
    return out
