"""Hostile-client checks on notifications that several backends' tests share (shm here,
cuda_ipc in tests/gpu, ibverbs in tests/rdma): one body each, the backend's bounds passed in.

Import from another test folder with ``sys.path.insert(0, <tests/adversarial>)``."""

from __future__ import annotations

import socket
import time

import numpy as np
import pytest

import kvxfer
from kvxfer import Op, TransferState, errors

NOTE = 60 * 1024  # bytes per notification: 64 MiB / 60 KiB = 1118 fit in the engine's queue
FIT = (64 << 20) // NOTE


def numbered(i: int) -> bytes:
    """A NOTE-byte notification payload that starts with `i` (u32 little-endian)."""
    return i.to_bytes(4, "little") + bytes(NOTE - 4)


def numbers(notes) -> list[int]:
    return [int.from_bytes(n.payload[:4], "little") for n in notes]


def send_unauthenticated(name: bytes, payloads) -> None:
    """One connection per payload to the abstract SOCK_SEQPACKET socket @`name`, the payload
    sent up to three times (until the engine closes the connection); no handshake."""
    for payload in payloads:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(2)
        try:
            s.connect(b"\0" + name)
            for _ in range(3):
                try:
                    s.send(payload)
                except OSError:
                    break
            time.sleep(0.2)
        finally:
            s.close()


def assert_serves_honest_peer(eng, backend: str, timeout: float) -> None:
    """`eng` still takes a notification from a peer that proves its descriptor's secret."""
    with kvxfer.Engine("honest", backends=[backend]) as other:
        peer = other.add_peer(eng.descriptor())
        other.notify(peer, b"hi")
        (note,) = eng.wait_for_notifications(1, timeout=timeout)
        assert (note.peer, note.payload) == ("honest", b"hi")


def assert_full_queue_holds_posts_back_without_loss(
    a, b, *, timeout: float, settle: float, drain: float, poll: float
) -> None:
    """Engine `a` posts FIT + 200 small WRITEs to `b`, each with a numbered NOTE-byte
    notification and `timeout`, while `b` takes none: every transfer ends within `settle`
    seconds, some are held back (FAILED with TimeoutError), and once `b` takes its queue
    (within `drain` seconds) every DONE transfer's notification arrives, none twice (a
    transfer that timed out while committing may have sent its own)."""
    src = np.full(4096, 7, np.uint8)
    dst = np.zeros(4096, np.uint8)
    ra, rb = a.register(src), b.register(dst)
    peer = a.add_peer(b.descriptor())
    ext = [[0, 64]]
    transfers = [
        a.post(
            Op.WRITE,
            peer,
            ra,
            rb.id,
            local_extents=ext,
            remote_extents=ext,
            notify=numbered(i),
            timeout=timeout,
        )
        for i in range(FIT + 200)
    ]
    stop = time.monotonic() + settle
    while any(t.poll() == TransferState.PENDING for t in transfers) and time.monotonic() < stop:
        time.sleep(poll)
    states = [t.poll() for t in transfers]
    assert TransferState.PENDING not in states
    done = [i for i, s in enumerate(states) if s == TransferState.DONE]
    assert len(done) < len(transfers), "the receiver's queue bound never held a sender back"
    maybe = set()  # timed out while committing: the notification may have gone out
    for i, t in enumerate(transfers):
        if t.poll() == TransferState.FAILED:
            with pytest.raises(errors.TimeoutError) as e:
                t.wait()
            if "may have received" in str(e.value):
                maybe.add(i)
    # Everything a DONE transfer sent arrives once the reader takes its queue.
    got: list[int] = []
    stop = time.monotonic() + drain
    while not set(done) <= set(got) and time.monotonic() < stop:
        got += numbers(b.notifications())
        time.sleep(poll)
    assert set(done) <= set(got) <= set(done) | maybe
    assert len(got) == len(set(got))  # none twice
