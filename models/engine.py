"""One micro-batch through the models: update the state, then rank what changed."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass

from models.events import Event
from models.ranking import Observer, RecList, Rescorer, recommend
from models.state import BatchEffect, PartitionState


@dataclass
class StepOutput:
    """The lists a batch asks the outside world to publish, and what it changed (the pipeline
    publishes ``sim:`` lists of changed items and ``trending`` on its own schedule)."""

    lists: list[RecList]
    effect: BatchEffect


def step(
    state: PartitionState,
    events: Iterable[Event],
    blocked: Collection[str] = (),
    rescorer: Rescorer | None = None,
    epsilon: float | None = None,
    observer: Observer | None = None,
) -> StepOutput:
    """Fold ``events`` into ``state`` and build the lists of every user they touched.

    The result depends only on the state and the events, so the same batches in the same order
    give the same outputs (what makes replay and exactly-once restarts testable). ``blocked``
    item ids (unavailable in the catalogue) are left out of the lists. ``rescorer`` and
    ``epsilon``: see ``recommend`` (with them the lists also depend on the model version);
    ``observer`` sees the candidates (the worker's sample builder).
    """
    eff = state.apply(events)
    return StepOutput(recommend(state, eff.users, blocked, rescorer, epsilon, observer), eff)
