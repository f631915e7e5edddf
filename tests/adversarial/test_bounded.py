"""Bounded resources: a receiver that never takes its notifications does not grow without
limit (64 MiB or 65536 notifications queued), and its senders see a typed back-pressure
error or wait, never a silent loss: every notification of a DONE transfer arrives once the
receiver takes its queue."""

from __future__ import annotations

import time

import numpy as np
import pytest

import kvxfer
from kvxfer import Op, TransferState, errors

NOTE = 60 * 1024  # bytes per notification: 64 MiB / 60 KiB = 1118 fit
FIT = (64 << 20) // NOTE


def available(name: str) -> bool:
    return any(b.name == name and b.available for b in kvxfer.list_backends())


@pytest.mark.parametrize("backend", [b for b in ("tcp", "loopback") if available(b)])
def test_full_notification_queue_fails_senders_with_back_pressure(backend):
    a = kvxfer.Engine("sender", backends=[backend])
    b = kvxfer.Engine("slow-reader", backends=[backend])
    try:
        src = np.full(4096, 7, np.uint8)
        dst = np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        sent = 0
        with pytest.raises(errors.BackPressureError, match="not taking them"):
            for i in range(FIT + 10):
                a.notify(peer, i.to_bytes(4, "little") + bytes(NOTE - 4))
                sent += 1
        assert sent == FIT
        # A transfer's bytes still land; its notification is refused with the typed error.
        ext = [[0, 4096]]
        t = a.post(Op.WRITE, peer, ra, rb.id, local_extents=ext, remote_extents=ext, notify=bytes(NOTE))
        with pytest.raises(errors.BackPressureError):
            t.wait(10)
        assert (dst == 7).all()
        assert errors.BackPressureError("x").retryable
        # Taking the queue makes room: nothing was lost, in order.
        notes = b.notifications()
        assert [int.from_bytes(n.payload[:4], "little") for n in notes] == list(range(FIT))
        a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[0, 8]], remote_extents=[[0, 8]], notify=b"y").wait(
            10
        )
        assert [n.payload for n in b.notifications()] == [b"y"]
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(not available("shm"), reason="this build has no shm backend")
def test_shm_reader_that_stops_taking_holds_senders_back_without_loss():
    a = kvxfer.Engine("sender", backends=["shm"])
    b = kvxfer.Engine("slow-reader", backends=["shm"])
    try:
        src = np.full(4096, 7, np.uint8)
        dst = np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        ext = [[0, 64]]
        transfers = []
        for i in range(FIT + 200):
            transfers.append(
                a.post(
                    Op.WRITE,
                    peer,
                    ra,
                    rb.id,
                    local_extents=ext,
                    remote_extents=ext,
                    notify=i.to_bytes(4, "little") + bytes(NOTE - 4),
                    timeout=2.0,
                )
            )
        stop = time.monotonic() + 15
        while any(t.poll() == TransferState.PENDING for t in transfers) and time.monotonic() < stop:
            time.sleep(0.01)
        states = [t.poll() for t in transfers]
        assert TransferState.PENDING not in states
        done = [i for i, s in enumerate(states) if s == TransferState.DONE]
        failed = [t for t in transfers if t.poll() == TransferState.FAILED]
        assert failed, "the receiver's queue bound never held a sender back"
        maybe = set()  # timed out while committing: the notification may have gone out
        for i, t in enumerate(transfers):
            if t.poll() == TransferState.FAILED:
                with pytest.raises(errors.TimeoutError) as e:
                    t.wait()
                if "may have received" in str(e.value):
                    maybe.add(i)
        # Everything a DONE transfer sent arrives once the reader takes its queue.
        got = []
        stop = time.monotonic() + 10
        while not set(done) <= set(got) and time.monotonic() < stop:
            got += [int.from_bytes(n.payload[:4], "little") for n in b.notifications()]
            time.sleep(0.01)
        assert set(done) <= set(got) <= set(done) | maybe
        assert len(got) == len(set(got))  # none twice
    finally:
        a.close()
        b.close()
