"""Long-term taste: an item-to-item regression (EASE, Steck 2019), refitted as the stream flows.

Co-occurrence over a user's recent items captures the current session; it forgets what the user
liked fifty items ago, and raw co-occurrence favours what is popular anyway. EASE learns the
weights ``B`` (items x items) that best rebuild every user's profile from the rest of it:

    min_B ||X - X B||^2 + lam ||B||^2  with diag(B) = 0
    => P = (X^T X + lam I)^-1,  B = -P / diag(P) (column-wise), diag(B) = 0

so an item is scored by how much the user's items *jointly* predict it, with what other items
already explain discounted. A user's scores are ``x_u B``, ``x_u`` their recent items weighted by
recency. The closed form needs no training loop and has one knob (``lam``).

Bounded for the stream: ``B`` covers only a pool of the ``long_items`` most popular items, ``X``
holds the last ``PROFILE_LEN`` items of the ``long_users`` most recently active users, and a fit
(O(M^3) for M pool items) runs on the inputs taken at one point of the stream.

The model is global: ``LongTermOwner`` keeps every user's profile from the records the user
partitions send to item partition 0, and whoever owns that partition decides when to fit, runs
the fit in a process of its own (LAPACK here holds the GIL) and publishes each fitted model as a
numbered version (``encode_model``) that every worker loads.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import orjson
import scipy.linalg as sla

from models.params import ModelParams

PROFILE_LEN = 500  # a user's newest items that enter X
_CHUNK_USERS = 512  # X^T X is summed over dense chunks of this many users (BLAS, no GIL)
_FIRST_FIT = 1000  # events before the first fit (or long_refit_events, if fewer)
_MODEL_MAGIC = b"SRL1"


@dataclass(frozen=True)
class FitInput:
    """What a fit needs, copied out of the state at one point: ``pool`` (M,) item indices, X as
    (row, pool position) pairs of ones, the catalogue size then, and the penalty."""

    pool: np.ndarray
    rows: np.ndarray
    cols: np.ndarray
    n_rows: int
    n_items: int
    lam: float


@dataclass(frozen=True)
class ItemRegression:
    """A fitted model: ``pool`` (M,) item indices, ``pos`` (n_items,) pool position or -1, and
    ``weights`` (M, M) float32, row i = how much item i predicts each pool item (a user's scores
    are computed by ``models.kernels.long_term_top``)."""

    pool: np.ndarray
    pos: np.ndarray
    weights: np.ndarray


def fit(inp: FitInput) -> ItemRegression:
    """The closed-form EASE solution for ``inp`` (see the module docstring)."""
    m = len(inp.pool)
    gram = np.zeros((m, m), dtype=np.float32)
    order = np.argsort(inp.rows, kind="stable")
    rows, cols = inp.rows[order], inp.cols[order]
    bounds = np.searchsorted(rows, np.arange(0, inp.n_rows + _CHUNK_USERS, _CHUNK_USERS))
    x = np.zeros((_CHUNK_USERS, m), dtype=np.float32)
    part = np.empty_like(gram)
    for a, b, r0 in zip(bounds[:-1], bounds[1:], range(0, inp.n_rows, _CHUNK_USERS), strict=False):
        if a == b:
            continue
        x[:] = 0.0
        x[rows[a:b] - r0, cols[a:b]] = 1.0
        np.matmul(x.T, x, out=part)
        gram += part
    del x, part
    gram[np.diag_indices(m)] += np.float32(inp.lam)
    # P = gram^-1 from its Cholesky factor: a fifth of the time of numpy's LU-based inverse
    chol, info = sla.lapack.spotrf(gram, lower=1, overwrite_a=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"X^T X + lam I is not positive definite (potrf info {info})")
    weights, info = sla.lapack.spotri(chol, lower=1, overwrite_c=1)
    if info != 0:
        raise np.linalg.LinAlgError(f"cannot invert the Cholesky factor (potri info {info})")
    del gram, chol
    weights = np.tril(weights) + np.tril(weights, -1).T  # potri fills the lower triangle only
    weights /= -np.diag(weights)  # column j divided by -P_jj
    weights[np.diag_indices(m)] = 0.0
    pos = np.full(inp.n_items, -1, dtype=np.int64)
    pos[inp.pool] = np.arange(m)
    return ItemRegression(inp.pool, pos, weights)


def recency_weights(lens: Sequence[int], half_life: float) -> np.ndarray:
    """Weights of histories laid end to end, each oldest first: a history's newest item weighs 1,
    and the weight halves every ``half_life`` items back."""
    total = int(sum(lens))
    ends = np.repeat(np.cumsum(lens), lens)
    age = ends - 1 - np.arange(total)
    return np.asarray(0.5 ** (age / half_life), dtype=np.float64)


class LongTermOwner:
    """The long-term model's global inputs and fit schedule, kept with item partition 0.

    ``profiles``: per user, the items new to the user (``ev_new`` of the delta messages) in the
    order seen, newest ``PROFILE_LEN`` kept, for the ``long_users`` most recently active users
    (a user who drops out of them and comes back starts a new profile). Items are numbered by
    the item partition that holds this owner. Fits come due after each quarter's growth of the
    stream, at most every ``long_refit_events`` events.
    """

    def __init__(self, params: ModelParams) -> None:
        self.params = params
        self.profiles: OrderedDict[str, array[int]] = OrderedDict()
        self.events = 0
        self.next_fit = min(params.long_refit_events, _FIRST_FIT)
        self.version = 0  # of the last fit whose inputs were taken

    def feed(self, users: Sequence[str], items: np.ndarray, new: np.ndarray) -> None:
        """One record per event, in order: the user, the event's item, whether it is new to them."""
        profiles, cap = self.profiles, self.params.long_users
        for u, i, nw in zip(users, items.tolist(), new.tolist(), strict=True):
            prof = profiles.get(u)
            if prof is None:
                prof = profiles[u] = array("q")
                if len(profiles) > cap:
                    profiles.popitem(last=False)
            else:
                profiles.move_to_end(u)
            if nw:
                prof.append(i)
                if len(prof) > PROFILE_LEN:
                    del prof[0]
        self.events += len(users)

    def forget(self, user_id: str) -> None:
        """Drop the user's profile (``streamrec forget``). Fits already taken keep their row of
        X, which carries no id; the next fit's inputs no longer have it."""
        self.profiles.pop(user_id, None)

    def due(self, pop: np.ndarray) -> tuple[int, int, FitInput] | None:
        """When a fit is due: (its version, the event count at which the simulation installs it,
        its inputs) over the ``long_items`` most popular of the items ``pop`` covers; else None."""
        if self.events < self.next_fit:
            return None
        every = max(min(self.params.long_refit_events, self.events // 4), 1)
        self.next_fit = self.events + every
        self.version += 1
        return self.version, self.events + max(every // 2, 1), self.fit_input(pop)

    def refit_soon(self) -> None:
        """After a restore: a fit whose inputs were taken may never have been published."""
        self.next_fit = min(self.next_fit, self.events)

    def fit_input(self, pop: np.ndarray) -> FitInput:
        p = self.params
        n = len(pop)
        pool = np.argsort(-pop, kind="stable")[: p.long_items]
        pos = np.full(n, -1, dtype=np.int64)
        pos[pool] = np.arange(len(pool))
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        for r, prof in enumerate(reversed(self.profiles.values())):
            q = np.frombuffer(prof, dtype=np.int64) if len(prof) else _EMPTY
            q = pos[q[q < n]]
            q = q[q >= 0]
            cols.append(q)
            rows.append(np.full(len(q), r, dtype=np.int64))
        return FitInput(
            pool,
            np.concatenate(rows) if rows else _EMPTY,
            np.concatenate(cols) if cols else _EMPTY,
            len(rows),
            n,
            p.long_lambda,
        )


def encode_model(version: int, ids: Sequence[str], weights: np.ndarray) -> bytes:
    """A fitted model for workers: its version, the pool's item ids and the (M, M) weights."""
    header = orjson.dumps({"version": version, "ids": list(ids)})
    w = np.ascontiguousarray(weights, dtype="<f4")
    return _MODEL_MAGIC + len(header).to_bytes(4, "little") + header + w.tobytes()


def decode_model(blob: bytes) -> tuple[int, list[str], np.ndarray]:
    """(version, pool item ids, weights) of an ``encode_model`` blob; ValueError if not one."""
    if blob[:4] != _MODEL_MAGIC:
        raise ValueError("not a streamrec long-term model (bad magic)")
    n = int.from_bytes(blob[4:8], "little")
    h = orjson.loads(blob[8 : 8 + n])
    ids = list(h["ids"])
    m = len(ids)
    if len(blob) != 8 + n + 4 * m * m:
        raise ValueError("truncated long-term model")
    w = np.frombuffer(blob, dtype="<f4", offset=8 + n).reshape(m, m)
    return int(h["version"]), ids, w


_EMPTY = np.zeros(0, dtype=np.int64)
