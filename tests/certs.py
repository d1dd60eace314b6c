"""A throw-away PKI for the TLS tests, made with the ``openssl`` command: a CA, a server
certificate for 127.0.0.1/localhost, and a client certificate whose key is encrypted."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

KEY_PASSWORD = "key-pass-4711"


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _signed(name: str, cn: str, d: Path, *, key_password: str | None = None, san: str | None = None) -> None:
    key_args = ["-passout", f"pass:{key_password}"] if key_password else ["-nodes"]
    _openssl("req", "-newkey", "rsa:2048", *key_args, "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={cn}", cwd=d)  # fmt: skip
    ext: list[str] = []
    if san:
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        ext = ["-extfile", f"{name}.ext"]
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)  # fmt: skip


def make_pki(d: Path) -> Pki:
    d.mkdir(parents=True, exist_ok=True)
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "2", "-subj", "/CN=streamrec test CA", cwd=d)  # fmt: skip
    _signed("server", "localhost", d, san="IP:127.0.0.1,DNS:localhost")
    _signed("client", "streamrec-client", d, key_password=KEY_PASSWORD)
    return Pki(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")
