"""``streamrec evaluate``: prequential HR@K / NDCG@K of streamrec and baselines over a log."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

from models.baselines import BASELINES, make
from models.evaluation import prequential
from models.events import Event
from stream_app.config import Settings
from stream_app.datasets import load_log


def load_events(path: Path, fmt: str, settings: Settings, strict: bool = False) -> tuple[list[Event], int]:
    """Valid events in event-time order (stable), and how many rows were invalid and skipped
    (``strict``: none may be; see ``load_log``)."""
    log = load_log(path, fmt, settings.event_schema(), strict)
    return log.events, log.n_skipped


def run_evaluation(
    settings: Settings,
    path: Path,
    fmt: str,
    k: int,
    baselines: list[str],
    seed: int,
    progress: Any = None,
    split: float | None = 0.5,
    report_dir: Path | None = None,
    ctr_weight: float | None = None,
    partitions: int = 1,
    table_lag: int = 0,
    strict: bool = False,
) -> dict[str, Any]:
    """Prequential HR@K/NDCG@K of streamrec (its two-stage topology in-process, with
    ``partitions`` user partitions and the table ``table_lag`` events behind) and ``baselines``."""
    unknown = [b for b in baselines if b not in BASELINES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {', '.join(unknown)}; choose from {', '.join(BASELINES)}")
    events, bad = load_events(path, fmt, settings, strict)
    # the ranking is evaluated without exploration, with lists of exactly k items
    params = dataclasses.replace(settings.params(), n_recs=k, epsilon=0.0, seed=seed)
    models = [make("streamrec", params, seed, partitions, table_lag)] + [make(b, params, seed) for b in baselines]
    if ctr_weight is not None:
        models.insert(1, _with_ctr(settings, params, ctr_weight))
    t0 = time.perf_counter()
    result = prequential(events, models, k=k, progress=progress)
    out = result.as_dict(split)
    out["invalid_rows_skipped"] = bad
    out["seconds"] = time.perf_counter() - t0
    out["partitions"], out["table_lag"] = partitions, table_lag
    if report_dir is not None:
        from stream_app.report import write_report

        out["report"] = str(write_report(result, out, report_dir))
    return out


def _with_ctr(s: Settings, params: Any, weight: float) -> Any:
    """streamrec with the CTR model trained online and blended in (torch loaded only here)."""
    from models.ctr.online import StreamrecCtr
    from stream_app.trainer import ctr_config

    samples = dataclasses.replace(s.sample_params(), seed=params.seed)
    return StreamrecCtr(params, weight, ctr_config(s), samples, s.ctr_batch_size)
