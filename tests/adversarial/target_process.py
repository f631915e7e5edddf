"""A target engine in its own process, driven over a multiprocessing Pipe (spawn).

The adversarial tests attack this process: they stop it (SIGSTOP), kill it, forge its
descriptor, deregister its regions under a peer's feet. Commands are tuples; every reply is
("ok", value) or ("error", repr).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import tempfile
import time

import numpy as np

import kvxfer


def serve(conn, name: str, backend: str) -> None:
    engine = kvxfer.Engine(name, backends=[backend], timeout=60.0)
    buffers: dict[int, np.ndarray] = {}
    regions: dict[int, object] = {}
    files: list = []
    conn.send(("ok", (engine.descriptor(), os.getpid())))
    while True:
        try:
            cmd, *args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "register":
                size, shareable, fill = args
                buf = kvxfer.empty(size) if shareable else np.empty(size, np.uint8)
                buf[:] = fill
                region = engine.register(buf)
                buffers[region.id] = buf
                regions[region.id] = region
                reply = region.id
            elif cmd == "reregister_same_memory":
                # Deregisters region `rid` and registers the very same memory again: same
                # address, new id. A stale descriptor must not reach the new registration.
                (rid,) = args
                engine.deregister(regions.pop(rid))
                region = engine.register(buffers[rid])
                buffers[region.id] = buffers.pop(rid)
                regions[region.id] = region
                reply = region.id
            elif cmd == "deregister":
                (rid,) = args
                engine.deregister(regions.pop(rid))
                reply = None
            elif cmd == "deregister_and_watch":
                # Deregisters while a peer is writing, then watches the memory: once
                # deregister() returned, not one more byte may change.
                rid, watch_s = args
                engine.deregister(regions.pop(rid))
                before = buffers[rid].copy()
                time.sleep(watch_s)
                reply = int((buffers[rid] != before).sum())
            elif cmd == "bytes":
                rid, start, n = args
                reply = buffers[rid][start : start + n].tobytes()
            elif cmd == "descriptor":
                reply = engine.descriptor()
            elif cmd == "notifications":
                reply = [(n.peer, n.payload) for n in engine.notifications()]
            elif cmd == "open_file":
                # A regular file this process keeps open: what a forged memfd key would aim at.
                f = tempfile.TemporaryFile()
                f.write(b"\0" * args[0])
                f.flush()
                files.append(f)
                reply = f.fileno()
            elif cmd == "file_bytes":
                fd, n = args
                reply = os.pread(fd, n, 0)
            elif cmd == "close_engine":
                engine.close()
                reply = None
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
            else:
                raise ValueError(f"unknown command {cmd}")
            conn.send(("ok", reply))
        except Exception as e:  # reported to the test, which fails on it
            conn.send(("error", repr(e)))


class Target:
    """Handle on a target process. `ask` raises if the process reports an error."""

    def __init__(self, name: str, backend: str):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=serve, args=(child, name, backend), daemon=True)
        self.proc.start()
        self.descriptor, self.pid = self._reply(60)

    def _reply(self, timeout: float):
        if not self.conn.poll(timeout):
            raise TimeoutError("target process did not answer")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"target process: {value}")
        return value

    def ask(self, *cmd, timeout: float = 60):
        self.conn.send(cmd)
        return self._reply(timeout)

    def close(self) -> None:
        if self.proc.is_alive():
            try:
                os.kill(self.proc.pid, 18)  # SIGCONT, in case a test left it stopped
                self.conn.send(("exit",))
                self.conn.poll(10)
            except (BrokenPipeError, OSError):
                pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)
        time.sleep(0)


def stop_process(pid: int, within: float = 5.0) -> None:
    """SIGSTOP `pid` and wait until every thread of it is stopped (delivery is asynchronous);
    TimeoutError after `within` seconds."""
    os.kill(pid, 19)  # SIGSTOP
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        states = []
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    states.append(f.read().rsplit(")", 1)[1].split()[0])
            except FileNotFoundError:
                continue
        if states and all(s in ("T", "t") for s in states):
            return
        time.sleep(0.001)
    raise TimeoutError(f"process {pid} did not stop")
