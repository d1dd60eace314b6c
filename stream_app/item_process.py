"""The item stage in a child process of the worker (``SPLIT_STAGES``).

In one process the two stages share one interpreter: they take turns with their blocks
(``stage.BLOCK_WORK``), and between blocks the user stage waits for the interpreter while the
item stage runs Python. With cores to spare that turn-taking costs the lists much of their
freshness (on a 16-core machine at 10,000 events/s, the freshness p50 halved with the stages in
two processes: README "Scaling out"). ``SPLIT_STAGES=true`` keeps one command and one supervised
unit: the worker runs the user stage and starts ``streamrec worker`` with ``ROLES=item`` as its
child, with the same settings (the environment and ``STREAMREC_CONFIG`` are inherited).

The child lives and dies with the worker: it is stopped (SIGTERM, so that it snapshots and
commits) when the worker stops, it gets SIGTERM from the kernel if the worker is killed
(``PR_SET_PDEATHSIG``), and the worker crashes if the child exits on its own, so that a
supervisor restarts both. Its ``/metrics``, ``/healthz`` and ``/readyz`` are served on
``ITEM_METRICS_PORT`` (unset: a free port picked at start); the worker's own endpoints include
the child's, so that one scrape and one probe cover the worker whichever way its stages run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import signal
import subprocess
import sys
from typing import Any

import orjson

from stream_app.config import Settings
from stream_app.embedded import free_port
from stream_app.errors import UsageError
from stream_app.processes import local_get

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the thread that started it (the worker's main
    thread) ends, however the worker ends (Linux; elsewhere a killed worker's child must be
    stopped by hand)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


class ItemProcess:
    """``streamrec worker`` with ``ROLES=item`` as a child of this worker."""

    def __init__(self, settings: Settings) -> None:
        port = settings.item_metrics_port
        self.port = free_port() if port is None else port
        if self.port and self.port == settings.metrics_port_for(9108):
            raise UsageError(
                f"STREAMREC_ITEM_METRICS_PORT={self.port} is the worker's own metrics port: give the item "
                "process another (or 0 to turn its metrics off)"
            )
        self.proc: subprocess.Popen[bytes] | None = None
        self.stopping = False

    def start(self) -> None:
        env = {
            **os.environ,
            "STREAMREC_ROLES": "item",
            "STREAMREC_SPLIT_STAGES": "false",
            "STREAMREC_METRICS_PORT": str(self.port),
        }
        # Started before the worker starts threads of its own (the hook runs between fork and
        # exec), in a session of its own: signals to the worker's process group (Ctrl-C, a
        # supervisor's) reach the child once, forwarded by ``stop``, not twice.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "stream_app.cli", "worker"],
            env=env,
            preexec_fn=_die_with_parent,
            start_new_session=True,
        )
        log.info("item stage: started as process %d (metrics on port %s)", self.proc.pid, self.port or "off")

    def exit_code(self) -> int | None:
        """None while the child runs."""
        return None if self.proc is None else self.proc.poll()

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM, then wait for the child's graceful stop (snapshots, commits); SIGKILL after
        ``timeout``. Returns its exit code."""
        self.stopping = True
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("item stage process %d did not stop in %.0f s: killed", self.proc.pid, timeout)
            self.proc.kill()
            return self.proc.wait(10)

    # -- what the worker's /healthz and /readyz add ------------------------------------------
    def healthz(self) -> tuple[bool, str]:
        code = self.exit_code()
        if code is not None:
            return False, f"item stage process exited with code {code}"
        if not self.port:
            return True, "ok"
        status, body = local_get(self.port, "/healthz")
        if status == 0:
            return True, "ok"  # not serving yet (starting), or its port is taken: it exits then
        if status == 200:
            return True, "ok"  # the same answer as a worker in one process
        return False, f"item stage process: {body.decode(errors='replace').strip()}"

    def metrics_text(self) -> str | None:
        """The child's ``/metrics`` (None while it does not answer, or without a port)."""
        if not self.port:
            return None
        status, body = local_get(self.port, "/metrics")
        return body.decode(errors="replace") if status == 200 else None

    def ready(self) -> bool:
        """Whether the child is ready (its stage has its partitions; without a port: it runs)."""
        return self.readyz()[0]

    def readyz(self) -> tuple[bool, dict[str, Any]]:
        """Whether the child is ready, and its /readyz document (partitions by stage)."""
        if self.exit_code() is not None:
            return False, {"reason": "item stage process is not running"}
        if not self.port:
            return True, {}  # no way to ask: alive is all that is known
        status, body = local_get(self.port, "/readyz")
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            doc = {"reason": f"item stage process: {body.decode(errors='replace').strip() or 'starting'}"}
        return status == 200, doc if isinstance(doc, dict) else {}
