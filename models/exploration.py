"""Epsilon-greedy exploration with recorded propensities.

Each slot of a list is, with probability ``epsilon``, filled by an item drawn uniformly from an
exploration pool instead of the next best item. The probability of that placement is returned with
every slot (``p``), so readers can log propensities for off-policy evaluation. The random stream is
seeded from ``(seed, user, version)``: a replay of the same log places the same items.

Workers run the compiled ``models.kernels.explore_users``, all of a block's users at once; this
module is its readable specification, which the tests hold it to slot for slot.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from models.hashing import stable_hash

_MASK = (1 << 64) - 1


class SplitMix64:
    """A small seeded generator (Steele et al., 2014). ``random.Random(seed)`` costs tens of
    microseconds to seed, once per list: more than all the draws a list needs."""

    __slots__ = ("state",)

    def __init__(self, seed: int) -> None:
        self.state = seed & _MASK

    def random(self) -> float:
        """Uniform in [0, 1)."""
        self.state = z = (self.state + 0x9E3779B97F4A7C15) & _MASK
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK
        return ((z ^ (z >> 31)) >> 11) / 9007199254740992.0  # the top 53 bits

    def randrange(self, n: int) -> int:
        return int(self.random() * n)


class Slot(NamedTuple):
    item: int
    explore: bool
    p: float


def epsilon_greedy(
    ranked: Sequence[int], pool: Sequence[int], n: int, epsilon: float, seed: int, user_id: str, version: int
) -> list[Slot]:
    """Fill ``n`` slots from ``ranked`` (best first), exploring ``pool`` with probability epsilon.

    No item appears twice: an item explored into an early slot is skipped when ``ranked``
    reaches it. When ``ranked`` runs out, the pool fills the rest as ordinary slots.

    >>> [s.item for s in epsilon_greedy([1, 2, 3], [7, 8], 3, 0.0, 0, "u", 1)]
    [1, 2, 3]
    """
    rng = SplitMix64(stable_hash(seed, user_id, version))
    top = set(ranked[:n])
    remaining = [j for j in pool if j not in top]
    explore = _bernoulli_slots(rng, n, epsilon) if remaining else [False] * n
    q = 1.0 - epsilon if remaining else 1.0
    out: list[Slot] = []
    used: set[int] = set()
    e = 0
    for flag in explore:
        if flag and remaining:
            k = rng.randrange(len(remaining))
            p = epsilon / len(remaining)
            item = remaining.pop(k)
            if item not in used:
                out.append(Slot(item, True, p))
                used.add(item)
                continue
        while e < len(ranked) and ranked[e] in used:
            e += 1
        if e < len(ranked):
            out.append(Slot(ranked[e], False, q))
            used.add(ranked[e])
            e += 1
        elif remaining:  # nothing ranked is left: fill from the pool, with certainty
            item = remaining.pop(0)
            if item not in used:
                out.append(Slot(item, False, 1.0))
                used.add(item)
    return out


def _bernoulli_slots(rng: SplitMix64, n: int, epsilon: float) -> list[bool]:
    """n independent coin flips of probability epsilon, drawn as geometric gaps between the
    heads: about ``1 + n * epsilon`` draws instead of n."""
    out = [False] * n
    if epsilon <= 0.0:
        return out
    if epsilon >= 1.0:
        return [True] * n
    lq = math.log1p(-epsilon)
    k = int(math.log1p(-rng.random()) / lq)  # tails before the next head
    while k < n:
        out[k] = True
        k += 1 + int(math.log1p(-rng.random()) / lq)
    return out
