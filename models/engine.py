"""One micro-batch through the models: update the state, then rank what changed."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from models.events import Event
from models.ranking import RecList, recommend, sim_list, trending
from models.state import BatchEffect, PartitionState


@dataclass
class StepOutput:
    """Everything a batch asks the outside world to publish."""

    lists: list[RecList]
    sims: list[tuple[str, list[tuple[str, float]]]]
    trending: list[tuple[str, float]]
    effect: BatchEffect


def step(
    state: PartitionState, events: Iterable[Event], publish_sims: bool = True, blocked: Collection[str] = ()
) -> StepOutput:
    """Fold ``events`` into ``state`` and build the lists of every user they touched.

    The result depends only on the state and the events, so the same batches in the same order
    give the same outputs (what makes replay and exactly-once restarts testable). ``blocked``
    item ids (unavailable in the catalogue) are left out of the lists.
    """
    eff = state.apply(events)
    lists = recommend(state, eff.users, blocked)
    sims = [(state.item_ids[i], sim_list(state, i)) for i in sorted(eff.items)] if publish_sims else []
    trend = [(state.item_ids[i], s) for i, s in trending(state, state.params.trending_len)] if eff.applied else []
    return StepOutput(lists, sims, trend, eff)
