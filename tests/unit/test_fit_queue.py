"""The item stage's long-term fits: a process of their own at a lower priority, and a queue
that keeps only the newest inputs waiting, so fits that take longer than the stream takes to
make them due never pile up."""

from __future__ import annotations

import os
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


def test_a_waiting_fit_is_superseded_and_fits_run_at_a_lower_priority() -> None:
    stage = ItemStage(Settings(), redis.Redis())
    inp = slow_input()
    state = SimpleNamespace(item_ids=[f"i{k}" for k in range(len(inp.pool))])
    try:
        # the pool takes at most two into its call queue (they count as running): of the rest,
        # each newer submission supersedes the one still waiting
        for version in range(1, 7):
            stage._submit_fit(state, version, 0, inp)  # type: ignore[arg-type]
        kept = [f.version for f in stage._pending_fits]
        assert kept[-1] == 6 and kept == sorted(kept) and len(kept) <= 3
        assert all(f.future.running() for f in stage._pending_fits[:-1])
        assert stage._fits is not None
        assert stage._fits.submit(os.nice, 0).result(timeout=120) == os.nice(0) + 10
        for f in stage._pending_fits:
            f.future.result(timeout=120)
        done = stage._finished_fits()
        assert [v for v, _ in done] == kept and stage._pending_fits == []
        assert stage.stats.fits == 6
    finally:
        stage.close()
