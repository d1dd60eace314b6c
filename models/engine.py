"""One micro-batch through the models: the one boundary between them and the running system.

``user_step`` is the user stage's: it folds a block of one events partition into the user state,
ranks the lists of every user the block touched, and returns them with the block's item-level
deltas, one message per item partition. ``item_step`` is the item stage's: it folds delta
messages into an item partition and returns what to publish: table entries (neighbour lists for
every worker's ranking), ``sim:`` lists, the trending list and long-term fits that came due.
Both results depend only on the state and the inputs, so the same inputs in the same order give
the same outputs; the lists also depend on the table they were ranked with.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import numpy as np

from models.deltas import DeltaMessage, split
from models.events import Event, Forget
from models.items import ItemEffect, ItemPartition
from models.longterm import FitInput
from models.ranking import Observer, RecList, Rescorer, recommend
from models.table import ItemTable, TableEntry
from models.users import BatchEffect, UserPartition


@dataclass
class UserStepOutput:
    """The lists a block asks the world to publish, and its deltas for the item stage (one
    message per item partition; none when no event of the block was applied)."""

    lists: list[RecList]
    effect: BatchEffect
    messages: list[DeltaMessage] = field(default_factory=list)


def user_step(
    part: UserPartition,
    table: ItemTable,
    events: Sequence[Event | Forget],
    offsets: Sequence[int] | None = None,
    *,
    source: int = 0,
    span: tuple[int, int] | None = None,
    item_partitions: int = 1,
    blocked: Collection[str] = (),
    rescorer: Rescorer | None = None,
    epsilon: float | None = None,
    observer: Observer | None = None,
) -> UserStepOutput:
    """Fold ``events`` (at source ``offsets``) into ``part`` and build the lists of every user
    they touched, ranked against ``table``. A ``Forget`` among them drops its user in order
    (``UserPartition.apply``): a user forgotten in the block gets no list unless events of theirs
    follow the forget; ``effect.forgotten`` names them, for the caller to delete their outputs.

    ``span`` is the block's offset range ``[start, end)`` in source partition ``source`` (by
    default the events' positions). ``blocked`` item ids are left out of the lists;
    ``rescorer``, ``epsilon`` and ``observer``: see ``recommend``.
    """
    eff = part.apply(events, offsets)
    lists = recommend(part, table, eff.users, blocked, rescorer, epsilon, observer)
    d = eff.deltas
    if d is None or not (len(d) or len(d.fg_offset)):
        return UserStepOutput(lists, eff)
    if span is not None:
        start, end = span
    else:
        offs = np.concatenate([d.ev_offset, d.fg_offset])
        start, end = int(offs.min()), int(offs.max()) + 1
    msgs = split(d, source, start, end, part.routes(item_partitions), item_partitions)
    return UserStepOutput(lists, eff, msgs)


@dataclass
class ItemStepOutput:
    """What the item stage publishes after some messages."""

    effect: ItemEffect
    entries: list[TableEntry]  # for the table topic: items whose row or popularity moved enough
    sims: list[tuple[str, list[tuple[str, float]]]]  # fresh ``sim:`` lists
    trending: list[tuple[str, float]] | None  # partition 0's, when popularity moved
    fit: tuple[int, int, FitInput] | None  # (version, install point, inputs): a long-term fit due


def item_step(
    part: ItemPartition,
    messages: Sequence[DeltaMessage],
    sim_budget: int = 0,
    sim_len: int = 0,
    trending: bool = True,
    publish: bool = True,
) -> ItemStepOutput:
    """Fold ``messages`` into ``part``; ``sim_budget``: how many ``sim:`` lists (of ``sim_len``
    items) to return now (0: none; the running system publishes them on a schedule);
    ``trending``: whether to return partition 0's trending list when popularity moved;
    ``publish``: whether to return the table entries now due (the running system checks on a
    schedule; items changed meanwhile wait for the next check)."""
    eff = part.apply(messages)
    entries = part.due_entries() if publish else []
    sims = part.sim_lists(sim_budget, sim_len) if sim_budget > 0 else []
    moved = eff.applied > 0
    want = trending and part.partition == 0 and moved
    trend = part.trending(part.params.trending_len) if want else None
    fit = part.long.due(part.pop[: part.n_items]) if part.long is not None and moved else None
    return ItemStepOutput(eff, entries, sims, trend, fit)
