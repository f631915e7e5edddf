"""Bounded resources: a receiver that never takes its notifications does not grow without
limit (64 MiB or 65536 notifications queued), and its senders see a typed back-pressure
error or wait, never a silent loss: every notification of a DONE transfer arrives once the
receiver takes its queue."""

from __future__ import annotations

import time

import numpy as np
import pytest
from notify_checks import FIT, NOTE, assert_full_queue_holds_posts_back_without_loss, numbered, numbers

import kvxfer
from kvxfer import Op, errors


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
                a.notify(peer, numbered(i))
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
        assert numbers(notes) == list(range(FIT))
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
        assert_full_queue_holds_posts_back_without_loss(a, b, timeout=2.0, settle=15, drain=10, poll=0.01)
    finally:
        a.close()
        b.close()


@pytest.mark.skipif(not available("tcp"), reason="this build has no tcp backend")
def test_tcp_target_threads_do_not_grow_with_connected_peers():
    """200 authenticated idle peers and 8 busy ones: the target's threads stay flat (idle
    connections are parked, workers serve only busy ones), and every busy peer's bytes are
    exact."""
    import os

    from hostile import HostileClient, tcp_port

    target = kvxfer.Engine("target", backends=["tcp"])
    pools = [np.zeros(1 << 20, np.uint8) for _ in range(8)]
    regions = [target.register(p) for p in pools]
    desc = target.descriptor()
    before = len(os.listdir("/proc/self/task"))
    idle = []
    senders = []
    try:
        for i in range(200):
            c = HostileClient(tcp_port(desc), timeout=30)
            assert c.authenticate(desc, initiator=10_000 + i, link=i + 1) == 0
            idle.append(c)
        time.sleep(0.3)
        grown = len(os.listdir("/proc/self/task")) - before
        assert grown <= 4, f"{grown} threads for 200 idle peers"
        transfers = []
        for i in range(8):
            eng = kvxfer.Engine(f"busy-{i}", backends=["tcp"])
            src = np.full(1 << 20, i + 1, np.uint8)
            rs = eng.register(src)
            peer = eng.add_peer(desc)
            ext = [[0, 1 << 20]]
            senders.append((eng, src, rs))
            transfers.append(
                eng.post(Op.WRITE, peer, rs, regions[i].id, local_extents=ext, remote_extents=ext)
            )
        for t in transfers:
            t.wait(30)
        assert all((pools[i] == i + 1).all() for i in range(8))
    finally:
        for c in idle:
            c.close()
        for eng, _, _ in senders:
            eng.close()
        target.close()


@pytest.mark.skipif(not available("fault"), reason="this build has no fault backend")
def test_transfers_in_flight_to_one_peer_are_bounded():
    """A peer that never completes anything (the fault backend's hang): after 65536
    transfers in flight to it, the next post raises BackPressureError instead of queueing
    without bound; once they end (cancel), posting works again."""
    cfg = kvxfer.EngineConfig()
    cfg.backend.fault.script = "hang"
    a = kvxfer.Engine("ha", backends=["fault"], config=cfg)
    b = kvxfer.Engine("hb", backends=["fault"])
    try:
        src, dst = np.zeros(64, np.uint8), np.zeros(64, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        ext = [[0, 8]]
        hung = []
        with pytest.raises(errors.BackPressureError, match="in flight"):
            for _ in range(70000):
                hung.append(a.post(Op.WRITE, peer, ra, rb.id, local_extents=ext, remote_extents=ext))
        assert len(hung) == 65536
        for t in hung:
            t.cancel()
        stop = time.monotonic() + 30
        while not all(t.quiesced for t in hung[-10:]) and time.monotonic() < stop:
            time.sleep(0.01)
        a.post(Op.WRITE, peer, ra, rb.id, local_extents=ext, remote_extents=ext).cancel()
    finally:
        a.close()
        b.close()
