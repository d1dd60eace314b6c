"""Prequential (test-then-train) evaluation of online rankers over an event log.

For each event in event-time order (ties keep log order): every model is first asked for the
user's top-K, excluding items the user already interacted with; the event is a hit when its item
is in that list, with NDCG ``1 / log2(rank + 2)``. Events whose item the user already had are
not evaluated (nothing new to predict) but are still learned from. Then every model learns the
event. All event types are targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from models.baselines import OnlineRanker, ndcg_at
from models.events import Event


@dataclass
class Score:
    """Running totals of one model."""

    hits: int = 0
    ndcg: float = 0.0
    evaluated: int = 0
    served: set[str] = field(default_factory=set)
    # per evaluated event: (position in the log, event time, gain); gain is the NDCG, 0 for a miss
    curve: list[tuple[int, int, float]] = field(default_factory=list)

    def as_dict(self, k: int, catalogue: int) -> dict[str, float | int]:
        n = max(self.evaluated, 1)
        return {
            f"hr@{k}": self.hits / n,
            f"ndcg@{k}": self.ndcg / n,
            "evaluated": self.evaluated,
            "coverage": len(self.served) / max(catalogue, 1),
        }

    def slice(self, k: int, start: int, stop: int) -> dict[str, float | int]:
        """HR and NDCG over the events at log positions ``start <= n < stop``."""
        gains = [g for n, _, g in self.curve if start <= n < stop]
        m = max(len(gains), 1)
        return {f"hr@{k}": sum(g > 0 for g in gains) / m, f"ndcg@{k}": sum(gains) / m, "evaluated": len(gains)}


@dataclass
class Result:
    events: int
    k: int
    catalogue: int
    scores: dict[str, Score]

    def as_dict(self, split: float | None = None) -> dict[str, object]:
        """The summary; with ``split``, also each model's scores on the first ``split`` of the
        log (where settings may be tuned) and on the rest (untouched)."""
        out: dict[str, object] = {
            "events": self.events,
            "k": self.k,
            "models": {name: s.as_dict(self.k, self.catalogue) for name, s in self.scores.items()},
        }
        if split is not None:
            cut = int(self.events * split)
            out["split"] = {
                "at_event": cut,
                "models": {
                    name: {"first": s.slice(self.k, 0, cut), "rest": s.slice(self.k, cut, self.events)}
                    for name, s in self.scores.items()
                },
            }
        return out


def prequential(
    events: Iterable[Event],
    models: Sequence[OnlineRanker],
    k: int = 10,
    progress: Callable[[int], None] | None = None,
) -> Result:
    """Run every model over ``events`` (already in event-time order), test then train."""
    seen: dict[str, set[str]] = {}
    items: set[str] = set()
    scores = {m.name: Score() for m in models}
    n = 0
    for n, ev in enumerate(events, 1):
        had = seen.setdefault(ev.user_id, set())
        items.add(ev.item_id)
        if ev.item_id not in had:
            for m in models:
                top = m.recommend(ev.user_id, k, had)
                sc = scores[m.name]
                sc.evaluated += 1
                sc.served.update(top)
                gain = 0.0
                if ev.item_id in top:
                    gain = ndcg_at(top.index(ev.item_id))
                    sc.hits += 1
                    sc.ndcg += gain
                sc.curve.append((n - 1, ev.ts, gain))
        for m in models:
            m.learn(ev)
        had.add(ev.item_id)
        if progress is not None and n % 1000 == 0:
            progress(n)
    return Result(n, k, len(items), scores)
