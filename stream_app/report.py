"""``streamrec evaluate --report DIR``: a self-contained Markdown report with one plot.

The plot shows HR@K over event time for every model, as a rolling mean over a window of
evaluated events (so that drift and warm-up are visible); the table repeats the summary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from models.evaluation import Result


def rolling_hr(curve: list[tuple[int, int, float]], window: int) -> tuple[np.ndarray, np.ndarray]:
    """(event times, rolling hit rate) over the last ``window`` evaluated events."""
    if not curve:
        return np.zeros(0), np.zeros(0)
    ts = np.fromiter((t for _, t, _ in curve), dtype=np.float64, count=len(curve))
    hits = np.fromiter((g > 0 for _, _, g in curve), dtype=np.float64, count=len(curve))
    w = max(1, min(window, len(hits)))
    cs = np.concatenate(([0.0], np.cumsum(hits)))
    return ts[w - 1 :], (cs[w:] - cs[:-w]) / w


def write_report(result: Result, summary: dict[str, Any], out_dir: Path, window: int = 5000) -> Path:
    """Write ``report.md`` and ``hr_over_time.png`` into ``out_dir``; returns the report path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    k = result.k
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    for name, score in result.scores.items():
        ts, hr = rolling_hr(score.curve, window)
        if ts.size:
            ax.plot(ts.astype(np.int64).astype("datetime64[ms]"), hr, label=name, linewidth=1.4)
    ax.set_ylabel(f"HR@{k} (rolling, {window:,} evaluated events)")
    ax.set_xlabel("event time (UTC)")
    ax.set_title(f"Prequential HR@{k} over event time, {result.events:,} events")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.autofmt_xdate()
    fig.tight_layout()
    plot = out_dir / "hr_over_time.png"
    fig.savefig(plot)
    plt.close(fig)
    lines = [
        f"# Prequential evaluation, K={k}",
        "",
        f"{result.events:,} events; each model gives the user's top-{k} before learning the event.",
        "",
        f"| model | hr@{k} | ndcg@{k} | evaluated | coverage |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary["models"].items():
        lines.append(
            f"| {name} | {m[f'hr@{k}']:.4f} | {m[f'ndcg@{k}']:.4f} | {m['evaluated']:,} | {m['coverage']:.3f} |"
        )
    if "split" in summary:
        cut = summary["split"]["at_event"]
        lines += [
            "",
            f"HR@{k} on the first {cut:,} events (the tuning slice) and on the rest (untouched):",
            "",
            "| model | first | rest |",
            "|---|---|---|",
        ]
        for name, sl in summary["split"]["models"].items():
            lines.append(f"| {name} | {sl['first'][f'hr@{k}']:.4f} | {sl['rest'][f'hr@{k}']:.4f} |")
    lines += ["", f"![HR@{k} over event time]({plot.name})", ""]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    return report
