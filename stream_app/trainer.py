"""``streamrec trainer``: fine-tunes the CTR model on the samples topic, and publishes versions.

The samples are of two kinds (``models.ctr.samples``): single (user, item) samples labelled
click or not, trained with binary cross-entropy, and list samples (the item a user took and
other candidates of the list they were served, with the inputs they were ranked with), trained
with a softmax over the list: what makes the model a re-ranker. Per micro-batch of
``ctr_batch_size`` samples:

1. A deterministic share (``ctr_holdout``, by hash of user and time) is held back into a bounded
   buffer of recent samples: the promotion gate's test set, never trained on.
2. Progressive validation: the rest is scored by the current model *before* it trains on them:
   river ``RollingROCAUC`` and log-loss on the single samples, for the DIN model and, alongside
   on the same samples, the logistic-regression baseline; on the lists, their softmax loss and
   how often the item taken is ranked first, by the model and by the order it was served in.
3. One ``train_step`` each; the progressive 0/1 errors feed a river ``ADWIN`` detector. On drift the learning
   rate is raised ``ctr_drift_lr_boost``-fold and workers are told to explore more
   (``ctr_drift_epsilon``) for ``ctr_drift_batches`` batches.
4. Every ``ctr_publish_batches`` batches or ``ctr_publish_interval_s`` seconds, the gate compares
   the candidate with the live version on the held-back samples. If its loss (the training
   objective: log-loss plus list loss) is no worse than the live one's by more than
   ``ctr_gate_tolerance`` (relative), it becomes the next version: a checkpoint file, then
   Redis. Otherwise the weights roll back to the live version.

Offsets are committed after each batch is trained on; on restart the trainer resumes from the
newest checkpoint (samples after it and before the last commit are not replayed: the model is
a running estimate, not an exactly-once aggregate).
"""

from __future__ import annotations

import copy
import logging
import math
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import torch
from confluent_kafka import Consumer, KafkaError, KafkaException
from river import drift, metrics

from models.ctr.checkpoint import from_bytes, to_bytes
from models.ctr.din import DIN, CtrConfig
from models.ctr.features import N_DENSE, CtrBatch, FeatureHasher, Sample
from models.ctr.logreg import LogReg
from models.ctr.train import batch_loss, list_losses, log_losses, logits, optimizers, sigmoid, train_step
from stream_app import metrics as prom
from stream_app.config import Settings
from stream_app.errors import UsageError
from stream_app.kafka_io import consumer_config
from stream_app.redis_io import redis_client
from stream_app.redis_store import RedisStore

log = logging.getLogger(__name__)


def ctr_config(s: Settings) -> CtrConfig:
    return CtrConfig(buckets=s.ctr_buckets, dim=s.ctr_dim, hist_len=s.ctr_hist_len, lr=s.ctr_lr, n_dense=N_DENSE)


def train_device(s: Settings) -> torch.device:
    """The trainer's torch device (``ctr_device``), checked: a GPU that torch cannot use is a
    settings error at start-up, not a crash at the first batch."""
    dev = torch.device(s.ctr_device)
    if dev.type != "cuda":
        return dev
    if not torch.cuda.is_available():
        raise UsageError(
            f"STREAMREC_CTR_DEVICE={s.ctr_device}, but torch {torch.__version__} sees no CUDA GPU "
            "(a CPU-only build of torch, or no driver): install a CUDA build of torch, or use cpu"
        )
    n = torch.cuda.device_count()
    if dev.index is not None and dev.index >= n:
        raise UsageError(f"STREAMREC_CTR_DEVICE={s.ctr_device}, but torch sees {n} GPU(s): cuda:0 to cuda:{n - 1}")
    return dev


def model_dir(s: Settings) -> Path:
    return s.model_dir if s.model_dir is not None else s.data_dir / "models" / s.group_id


@dataclass
class Progress:
    """Progressive-validation metrics of one model (each batch scored before training on it).

    AUC: river's ``RollingROCAUC`` (exact, over the last 20,000 samples), per sample. Log-loss
    is summed with numpy per batch (cumulative, and an exponential average of batch means):
    river's per-sample ``LogLoss`` alone cost a third of the trainer's time.
    """

    auc: metrics.RollingROCAUC = field(default_factory=lambda: metrics.RollingROCAUC(window_size=20_000))
    loss_sum: float = 0.0
    n: int = 0
    recent: float = math.nan

    def update(self, y: np.ndarray, p: np.ndarray) -> None:
        if y.size == 0:
            return
        auc = self.auc
        for yy, pp in zip((y > 0.5).tolist(), np.clip(p, 1e-7, 1 - 1e-7).tolist(), strict=True):
            auc.update(yy, pp)
        losses = log_losses(y, p)
        self.loss_sum += float(losses.sum())
        self.n += len(losses)
        m = float(losses.mean())
        self.recent = m if math.isnan(self.recent) else 0.95 * self.recent + 0.05 * m

    def as_dict(self) -> dict[str, float]:
        return {"auc": float(self.auc.get()), "logloss": self.loss_sum / max(self.n, 1), "recent_logloss": self.recent}


@dataclass
class ListProgress:
    """Progressive validation of the re-ranking task, on list samples (each scored before
    training on it): mean softmax cross-entropy, and how often the item taken is ranked first
    among its sampled list by the model, against the retrieval order it was served in."""

    lists: int = 0
    loss_sum: float = 0.0
    first: int = 0
    first_retrieval: int = 0

    def update(self, b: CtrBatch, z: np.ndarray) -> None:
        ce, ranks = list_losses(b, z)
        _, base = list_losses(b, b.dense[:, 0].astype(np.float64))
        self.lists += len(ce)
        self.loss_sum += float(ce.sum())
        self.first += int((ranks == 0).sum())
        self.first_retrieval += int((base == 0).sum())

    def as_dict(self) -> dict[str, float | int]:
        n = max(self.lists, 1)
        return {
            "lists": self.lists,
            "loss": self.loss_sum / n,
            "first": self.first / n,
            "first_retrieval": self.first_retrieval / n,
        }


def holdout_loss(model: torch.nn.Module, b: CtrBatch) -> float:
    """The training objective (``batch_loss``) of ``model`` on ``b``, without gradients."""
    z = torch.from_numpy(logits(model, b).astype(np.float32))
    return float(batch_loss(z, b))


class Trainer:
    """The trainer's state and one-batch logic, apart from Kafka (which ``run`` adds)."""

    def __init__(self, s: Settings, store: RedisStore | None = None, record: bool = False) -> None:
        self.s = s
        self.cfg = ctr_config(s)
        self.device = train_device(s)
        torch.manual_seed(s.seed)  # initialised on the CPU, then moved: the same start on any device
        self.model = DIN(self.cfg).to(self.device)
        self.baseline = LogReg(self.cfg).to(self.device)
        self.opts = optimizers(self.model, self.cfg.lr)
        self.base_opts = optimizers(self.baseline, 0.05)
        self.hasher = FeatureHasher(self.cfg.buckets, self.cfg.hist_len, n_dense=self.cfg.n_dense)
        self.dir = model_dir(s)
        self.store = store
        self.version = 0
        self.live: DIN | None = None
        self.holdout: deque[Sample] = deque(maxlen=20_000)
        self.progress = Progress()
        self.baseline_progress = Progress()
        self.list_progress = ListProgress()
        self.adwin = drift.ADWIN()
        self.boost_left = 0
        self.drifts = 0
        self.boosted_batches = 0  # batches trained at the raised learning rate
        self.samples = 0
        self.batches = 0
        self.rejected = 0
        self.since_publish = 0
        self.published_at = time.monotonic()
        # with ``record``: every batch's (labels, model, baseline) progressive predictions
        self.recorded: list[tuple[np.ndarray, np.ndarray, np.ndarray]] | None = [] if record else None
        self._resume()

    # -- checkpoints ---------------------------------------------------------------------------
    def _resume(self) -> None:
        ckpts = sorted(self.dir.glob("ctr-*.pt")) if self.dir.exists() else []
        if not ckpts:
            return
        blob = ckpts[-1].read_bytes()
        version, model = from_bytes(blob)
        if model.cfg != self.cfg:
            raise ValueError(
                f"checkpoint {ckpts[-1]} was trained with {model.cfg}, the settings say {self.cfg}; "
                "restore those settings or point STREAMREC_MODEL_DIR elsewhere"
            )
        self.model.load_state_dict(model.state_dict())
        self.version, self.live = version, model.to(self.device)
        log.info("resumed from checkpoint %s (version %d)", ckpts[-1].name, version)
        self._publish_redis(blob)

    def _publish(self) -> None:
        self.version += 1
        blob = to_bytes(self.model, self.version, {"metrics": self.metrics()})
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / f"ctr-{self.version:08d}.pt"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(blob)
        tmp.replace(path)  # atomic: a crash never leaves a half-written checkpoint
        for old in sorted(self.dir.glob("ctr-*.pt"))[:-5]:
            old.unlink()  # keep the five newest, for rollback by hand
        self.live = copy.deepcopy(self.model).eval()
        self._publish_redis(blob)
        prom.TRAINER_VERSION.set(self.version)
        log.info("published CTR model version %d (%.1f kB)", self.version, len(blob) / 1e3)

    def _publish_redis(self, blob: bytes) -> None:
        if self.store is not None:
            self.store.publish_ctr_model(self.version, blob)

    # -- one batch -----------------------------------------------------------------------------
    def _held_back(self, smp: Sample) -> bool:
        """Whether a sample belongs to the gate's test set: by a stable hash of user and time, so
        a positive and its negatives fall on the same side."""
        h = zlib.crc32(f"{self.s.seed}:{smp.user_id}:{smp.ts}".encode())
        return h % 10_000 < self.s.ctr_holdout * 10_000

    def step(self, batch: list[Sample]) -> None:
        """Hold back, score (progressive validation), train, watch for drift, maybe publish."""
        train: list[Sample] = []
        for smp in batch:
            (self.holdout.append if self._held_back(smp) else train.append)(smp)
        if not train:
            return
        b = self.hasher.batch(train)
        z = logits(self.model, b)
        zb = logits(self.baseline, b)
        # AUC and log-loss are about P(click): on the ungrouped samples; lists have their own
        point = slice(None) if b.group is None else b.group < 0
        y, p, pb = b.label[point], sigmoid(z[point]), sigmoid(zb[point])
        if self.recorded is not None:
            self.recorded.append((y, p, pb))
        self.progress.update(y, p)
        self.baseline_progress.update(y, pb)
        self.list_progress.update(b, z)
        errors = ((p > 0.5) != (y > 0.5)).tolist()
        scale = self.s.ctr_drift_lr_boost if self.boost_left > 0 else 1.0
        train_step(self.model, self.opts, b, lr_scale=scale)
        train_step(self.baseline, self.base_opts, b)
        self.samples += len(train)
        self.batches += 1
        prom.TRAINER_SAMPLES.inc(len(batch))
        self.since_publish += 1
        if self.boost_left > 0:
            self.boost_left -= 1
            self.boosted_batches += 1
            if self.boost_left == 0:
                self._control(1.0)
        # ADWIN watches the stream of progressive 0/1 errors (bounded, as its test expects; raw
        # log-loss spikes widen its bound) and flags any change of their mean: only a rise
        # means the world moved away from the model
        before = self.adwin.estimation
        rose = False
        for e in errors:
            self.adwin.update(e)
            if self.adwin.drift_detected and self.adwin.estimation > before:
                rose = True
        if rose and self.batches > 20:
            self.drifts += 1
            prom.TRAINER_DRIFTS.inc()
            self.boost_left = self.s.ctr_drift_batches
            log.warning("drift in the CTR loss (batch %d): learning faster, exploring more", self.batches)
            self._control(self.s.ctr_drift_lr_boost)
        due = self.since_publish >= self.s.ctr_publish_batches or (
            time.monotonic() - self.published_at >= self.s.ctr_publish_interval_s
        )
        if due:
            self.gate()

    def gate(self) -> bool:
        """Publish the candidate if it does no worse than the live version on held-back samples;
        otherwise roll back to the live weights. Returns whether it was published."""
        self.since_publish, self.published_at = 0, time.monotonic()
        if self.live is None:
            self._publish()
            return True
        if len(self.holdout) < 100:
            return False  # too little evidence either way: keep training
        hb = self.hasher.batch(list(self.holdout))
        cand, live = holdout_loss(self.model, hb), holdout_loss(self.live, hb)
        if cand <= live * (1.0 + self.s.ctr_gate_tolerance):
            prom.TRAINER_GATE.labels("promoted").inc()
            self._publish()
            return True
        self.rejected += 1
        prom.TRAINER_GATE.labels("rejected").inc()
        log.warning("candidate loss %.4f worse than live %.4f on held-back samples: rolled back", cand, live)
        self.model.load_state_dict(self.live.state_dict())
        self.opts = optimizers(self.model, self.cfg.lr)
        return False

    def _control(self, boost: float) -> None:
        """Tell workers to explore more (after drift) or go back to normal."""
        if self.store is not None:
            eps = self.s.ctr_drift_epsilon if boost > 1.0 else self.s.epsilon
            self.store.set_ctr_control(eps, boost > 1.0)

    def metrics(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "samples": self.samples,
            "batches": self.batches,
            "drifts": self.drifts,
            "rejected": self.rejected,
            "boosted": self.boost_left > 0,
            "boosted_batches": self.boosted_batches,
            "ctr": self.progress.as_dict(),
            "logreg": self.baseline_progress.as_dict(),
            "lists": self.list_progress.as_dict(),
        }


def decode_samples(values: list[bytes | None]) -> tuple[list[Sample], int]:
    out, bad = [], 0
    for v in values:
        try:
            out.append(Sample.from_obj(orjson.loads(v or b"null")))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            bad += 1
    return out, bad


def run_trainer(s: Settings, stop: threading.Event | None = None, max_idle_s: float = math.inf) -> Trainer:
    """Consume the samples topic until ``stop`` is set (or nothing arrives for ``max_idle_s``)."""
    if s.ctr_threads > 0:
        torch.set_num_threads(s.ctr_threads)
    store = RedisStore(redis_client(s), s.redis_prefix)
    t = Trainer(s, store)
    stop = stop or threading.Event()
    c = Consumer({**consumer_config(s), "group.id": f"{s.group_id}-trainer", "enable.auto.offset.store": True})
    health = _Health(s.health_stale_s)
    for decision in ("promoted", "rejected"):
        prom.TRAINER_GATE.labels(decision)  # both series exported from the start
    server = prom.serve(s.metrics_port_for(9109), health.healthz, health.readyz)
    c.subscribe([s.samples_topic], on_assign=lambda _c, tps: health.assigned([tp.partition for tp in tps]))
    log.info(
        "trainer consuming %s; checkpoints in %s; training on %s; %d torch thread(s)",
        s.samples_topic,
        t.dir,
        _device_name(t.device),
        torch.get_num_threads(),
    )
    idle_since = time.monotonic()
    last_report = time.monotonic()
    fresh = False  # trained since the last report
    bad = 0
    try:
        while not stop.is_set():
            health.beat = time.monotonic()
            msgs = c.consume(num_messages=s.ctr_batch_size, timeout=0.5)
            msgs = [m for m in msgs if m.error() is None]
            if msgs:
                idle_since = time.monotonic()
                batch, nbad = decode_samples([m.value() for m in msgs])
                bad += nbad
                t.step(batch)
                c.commit(asynchronous=True)
                fresh = True
            elif time.monotonic() - idle_since > max_idle_s:
                break
            if fresh and time.monotonic() - last_report > 5:  # also once the samples stop coming
                last_report, fresh = time.monotonic(), False
                _report(t, store, bad)
    finally:
        t.gate()
        store.set_ctr_metrics({**t.metrics(), "invalid": bad})
        try:
            c.commit(asynchronous=False)
        except KafkaException as e:
            if e.args[0].code() != KafkaError._NO_OFFSET:  # nothing new since the last commit
                raise
        c.close()
        if server is not None:
            server.stop()
    return t


def _device_name(dev: torch.device) -> str:
    return f"{dev} ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else str(dev)


def _report(t: Trainer, store: RedisStore, bad: int) -> None:
    """The trainer's progress to Redis (``ctr:metrics``), /metrics and the log."""
    m = t.metrics()
    store.set_ctr_metrics({**m, "invalid": bad})
    prom.TRAINER_AUC.set(m["ctr"]["auc"])
    prom.TRAINER_LOGLOSS.set(m["ctr"]["logloss"])
    log.info(
        "samples %d  AUC %.4f (logreg %.4f)  log-loss %.4f  lists %d, taken item first %.3f"
        " (retrieval order %.3f)  version %d  drifts %d",
        m["samples"],
        m["ctr"]["auc"],
        m["logreg"]["auc"],
        m["ctr"]["logloss"],
        m["lists"]["lists"],
        m["lists"]["first"],
        m["lists"]["first_retrieval"],
        m["version"],
        m["drifts"],
    )


@dataclass
class _Health:
    """/healthz: the training loop comes round; /readyz: the trainer has joined its group."""

    stale_s: float
    beat: float = 0.0
    ready: bool = False
    partitions: list[int] = field(default_factory=list)

    def assigned(self, partitions: list[int]) -> None:
        self.ready, self.partitions = True, sorted(partitions)

    def healthz(self) -> tuple[bool, str]:
        if self.beat and time.monotonic() - self.beat > self.stale_s:
            return False, f"the training loop last came round {time.monotonic() - self.beat:.0f} s ago"
        return True, "ok"

    def readyz(self) -> tuple[bool, str]:
        doc: dict[str, Any] = {"ready": self.ready, "partitions": {"trainer": self.partitions}}
        if not self.ready:
            doc["reason"] = "the trainer has not joined its group yet"
        return self.ready, orjson.dumps(doc).decode()
