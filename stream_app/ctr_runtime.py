"""The worker's side of the CTR model: published versions picked up without a restart.

A daemon thread polls Redis every ``ctr_poll_s`` for the version the trainer published (and
for its exploration control); a new version is loaded off the event path and swapped in with
one reference assignment, so a block is always ranked with one whole model. torch is imported
only here, and only when ``w_ctr > 0``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import redis

from stream_app.config import Settings
from stream_app.os_threads import named
from stream_app.redis_store import RedisStore

log = logging.getLogger(__name__)


class ModelWatcher:
    def __init__(self, s: Settings, store: RedisStore, categories: dict[str, str]) -> None:
        self.s, self.store, self.categories = s, store, categories
        self.rescorer: Any = None  # models.ctr.rescorer.CtrRescorer once a version is published
        self.epsilon: float | None = None  # the trainer's override after drift
        self.stop = threading.Event()
        self.thread = threading.Thread(target=named(self._run), name="streamrec-ctr-model", daemon=True)

    def start(self) -> ModelWatcher:
        self.poll()
        self.thread.start()
        return self

    @property
    def label(self) -> str:
        """The model string written into every list."""
        r = self.rescorer
        return self.s.model_version if r is None else f"{self.s.model_version}+ctr-v{r.version}"

    def poll(self) -> None:
        try:
            self.epsilon = self.store.ctr_epsilon()
            version = self.store.ctr_model_version()
            if version is None or (self.rescorer is not None and version == self.rescorer.version):
                return
            blob = self.store.ctr_model()
            if blob is None:
                return
            import torch

            from models.ctr.checkpoint import from_bytes
            from models.ctr.rescorer import CtrRescorer

            # one thread: the worker's loop is single-threaded by design, and idle torch worker
            # threads spinning between small batches take the cores the broker and Redis need
            torch.set_num_threads(1)
            version, model = from_bytes(blob)
            self.rescorer = CtrRescorer(model, version, self.s.w_ctr, self.categories)
            log.info("CTR model version %d loaded", version)
        except (redis.RedisError, ValueError, KeyError, RuntimeError) as e:
            log.warning("CTR model poll failed (%s); keeping the current version", type(e).__name__)

    def _run(self) -> None:
        while not self.stop.wait(self.s.ctr_poll_s):
            self.poll()
