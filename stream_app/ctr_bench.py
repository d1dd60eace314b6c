"""``streamrec bench --ctr``: the CTR model's accuracy and speed, measured on a real log.

1. Samples: the log goes through the worker's engine in blocks of ``BLOCK`` events (a worker's
   blocks at live rates; a backfill's are ``batch_size``), with ``SampleBuilder`` beside it
   exactly as a worker runs it, list samples included.
2. Progressive validation in one pass, as the trainer runs it: each micro-batch is scored by
   the DIN model and by logistic regression on the same features, then both train on it.
   Reported: exact AUC and log-loss over every progressive prediction on the single samples,
   both models; on the list samples, how often the item taken is ranked first.
3. Trainer throughput: samples/s of ``Trainer.step`` (hold-back, scoring, both train steps,
   drift watch, gates), sample building excluded.
4. Worker inference: candidate scores/s of ``CtrRescorer.score`` for chunks of users with
   ``rerank_pool`` candidates each (at least ``n_recs + explore_pool``), as the worker calls it.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.ctr.features import Sample
from models.ctr.rescorer import CtrRescorer
from models.ctr.samples import SampleBuilder
from models.ctr.train import log_losses
from models.events import Event
from models.ranking import RANK_FEATURES, Candidates
from models.simulation import TwoStage
from stream_app.config import Settings
from stream_app.trainer import Trainer


def exact_auc(y: np.ndarray, p: np.ndarray) -> float:
    """Mann-Whitney AUC with ties counted half."""
    order = np.argsort(p, kind="stable")
    ranks = np.empty(len(p))
    sp = p[order]
    i = 0
    while i < len(sp):  # average ranks over ties
        j = i
        while j + 1 < len(sp) and sp[j + 1] == sp[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos = y > 0.5
    n1, n0 = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n1 * (n1 + 1) / 2) / max(n1 * n0, 1))


# Events per block: at 2,000 events/s a worker's blocks hold about this many (the freshness p50
# is under 100 ms). A user's events within one block all follow the same served list, so only
# the first of them can make a list sample.
BLOCK = 100


def build_samples(s: Settings, events: list[Event], block: int = BLOCK) -> list[Sample]:
    """The samples a worker would publish for ``events``: each block's samples are built before
    the state takes the block, and the lists it then ranks become the users' served lists."""
    b = SampleBuilder(s.sample_params())
    system = TwoStage(s.params())
    out: list[Sample] = []
    for k in range(0, len(events), block):
        block_events = events[k : k + block]
        out += b.feed(block_events)
        system.block(block_events, observer=b)
    return out + b.flush()


def run_ctr_bench(s: Settings, events: list[Event], threads: int) -> dict[str, Any]:
    torch.set_num_threads(threads)
    samples = build_samples(s, events)
    with tempfile.TemporaryDirectory() as tmp:
        t = Trainer(s.model_copy(update={"model_dir": Path(tmp)}), record=True)
        step_s = cpu_s = 0.0
        bs = s.ctr_batch_size
        for k in range(0, len(samples), bs):
            t0, c0 = time.perf_counter(), time.process_time()
            t.step(samples[k : k + bs])  # ends with the batch's loss read back: synchronised on a GPU
            step_s += time.perf_counter() - t0
            cpu_s += time.process_time() - c0
        assert t.recorded is not None
        y, p_din, p_lr = (np.concatenate(x) for x in zip(*t.recorded, strict=True))
        cats = {x.item_id: x.category for x in samples if x.category is not None}
        rescorer = CtrRescorer(copy.deepcopy(t.model).cpu(), t.version, 1.0, cats)  # workers score on the CPU
        inference = _inference(s, rescorer, samples)
    return {
        "samples": len(samples),
        "positives": int(sum(x.label for x in samples if x.group is None)),
        "list_samples": len({x.group for x in samples if x.group is not None}),
        "task": "P(click or purchase | user, item, category, last items); negatives: unclicked views and "
        f"{s.sample_negatives} popularity-sampled items per positive",
        "lists": t.list_progress.as_dict(),
        "ctr": {"auc": exact_auc(y, p_din), "logloss": float(log_losses(y, p_din).mean())},
        "logreg": {"auc": exact_auc(y, p_lr), "logloss": float(log_losses(y, p_lr).mean())},
        "trainer_samples_per_s": t.samples / step_s if step_s else 0.0,
        # the trainer process's CPU time (every thread), what it takes from workers on its machine
        "trainer_cpu_ms_per_1k_samples": 1e6 * cpu_s / max(t.samples, 1),
        "trainer_device": str(t.device),
        "trained": t.samples,
        "versions": t.version,
        "drifts": t.drifts,
        "inference_scores_per_s": inference,
        "torch_threads": threads,
    }


def _inference(s: Settings, rescorer: CtrRescorer, samples: list[Sample], users: int = 64, reps: int = 20) -> float:
    """Median scores/s over ``reps`` calls of ``users`` users x ``rerank_pool`` candidates."""
    k = s.params().look_pool
    pool = list({x.item_id: None for x in samples})
    rng = np.random.default_rng(0)
    pos = [x for x in samples if x.label > 0.5][:users]
    rates = []
    for _ in range(reps):
        cands = [[pool[j] for j in rng.integers(0, len(pool), k)] for _ in pos]
        ctx = [rng.random((k, RANK_FEATURES)).astype(np.float32) for _ in pos]
        chunk = Candidates.of_lists([x.user_id for x in pos], [x.history for x in pos], cands, ctx)
        t0 = time.perf_counter()
        rescorer.score(chunk)
        rates.append(len(pos) * k / (time.perf_counter() - t0))
    return statistics.median(rates)
