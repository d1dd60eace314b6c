"""The ``streamrec`` command line (typer). Settings come from STREAMREC_* and --config."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any

import orjson
import typer

from stream_app.config import Settings
from stream_app.errors import StreamrecError, UsageError

log = logging.getLogger("streamrec")

# no local variables in tracebacks: they would show passwords (older typer versions showed them by default)
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="streamrec: a streaming recommender.",
)
datasets_app = typer.Typer(no_args_is_help=True, help="Obtain public datasets (cached outside the repo).")
app.add_typer(datasets_app, name="datasets")


def _settings(config: Path | None) -> Settings:
    """The settings of this command; unknown ``STREAMREC_*`` variables are warned about (once,
    here, not on every ``Settings()``), bad values end the command in ``main``."""
    from stream_app.settings_errors import unknown_variables

    if config is not None:
        if not config.is_file():
            raise UsageError(
                f"--config {config}: no such file; expected a TOML settings file such as streamrec.example.toml"
            )
        os.environ["STREAMREC_CONFIG"] = str(config)
    for warning in unknown_variables():
        log.warning("%s", warning)
    return Settings()


StrictOpt = typer.Option(
    False, "--strict", help="stop at the first bad row of the log (exit code 2) instead of skipping it"
)


ConfigOpt = typer.Option(None, "--config", help="TOML settings file (environment variables win).")


@app.command()
def worker(config: Path | None = ConfigOpt) -> None:
    """Run a stream worker until SIGTERM/SIGINT."""
    from stream_app.app import run_worker

    s = _settings(config)
    run_worker(s)


@app.command()
def trainer(
    idle_exit: float | None = typer.Option(None, help="exit after this many seconds without samples"),
    config: Path | None = ConfigOpt,
) -> None:
    """Fine-tune the CTR model on the samples topic and publish gated versions, until SIGTERM."""
    import signal
    import threading

    from stream_app.preflight import check_services

    s = _settings(config)
    check_services(s)
    from stream_app.trainer import run_trainer  # torch: seconds to import, so after the check

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    t = run_trainer(s, stop, max_idle_s=idle_exit if idle_exit is not None else float("inf"))
    typer.echo(orjson.dumps(t.metrics()).decode())


@app.command()
def replay(
    path: Path = typer.Argument(..., exists=True, dir_okay=True, help="JSONL, CSV or an ml-100k directory"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl | csv | ml-100k"),
    rate: float | None = typer.Option(None, help="events per second"),
    speed: float | None = typer.Option(None, help="multiple of real time"),
    partitions: int | None = typer.Option(None, help="create the topic with this many partitions if missing"),
    strict: bool = StrictOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Publish a recorded log to the events topic in event-time order, keyed by user. Rows a
    worker would reject are skipped (and reported), or stop the replay with --strict."""
    from rich.progress import Progress

    from stream_app.datasets import read_log
    from stream_app.kafka_io import ensure_topics, producer_config
    from stream_app.preflight import check_kafka
    from stream_app.replay import replay as do_replay

    s = _settings(config)
    events = read_log(path, fmt, s.event_schema(), strict)
    check_kafka(s)
    ensure_topics(s, partitions)
    with Progress() as bar:
        task = bar.add_task(f"replay -> {s.events_topic}", total=len(events))
        summary = do_replay(
            producer_config(s),
            s.events_topic,
            events,
            rate=rate,
            speed=speed,
            progress=lambda k: bar.update(task, completed=k),
        )
    typer.echo(str(summary))
    if summary.failed:
        raise typer.Exit(1)


@datasets_app.command("fetch")
def datasets_fetch(name: str = typer.Argument(..., help="ml-100k"), config: Path | None = ConfigOpt) -> None:
    """Download a dataset into the cache directory and convert it to the event contract."""
    from stream_app.datasets import fetch_ml100k

    if name != "ml-100k":
        typer.echo(f"unknown dataset {name!r}; available: ml-100k", err=True)
        raise typer.Exit(2)
    path = fetch_ml100k(_settings(config).data_dir)
    typer.echo(str(path))


@app.command()
def recs(user_id: str, config: Path | None = ConfigOpt) -> None:
    """Print a user's list as a reader sees it (falls back to trending)."""
    from stream_app.preflight import check_redis
    from stream_app.redis_io import redis_client
    from stream_app.redis_store import RedisStore

    s = _settings(config)
    check_redis(s)
    store = RedisStore(redis_client(s), s.redis_prefix)
    doc = store.get_rec(user_id)
    if doc is None:
        doc = {"user_id": user_id, "fallback": "trending", "items": store.get_trending()}
    typer.echo(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode())


@app.command()
def forget(
    user_id: str = typer.Argument(..., help="the user's id, as their events carry it"),
    partitioner: str = typer.Option(
        "consistent_random",
        help="the producers' partitioner (librdkafka name): consistent_random for librdkafka clients and "
        "streamrec replay, murmur2_random for Java clients",
    ),
    wait: float = typer.Option(0.0, help="wait this many seconds for the workers to apply it (0: don't wait)"),
    config: Path | None = ConfigOpt,
) -> None:
    """Forget a user: a control message on the events topic, applied in order by the worker that
    owns the user's partition (state, list, CTR memory; the snapshots that follow)."""
    from confluent_kafka import KafkaException

    from models.events import InvalidEvent, check_user_id
    from stream_app.config import mask_url
    from stream_app.forget import PARTITIONERS, publish_forget, wait_applied
    from stream_app.kafka_io import topic_partitions
    from stream_app.preflight import check_kafka

    try:
        check_user_id(user_id)
    except InvalidEvent as e:
        raise UsageError(f"USER_ID: {e.reason}; give the id exactly as the user's events carry it") from None
    if partitioner not in PARTITIONERS:
        raise UsageError(f"--partitioner {partitioner!r}: expected one of {', '.join(PARTITIONERS)}")
    s = _settings(config)
    where = mask_url(s.kafka_bootstrap_servers)
    check_kafka(s)
    try:
        if topic_partitions(s, s.events_topic) == 0:
            raise UsageError(
                f"the events topic {s.events_topic!r} does not exist on {where}: "
                "set STREAMREC_EVENTS_TOPIC and STREAMREC_KAFKA_BOOTSTRAP_SERVERS as the workers have them"
            )
        req = publish_forget(s, user_id, partitioner)
    except (KafkaException, RuntimeError) as e:
        raise StreamrecError(f"could not publish the forget request to {where}: {e}") from None
    typer.echo(f"forget request published: {req.topic} partition {req.partition} offset {req.offset}")
    if wait > 0:
        missing = wait_applied(s, req, wait)
        if missing is not None:
            raise StreamrecError(f"not applied within {wait:.0f} s: {missing} (is a worker running?)")
        typer.echo("applied; each stage's next snapshot of that partition no longer holds the user")


@app.command()
def demo(
    events: int = typer.Option(50_000, help="synthetic events (ignored when ml-100k is cached)"),
    ml100k: bool = typer.Option(True, help="use MovieLens-100K when it has been fetched"),
    keep: bool = typer.Option(
        False, "--keep", help="leave the broker, Redis, the worker and the lists up until Ctrl-C, to look around"
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Start a local broker and Redis where none is configured, run a worker, replay, show lists."""
    from stream_app.demo import run_demo

    run_demo(_settings(config), events, ml100k, keep)


@app.command()
def evaluate(
    path: Path = typer.Argument(..., exists=True, dir_okay=True, help="JSONL, CSV or an ml-100k directory"),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl | csv | ml-100k"),
    k: int = typer.Option(10, "--k", min=1, help="list length scored"),
    baselines: str = typer.Option("pop,itemcf,isgd,funkmf", help="comma-separated; empty for none"),
    json_out: Path | None = typer.Option(None, "--json", help="write the results here"),
    seed: int = typer.Option(0, help="seeds every model"),
    split: float = typer.Option(0.5, min=0.0, max=1.0, help="also score the first SPLIT of the log and the rest"),
    report: Path | None = typer.Option(None, "--report", help="write a Markdown report with a plot into this folder"),
    served: bool = typer.Option(
        False, "--served", help="score the lists the running system serves (broker, worker, Redis)"
    ),
    rate: float = typer.Option(2000.0, "--rate", min=1.0, help="events/s for --served"),
    ctr: float | None = typer.Option(
        None, "--ctr", min=0.0, help="also run streamrec with the CTR model (learning online) blended in at this weight"
    ),
    partitions: int = typer.Option(
        1, "--partitions", min=1, help="user partitions streamrec runs with (users split as by the producer)"
    ),
    table_lag: int = typer.Option(
        0, "--table-lag", min=0, help="events between an item stage's table entry and the user stage seeing it"
    ),
    strict: bool = StrictOpt,
    config: Path | None = ConfigOpt,
) -> None:
    """Prequential (test-then-train) HR@K and NDCG@K of streamrec and baselines, in-process."""
    from rich.progress import Progress

    from stream_app.evaluate import run_evaluation

    if served:
        from stream_app.served import run_served

        res = run_served(_settings(config), path, fmt, k, rate, strict)
        sv, ip = res["served"], res["in_process"]
        typer.echo(f"{res['events']:,} events at {res['rate_achieved']:,.0f} events/s, k={k}")
        typer.echo(f"| lists | hr@{k} | ndcg@{k} | evaluated |\n|---|---|---|---|")
        typer.echo(f"| served from Redis | {sv[f'hr@{k}']:.4f} | {sv[f'ndcg@{k}']:.4f} | {sv['evaluated']:,} |")
        typer.echo(f"| in-process, same settings | {ip[f'hr@{k}']:.4f} | {ip[f'ndcg@{k}']:.4f} | {ip['evaluated']:,} |")
        if json_out:
            json_out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))
        return
    names = [b.strip() for b in baselines.split(",") if b.strip()]
    with Progress() as bar:
        task = bar.add_task("evaluate", total=None)
        res = run_evaluation(
            _settings(config),
            path,
            fmt,
            k,
            names,
            seed,
            progress=lambda n: bar.update(task, completed=n),
            split=split,
            report_dir=report,
            ctr_weight=ctr,
            partitions=partitions,
            table_lag=table_lag,
            strict=strict,
        )
    typer.echo(
        f"{res['events']:,} events, k={k}, {res['seconds']:.1f} s; streamrec with {partitions} user partition(s), "
        f"table lag {table_lag} events"
    )
    typer.echo(f"| model | hr@{k} | ndcg@{k} | evaluated | coverage |\n|---|---|---|---|---|")
    for name, m in res["models"].items():
        typer.echo(f"| {name} | {m[f'hr@{k}']:.4f} | {m[f'ndcg@{k}']:.4f} | {m['evaluated']:,} | {m['coverage']:.3f} |")
    cut = res["split"]["at_event"]
    typer.echo(f"\nfirst {cut:,} events (tuning slice) / the rest (untouched): hr@{k}")
    for name, sl in res["split"]["models"].items():
        typer.echo(f"| {name} | {sl['first'][f'hr@{k}']:.4f} | {sl['rest'][f'hr@{k}']:.4f} |")
    if report is not None:
        typer.echo(f"report: {res['report']}")
    if json_out:
        json_out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))


@app.command()
def bench(
    events: int = typer.Option(0, help="events to preload (0: all of ml-100k, or 100k synthetic)"),
    rate: int = typer.Option(2000, help="events/s for the freshness run"),
    seconds: float = typer.Option(20.0, help="length of the freshness run"),
    observe: float = typer.Option(
        0.1, min=0.0, max=1.0, help="freshness is measured on the events of this share of the users (1: all)"
    ),
    partitions: int = typer.Option(1, help="partitions of the topic the one-worker runs read"),
    scale_partitions: int = typer.Option(
        4, help="partitions of the topic the one- and two-worker scale runs read (0: no scale runs)"
    ),
    json_out: Path | None = typer.Option(None, "--json", help="write the results here"),
    ctr: bool = typer.Option(False, "--ctr", help="instead: the CTR model's progressive AUC and speed"),
    threads: int = typer.Option(1, help="torch threads for --ctr"),
    with_trainer: bool = typer.Option(
        False, "--with-trainer", help="workers publish CTR samples and a trainer trains on them during each run"
    ),
    pretrained_ctr: bool = typer.Option(
        False,
        "--pretrained-ctr",
        help="the workers re-rank with a CTR model (W_CTR=1 unless set) trained on a first pass over the log and "
        "published before they start; no trainer runs beside them unless --with-trainer",
    ),
    split_roles: bool = typer.Option(
        False,
        "--split-roles",
        help="the one-worker runs start the user and the item stage as two processes (ROLES=user, ROLES=item), "
        "as deploy/ and docker-compose.yml do",
    ),
    table_memory: bool = typer.Option(
        False, "--table-memory", help="instead: memory of a worker's item table, ml-100k and a synthetic catalogue"
    ),
    items: int = typer.Option(100_000, help="catalogue size for --table-memory"),
    stages: bool = typer.Option(
        False, "--stages", help="instead: time per phase of one worker's code, in one stage thread, on ml-100k"
    ),
    block: int = typer.Option(2000, help="events per block for --stages"),
    live: int = typer.Option(
        0, help="--stages: time this many events drawn as live traffic (after the log, which is not timed)"
    ),
    user_memory: int = typer.Option(
        0,
        "--user-memory",
        help="instead: resident memory of the user state of this many synthetic users (3 events each)",
    ),
    config: Path | None = ConfigOpt,
) -> None:
    """Measure raw ceiling, end-to-end throughput, freshness and worker memory in one run."""
    if user_memory:
        from stream_app.stage_profile import user_memory as run_user_memory

        res = run_user_memory(_settings(config), user_memory, events or 3 * user_memory)
        typer.echo(
            f"{res['users']:,} users ({res['events']:,} events): {res['rss_bytes'] / 2**20:,.0f} MiB resident, "
            f"{res['bytes_per_user']:,.0f} bytes a user"
        )
    elif stages:
        from stream_app.datasets import fetch_ml100k
        from stream_app.stage_profile import profile_stages

        s = _settings(config)
        res = profile_stages(s, fetch_ml100k(s.data_dir), block, events, live)
        reranked = f" (re-ranked by an untrained CTR model, W_CTR={s.w_ctr:g}: its cost)" if s.w_ctr else ""
        typer.echo(
            f"{res['events']:,} {'live ' if live else ''}events, {res['lists']:,} lists, blocks of {block}: "
            f"{res['events_per_s']:,.0f} events/s in one thread (its ranking kernels on RANK_THREADS="
            f"{s.rank_threads}){reranked}\n"
            "| phase | s | µs per event | µs per list |\n|---|---|---|---|"
        )
        for k, v in res["phases"].items():
            typer.echo(f"| {k} | {v['seconds']:.2f} | {v['us_per_event']:.1f} | {v['us_per_list']:.1f} |")
    elif table_memory:
        from stream_app.bench import table_memory as run_table_memory

        typer.echo("| log | table | in memory | the item stage's counts |\n|---|---|---|---|")
        res = run_table_memory(_settings(config), items, events or 1_000_000)
    elif ctr:
        res = _bench_ctr(_settings(config), events, threads)
    else:
        from stream_app.bench import run_bench

        res = run_bench(
            _settings(config),
            events,
            rate,
            seconds,
            partitions,
            with_trainer,
            scale_partitions,
            split_roles,
            observe,
            pretrained_ctr,
        )
    if json_out:
        json_out.write_bytes(orjson.dumps(res, option=orjson.OPT_INDENT_2))


def _bench_ctr(s: Settings, n_events: int, threads: int) -> dict[str, Any]:
    from stream_app.ctr_bench import run_ctr_bench
    from stream_app.demo import demo_events

    name, rows = demo_events(s, n_events or 100_000, use_ml100k=True)
    if n_events:
        rows = rows[:n_events]
    schema = s.event_schema()
    events = sorted((schema.from_obj(r) for r in rows), key=lambda e: e.ts)
    res = run_ctr_bench(s, events, threads)
    res["dataset"] = name
    typer.echo(f"\nCTR task on {name}: {res['task']}")
    typer.echo(
        f"{res['samples']:,} samples ({res['positives']:,} single positives, {res['list_samples']:,} lists), "
        f"{res['trained']:,} trained on\n"
    )
    typer.echo("| measure | DIN (torch) | logistic regression |\n|---|---|---|")
    typer.echo(f"| progressive AUC | {res['ctr']['auc']:.4f} | {res['logreg']['auc']:.4f} |")
    typer.echo(f"| progressive log-loss | {res['ctr']['logloss']:.4f} | {res['logreg']['logloss']:.4f} |")
    ls = res["lists"]
    typer.echo(
        f"\nlists ({ls['lists']:,}, progressive): item taken ranked first among its sampled list "
        f"{ls['first']:.4f} by the model, {ls['first_retrieval']:.4f} in the order served"
    )
    typer.echo(
        f"trainer: {res['trainer_samples_per_s']:,.0f} samples/s on {res['trainer_device']} ({threads} torch "
        f"thread(s)); CPU time {res['trainer_cpu_ms_per_1k_samples']:.1f} ms per 1,000 samples"
    )
    typer.echo(f"worker inference: {res['inference_scores_per_s']:,.0f} candidate scores/s (median)")
    return res


def main() -> None:
    """The ``streamrec`` command: a ``StreamrecError`` or a bad setting ends it with one or two
    lines on stderr ("error: ...") and its exit code (2: bad usage), without a traceback."""
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from stream_app.settings_errors import explain

    try:
        level = os.environ.get("STREAMREC_LOG_LEVEL", "INFO").upper()
        if not isinstance(logging.getLevelName(level), int):
            raise UsageError(
                f"STREAMREC_LOG_LEVEL={os.environ['STREAMREC_LOG_LEVEL']}: expected one of DEBUG, INFO, WARNING, "
                "ERROR, CRITICAL, e.g. STREAMREC_LOG_LEVEL=INFO"
            )
        logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        app()
    except StreamrecError as e:
        _fail(str(e), e.exit_code)
    except (ValidationError, SettingsError) as e:
        message = explain(e)
        if message is None:  # not about the settings: a bug, with its traceback
            raise
        _fail(message, UsageError.exit_code)


def _fail(message: str, code: int) -> None:
    lines = message.strip().splitlines() or ["failed"]
    print("error: " + "\n".join(lines[:2]), file=sys.stderr)
    sys.exit(code)


if __name__ == "__main__":
    main()
