"""A private etcd server for tests and local deployments: ``etcd`` (Debian's ``etcd-server``)
on free loopback ports, its data in a temporary folder removed at :meth:`stop`."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from .base import RegistryError


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class EtcdServer:
    """``with EtcdServer() as srv: EtcdRegistry(srv.url)``. Raises :class:`RegistryError` when
    the ``etcd`` binary is missing or the server does not answer within ``start_timeout``."""

    def __init__(self, host: str = "127.0.0.1", binary: str = "etcd", start_timeout: float = 30.0) -> None:
        exe = shutil.which(binary)
        if exe is None:
            raise RegistryError(f"{binary!r} not found on PATH (Debian: apt-get install etcd-server)")
        self.dir = Path(tempfile.mkdtemp(prefix="kvxfer-etcd-"))
        self.host = host
        self.port = _free_port(host)
        peer = _free_port(host)
        self.url = f"etcd://{host}:{self.port}"
        self.log = self.dir / "etcd.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [exe, "--name", "kvxfer", "--data-dir", str(self.dir / "data"),
                 "--listen-client-urls", f"http://{host}:{self.port}",
                 "--advertise-client-urls", f"http://{host}:{self.port}",
                 "--listen-peer-urls", f"http://{host}:{peer}",
                 "--initial-advertise-peer-urls", f"http://{host}:{peer}",
                 "--initial-cluster", f"kvxfer=http://{host}:{peer}",
                 "--heartbeat-interval", "100", "--election-timeout", "500"],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + start_timeout
        from .etcd import EtcdRegistry

        while True:
            if self.proc.poll() is not None:
                self.stop()
                raise RegistryError(f"etcd exited at start: {self.log.read_text(errors='replace')[-1500:]}")
            try:
                EtcdRegistry(self.url, timeout_s=1.0).close()
                return
            except RegistryError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RegistryError(
                        f"etcd did not answer on {self.url} within {start_timeout} s"
                    ) from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> EtcdServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
