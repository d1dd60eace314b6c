"""Epsilon-greedy exploration with recorded propensities.

Each slot of a list is, with probability ``epsilon``, filled by an item drawn uniformly from an
exploration pool instead of the next best item. The probability of that placement is returned with
every slot (``p``), so readers can log propensities for off-policy evaluation. The random stream is
seeded from ``(seed, user, version)``: a replay of the same log places the same items.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from models.state import stable_hash


@dataclass(frozen=True, slots=True)
class Slot:
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
    rng = random.Random(stable_hash(seed, user_id, version))
    exploit = list(ranked)
    remaining = [j for j in pool if j not in set(exploit[:n])]
    out: list[Slot] = []
    used: set[int] = set()
    e = 0
    while len(out) < n:
        if remaining and epsilon > 0 and rng.random() < epsilon:
            k = rng.randrange(len(remaining))
            item = remaining.pop(k)
            p = epsilon / (len(remaining) + 1)
            if item in used:
                continue
            out.append(Slot(item, True, p))
            used.add(item)
            continue
        while e < len(exploit) and exploit[e] in used:
            e += 1
        if e < len(exploit):
            out.append(Slot(exploit[e], False, 1.0 - epsilon if remaining else 1.0))
            used.add(exploit[e])
            e += 1
        elif remaining:
            item = remaining.pop(0)
            if item not in used:  # nothing ranked is left: fill from the pool, with certainty
                out.append(Slot(item, False, 1.0))
                used.add(item)
        else:
            break
    return out
