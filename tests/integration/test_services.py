"""The embedded services of ``bench``, ``demo`` and ``evaluate --served`` go when the command does."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

_HOLD = """
import time
from stream_app.config import Settings
from stream_app.services import local_services
with local_services(Settings()) as svc:
    print(svc.bootstrap, svc.redis_url, flush=True)
    time.sleep(300)
"""


def _accepts(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1.0)
        return s.connect_ex((host, port)) == 0


def test_sigterm_stops_the_embedded_broker_and_redis() -> None:
    """They run in sessions of their own (Ctrl-C reaches only the command), so a SIGTERM to
    the command must unwind it and stop them, not leave them running."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STREAMREC_")}  # embedded ones
    proc = subprocess.Popen([sys.executable, "-c", _HOLD], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        bootstrap, redis_url = proc.stdout.readline().split()
        broker = ("127.0.0.1", int(bootstrap.rsplit(":", 1)[1]))
        redis = ("127.0.0.1", int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        assert _accepts(*broker) and _accepts(*redis)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert not _accepts(*broker) and not _accepts(*redis)
    finally:
        proc.kill()
