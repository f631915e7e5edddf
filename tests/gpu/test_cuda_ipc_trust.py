"""The same-host notification socket (util/notify_socket.h), which cuda_ipc shares with shm:
a local client without the descriptor's secret can neither connect nor inject, a message in
cuda_ipc's old unauthenticated format is refused, and a receiver whose notification queue
is full holds senders back (their notify() ends TimeoutError) without losing one.

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
        for first in (forged, b"N" + b"x" * 10, b"\0" * 64):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            s.settimeout(2)
            try:
                s.connect(b"\0" + name)
                for _ in range(3):
                    try:
                        s.send(first)
                    except OSError:
                        break
                time.sleep(0.2)
            finally:
                s.close()
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
        # The engine still serves an honest peer.
        with kvxfer.Engine("honest", backends=[backend]) as other:
            peer = other.add_peer(eng.descriptor())
            other.notify(peer, b"hi")
            (note,) = eng.wait_for_notifications(1, timeout=10)
            assert (note.peer, note.payload) == ("honest", b"hi")


NOTE = 60 * 1024  # 64 MiB / 60 KiB = 1118 notifications fit in the engine's queue
FIT = (64 << 20) // NOTE


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
                a.notify(peer, i.to_bytes(4, "little") + bytes(NOTE - 4), timeout=0.5)
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
            got += [int.from_bytes(n.payload[:4], "little") for n in b.notifications()]
            time.sleep(0.01)
        # Nothing sent was lost, none twice; a timed-out notify() may still have gone out.
        assert set(sent) <= set(got) and len(got) == len(set(got))
