"""The item stage's long-term fits: a process of their own at a lower priority, one at a time,
with only the newest inputs waiting, so fits that take longer than the stream takes to make
them due never pile up."""

from __future__ import annotations

import os
import time
from types import SimpleNamespace

import numpy as np
import redis

from models.longterm import FitInput
from stream_app.config import Settings
from stream_app.item_stage import ItemStage


def slow_input(users: int = 4000, items: int = 1500, per: int = 60, seed: int = 1) -> FitInput:
    """Inputs whose fit takes a good part of a second on one core."""
    rng = np.random.default_rng(seed)
    rows = np.repeat(np.arange(users), per)
    cols = np.concatenate([rng.choice(items, per, replace=False) for _ in range(users)])
    return FitInput(np.arange(items), rows, cols, users, items, 200.0)


def test_one_fit_runs_a_newer_one_waits_and_fits_run_at_a_lower_priority() -> None:
    stage = ItemStage(Settings(), redis.Redis())
    inp = slow_input()
    state = SimpleNamespace(item_ids=[f"i{k}" for k in range(len(inp.pool))])
    try:
        # the first starts; each later one replaces the one waiting behind it
        for version in range(1, 7):
            stage._submit_fit(state, version, 0, inp)  # type: ignore[arg-type]
        assert [f.version for f in stage._pending_fits] == [1]
        assert stage._waiting_fit is not None and stage._waiting_fit[0] == 6
        assert stage._fits is not None
        assert stage._fits.submit(os.nice, 0).result(timeout=120) == os.nice(0) + 10
        published: list[int] = []
        deadline = time.monotonic() + 120
        while (stage._pending_fits or stage._waiting_fit) and time.monotonic() < deadline:
            for f in stage._pending_fits:
                f.future.result(timeout=120)
            published += [v for v, _ in stage._finished_fits()]  # starts the waiting one
        assert published == [1, 6] and stage.stats.fits == 2
    finally:
        stage.close()


def test_a_stop_drops_the_waiting_fit_and_shuts_the_pool_down() -> None:
    """Stopping while a fit runs and another waits: the running one is waited for and the pool
    shuts down (a worker's exit must not hang on it)."""
    stage = ItemStage(Settings(), redis.Redis())
    inp = slow_input()
    state = SimpleNamespace(item_ids=[f"i{k}" for k in range(len(inp.pool))])
    for version in (1, 2, 3):
        stage._submit_fit(state, version, 0, inp)  # type: ignore[arg-type]
    stage.handover_output([], stopping=True)  # waits for the running fit and collects it
    assert stage._waiting_fit is None and stage._pending_fits == [] and stage.stats.fits == 1
    stage.close()
