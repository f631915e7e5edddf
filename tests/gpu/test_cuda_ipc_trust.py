"""The same-host notification socket (util/notify_socket.h), which cuda_ipc shares with shm:
a local client without the descriptor's secret can neither connect nor inject, a message in
cuda_ipc's old unauthenticated format is refused, and a receiver whose notification queue
is full holds senders back (their notify() ends TimeoutError) without losing one, and a
stopped peer does not hold transfers to a healthy one (they end DONE before the stopped
peer's transfers end TimeoutError at their deadlines).

Each test runs on shm everywhere and on cuda_ipc where a GPU is present (the cuda_ipc
backend needs the CUDA driver to start); both speak the one implementation, with their own
labels and magic."""

from __future__ import annotations

import hashlib
import hmac
import os
import socket
import struct
import sys
import time

import pytest

import kvxfer
from kvxfer import errors

sys.path.insert(0, os.path.dirname(__file__))
from gpu_env import GPUS, WHY  # noqa: E402

ADVERSARIAL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "adversarial")
sys.path.insert(0, ADVERSARIAL)
from notify_checks import FIT, NOTE, assert_serves_honest_peer, numbered, numbers, send_unauthenticated  # noqa: E402

# backend -> (offset of the socket name in its endpoint info, handshake magic)
PROTOCOL = {"shm": (12, 0x3153564B), "cuda_ipc": (4, 0x3143564B)}


@pytest.fixture(params=["shm", "cuda_ipc"])
def backend(request):
    name = request.param
    if name == "cuda_ipc" and GPUS < 1:
        pytest.skip(f"cuda_ipc needs a GPU: {WHY}")
    if not any(b.name == name and b.available for b in kvxfer.list_backends()):
        pytest.skip(f"this build has no {name} backend")
    return name


def socket_name(engine, backend: str) -> bytes:
    d = kvxfer._native.decode_descriptor(engine.descriptor())
    return dict(d["backends"])[backend][PROTOCOL[backend][0] :]


def hello(magic: int, nonce: bytes, name: bytes, instance: int = 77) -> bytes:
    return struct.pack("<IQ", magic, instance) + nonce + name


def test_client_without_the_secret_cannot_connect_or_inject(backend):
    magic = PROTOCOL[backend][1]
    with kvxfer.Engine("victim", backends=[backend]) as eng:
        name = socket_name(eng, backend)
        # cuda_ipc's old format (instance | name | payload, no handshake) and junk.
        forged = struct.pack("<QH", 1234, 5) + b"admin" + b"bytes in place"
        send_unauthenticated(name, (forged, b"N" + b"x" * 10, b"\0" * 64))
        # The real handshake with a proof under a wrong secret: the connection is closed.
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(b"\0" + name)
            mine = os.urandom(32)
            s.send(hello(magic, mine, b"intruder"))
            challenge = s.recv(1024)
            assert len(challenge) == 4 + 32 + 32 and struct.unpack("<I", challenge[:4])[0] == magic
            theirs = challenge[4:36]
            wrong = hmac.new(bytes(32), b"anything" + theirs + mine, hashlib.sha256).digest()
            s.send(struct.pack("<I", magic) + wrong)
            assert s.recv(1024) == b"", "the engine answered a wrong proof"
            with pytest.raises(OSError):
                for _ in range(3):
                    s.send(b"N" + b"injected")
                    time.sleep(0.05)
        finally:
            s.close()
        time.sleep(0.2)
        assert eng.notifications() == []
        assert_serves_honest_peer(eng, backend, timeout=10)


def test_full_notification_queue_holds_senders_back_without_loss(backend):
    with (
        kvxfer.Engine("slow-reader", backends=[backend]) as b,
        kvxfer.Engine("sender", backends=[backend]) as a,
    ):
        peer = a.add_peer(b.descriptor())
        sent = []
        refused = 0
        for i in range(FIT + 100):
            try:
                a.notify(peer, numbered(i), timeout=0.5)
                sent.append(i)
            except errors.TimeoutError:
                refused += 1
                if refused >= 3:
                    break
        assert refused, "the receiver's queue bound never held the sender back"
        assert len(sent) >= FIT
        got = []
        stop = time.monotonic() + 30
        while len(got) < len(sent) and time.monotonic() < stop:
            got += numbers(b.notifications())
            time.sleep(0.01)
        # Nothing sent was lost, none twice; a timed-out notify() may still have gone out.
        assert set(sent) <= set(got) and len(got) == len(set(got))


# --- a stopped peer holds nothing that serves another peer -------------------------------

LATE_BOUND = 0.25  # seconds after the deadline (tests/adversarial/test_hung_peers.py's bound)


class _TargetProcess:
    """A target engine of `backend` in its own process, with one 64 KiB region (host memory
    for shm, a GPU pool for cuda_ipc)."""

    def __init__(self, backend: str, name: str):
        import multiprocessing as mp

        if backend == "shm":
            from target_process import Target

            self.target = Target(name, "shm")
            self.region = self.target.ask("register", 1 << 16, False, 0)
            self.descriptor = self.target.ask("descriptor")
            self.pid = self.target.pid
            return
        import gpu_peer

        kw = {"num_layers": 1, "num_kv": 1, "num_blocks": 16, "block_bytes": 4096}
        ctx = mp.get_context("spawn")
        self.conn, theirs = ctx.Pipe()
        self.proc = ctx.Process(target=gpu_peer.serve, args=(theirs, name, 0, kw, 1, 5, {}), daemon=True)
        self.proc.start()
        if not self.conn.poll(120):
            raise TimeoutError("the cuda_ipc target did not start")
        status, value = self.conn.recv()
        if status != "ok":
            raise RuntimeError(f"cuda_ipc target: {value}")
        self.descriptor, (self.region,) = value
        self.pid = self.proc.pid
        self.target = None

    def close(self) -> None:
        os.kill(self.pid, 18)  # SIGCONT, in case it is stopped
        if self.target is not None:
            self.target.close()
            return
        try:
            self.conn.send(("exit",))
            self.conn.poll(10)
        except OSError:
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()


def test_stopped_peer_does_not_hold_transfers_to_a_healthy_peer(backend):
    from kvxfer import Op, TransferState

    sys.path.insert(0, ADVERSARIAL)
    from target_process import stop_process

    if backend == "cuda_ipc":
        import torch

        src = torch.full((1 << 16,), 7, dtype=torch.uint8, device="cuda:0")
    else:
        import numpy as np

        src = np.full(1 << 16, 7, np.uint8)
    a = kvxfer.Engine("initiator", backends=[backend], timeout=30.0)
    stopped = _TargetProcess(backend, "stopped")
    healthy = _TargetProcess(backend, "healthy")
    try:
        local = a.register(src)
        ps, ph = a.add_peer(stopped.descriptor), a.add_peer(healthy.descriptor)
        stop_process(stopped.pid)
        ext = [[0, 64]]
        t0 = time.monotonic()
        to_stopped = [
            a.post(
                Op.WRITE,
                ps,
                local,
                stopped.region,
                local_extents=ext,
                remote_extents=ext,
                notify=bytes(NOTE),
                timeout=1.0,
            )
            for _ in range(40)
        ]
        to_healthy = [
            a.post(
                Op.WRITE,
                ph,
                local,
                healthy.region,
                local_extents=ext,
                remote_extents=ext,
                notify=b"h",
                timeout=10.0,
            )
            for _ in range(20)
        ]
        for t in to_healthy:
            t.wait(10)
        healthy_s = time.monotonic() - t0
        # The healthy peer's transfers did not wait for the stopped peer's deadlines.
        assert healthy_s < 0.9, f"transfers to a healthy peer took {healthy_s:.2f} s behind a stopped one"
        stop = time.monotonic() + 10
        while any(t.poll() == TransferState.PENDING for t in to_stopped) and time.monotonic() < stop:
            time.sleep(0.002)
        ended = time.monotonic() - t0
        states = [t.poll() for t in to_stopped]
        assert TransferState.PENDING not in states
        assert TransferState.FAILED in states, "the stopped peer's socket never filled"
        assert ended < 1.0 + LATE_BOUND, f"the stopped peer's transfers ended {ended - 1.0:.3f} s late"
        for t in to_stopped:
            if t.poll() == TransferState.FAILED:
                with pytest.raises(errors.TimeoutError):
                    t.wait()
    finally:
        stopped.close()
        healthy.close()
        a.close()
