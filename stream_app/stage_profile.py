"""Where one worker's CPU time goes, phase by phase (``streamrec bench --stages``).

Runs a log through the worker's own code in one thread, in blocks, the way one worker with both
stages takes a backlog: decode, the user state, ranking, serialising the lists, the deltas out
and in, the item state with the table entries due, and the table. Brokers and Redis are left
out (``streamrec bench`` measures the live worker); what remains is the Python and compiled
work per event and per list, which is what the kernels (``models.kernels``) are for. Phases
are timed by the clock, as a block waits for them: ranking's kernels run on ``RANK_THREADS``
threads, as in a worker (``models.threads``).

With ``W_CTR`` above 0, ranking re-ranks with a CTR model of the configured size at its
initial weights: what a trained one costs per list, not what it would rank (``streamrec bench
--pretrained-ctr`` measures a trained one in a live worker).

``user_memory`` (``streamrec bench --user-memory``) measures what the user state holds per user.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import orjson

from models import threads
from models.deltas import cut, decode, encode, split
from models.engine import item_step
from models.events import Event
from models.items import ItemPartition
from models.ranking import Rescorer, recommend
from models.simulation import install_fit
from models.table import ItemTable, TableEntry
from models.users import UserPartition
from stream_app.config import Settings
from stream_app.datasets import read_log
from stream_app.redis_store import rec_doc
from stream_app.stage import tune_gc

_FITS = "long-term fits (a process of their own in a worker; not in events/s)"


def live_events(rows: list[dict[str, Any]], n: int, seed: int = 11) -> list[dict[str, Any]]:
    """``n`` clicks after the log ``rows``, drawn as ``streamrec bench``'s freshness run draws
    them: users by their activity in the log, items by popularity, one millisecond apart."""
    rng = random.Random(seed)
    users = [str(r["user_id"]) for r in rows]
    items = [str(r["item_id"]) for r in rows]
    t0 = max(int(r["ts"]) for r in rows) + 1000
    return [
        {"user_id": rng.choice(users), "item_id": rng.choice(items), "type": "click", "ts": t0 + k, "event_id": f"l{k}"}
        for k in range(n)
    ]


def profile_stages(settings: Settings, path: Path, block: int, n_events: int = 0, live: int = 0) -> dict[str, Any]:
    """Seconds per phase for the first ``n_events`` (0: all) of the JSON-lines log at ``path``
    in event-time order, cut into blocks of ``block`` events; also per event and per list.

    With ``live``, the log is taken in blocks of 2,000 first, untimed, and what is timed is
    ``live`` events after it as live traffic brings them (``live_events``): users spread over the
    log's, so many more lists per event than the log's bursts of one user's events give
    (MovieLens-100K: a list per 3 events in blocks of 2,000, per 1.2 in blocks of 200, against
    one per 45 for the log). Long-term fits that come due are fitted and installed at
    once, so that ranking includes the long-term scores as in a worker; a worker fits in a
    process of its own, so their time is listed but left out of events/s."""
    schema, params = settings.event_schema(), settings.params()
    rows = read_log(path, "jsonl")  # in event time, as the bench and a replay send them
    rows = rows[:n_events] if n_events else rows
    raw = [orjson.dumps(r) for r in rows]
    timed_from = 0
    if live:
        timed_from = len(raw)
        raw += [orjson.dumps(r) for r in live_events(rows, live)]
    tune_gc()  # as a worker's stages run
    threads.set_threads(settings.rank_threads)  # as the user stage ranks
    part, items, table = UserPartition(params), ItemPartition(params), ItemTable(params.dim)
    categories: dict[str, str] = {}
    rescorer = _untrained_rescorer(settings, categories) if settings.w_ctr > 0 else None
    spent: dict[str, float] = defaultdict(float)
    lists = 0

    def timed(phase: str, t0: float) -> float:
        t1 = time.perf_counter()
        spent[phase] += t1 - t0
        return t1

    start = time.perf_counter()
    b0 = 0
    while b0 < len(raw):
        size = block if b0 >= timed_from else min(2000, timed_from - b0)
        if b0 == timed_from:  # the log is in: time only what comes now
            spent.clear()
            lists, start = 0, time.perf_counter()
        t = time.perf_counter()
        events = [schema.decode(x) for x in raw[b0 : b0 + size]]
        if rescorer is not None:  # as the worker learns categories from the events
            for e in events:
                c = e.props.get("category") if isinstance(e, Event) and e.props else None
                if isinstance(c, str):
                    categories[e.item_id] = c
        t = timed("decode and validate", t)
        eff = part.apply(events, list(range(b0, b0 + len(events))))
        t = timed("user state", t)
        out = recommend(part, table, eff.users, rescorer=rescorer)
        t = timed("ranking", t)
        docs = [rec_doc(rl, 0, "m") for rl in out]
        lists += len(docs)
        t = timed("list documents", t)
        assert eff.deltas is not None
        msgs = split(eff.deltas, 0, b0, b0 + len(events), part.routes(1), 1)
        blobs = [encode(piece) for m in msgs for piece in cut(m, settings.delta_max_bytes)]
        received = [decode(x) for x in blobs]
        t = timed("deltas out and in", t)
        step = item_step(items, received)
        t = timed("item state and due entries", t)
        if step.fit is not None:  # installed at once; a worker fits in a process of its own
            version, _, inp = step.fit
            install_fit(table, items, version, inp)
            t = timed(_FITS, t)
        table.apply([TableEntry.decode(e.encode()) for e in step.entries])
        timed("table entries out and in", t)
        b0 += len(events)
    total = time.perf_counter() - start
    n = len(raw) - timed_from
    return {
        "events": n,
        "lists": lists,
        "block": block,
        "seconds": total,
        # without the long-term fits, which a worker runs in a process of its own
        "events_per_s": n / (total - spent.get(_FITS, 0.0)),
        "phases": {
            k: {"seconds": v, "us_per_event": 1e6 * v / n, "us_per_list": 1e6 * v / max(lists, 1)}
            for k, v in sorted(spent.items(), key=lambda kv: -kv[1])
        },
    }


def _untrained_rescorer(settings: Settings, categories: dict[str, str]) -> Rescorer:
    """A CTR re-ranker of the configured size at its initial weights, scoring with one torch
    thread as a worker does."""
    import torch

    from models.ctr.din import DIN
    from models.ctr.rescorer import CtrRescorer
    from stream_app.trainer import ctr_config

    torch.set_num_threads(1)
    torch.manual_seed(0)
    return CtrRescorer(DIN(ctr_config(settings)), 0, settings.w_ctr, categories)


def user_memory(settings: Settings, n_users: int, n_events: int, seed: int = 7) -> dict[str, Any]:
    """Resident memory the user state of one partition adds for ``n_events`` synthetic events of
    ``n_users`` users (uniformly drawn; items Pareto(1.2)-popular over 10,000), in process."""
    import gc
    import random

    import psutil

    from models.events import Event

    part = UserPartition(settings.params())
    rng = random.Random(seed)
    gc.collect()
    rss0 = psutil.Process().memory_info().rss
    ts = 1_700_000_000_000
    block = 20_000
    for b in range(0, n_events, block):
        events = []
        for k in range(min(block, n_events - b)):
            item = int(rng.paretovariate(1.2)) % 10_000
            events.append(Event(f"u{rng.randrange(n_users)}", f"i{item}", "view", ts + b + k, f"e{b + k}"))
        part.apply(events)
    gc.collect()
    grown = psutil.Process().memory_info().rss - rss0
    users = len(part.users)
    return {"users": users, "events": n_events, "rss_bytes": grown, "bytes_per_user": grown / max(users, 1)}
