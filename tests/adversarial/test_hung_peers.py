"""Hung (SIGSTOP) and killed peers: every transfer ends by its deadline plus a stated bound,
and a healthy peer served by the same engine is unaffected.

The bound asserted here (LATE_BOUND) is looser than the figure the design aims at (50 ms at
p99, measured by the `--figure` print below on an idle host) because CI shares 2 cores
between many processes; the test fails by seconds, not milliseconds, when a blocking step
is unbounded (the broken behaviour: PENDING until the peer resumes, or deadline + 1 s).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import numpy as np
import pytest
from target_process import Target, stop_process

import kvxfer
from kvxfer import Op, TransferState, errors

pytestmark = [pytest.mark.multiprocess]

LATE_BOUND = 0.25  # seconds after the deadline


def available(name: str) -> bool:
    return any(b.name == name and b.available for b in kvxfer.list_backends())


def end_times(transfers, limit: float) -> list[float]:
    """When each transfer left PENDING (monotonic), polled every millisecond."""
    ends = [None] * len(transfers)
    stop = time.monotonic() + limit
    while any(e is None for e in ends) and time.monotonic() < stop:
        now = time.monotonic()
        for i, t in enumerate(transfers):
            if ends[i] is None and t.poll() != TransferState.PENDING:
                ends[i] = now
        time.sleep(0.001)
    return ends


@pytest.mark.parametrize("backend", [b for b in ("shm", "tcp") if available(b)])
def test_stopped_peer_transfers_end_by_deadline_and_healthy_peer_is_unaffected(backend):
    eng = kvxfer.Engine("initiator", backends=[backend], timeout=30.0)
    hung = Target("hung", backend)
    healthy = Target("healthy", backend)
    try:
        src = np.random.default_rng(1).integers(0, 256, 1 << 16, dtype=np.uint8)
        rs = eng.register(src)
        hung_rid = hung.ask("register", 1 << 16, False, 0)
        ok_rid = healthy.ask("register", 1 << 16, False, 0)
        p_hung = eng.add_peer(hung.ask("descriptor"))
        p_ok = eng.add_peer(healthy.ask("descriptor"))
        stop_process(hung.pid)
        # Enough 60 KiB notifications to fill any socket buffer towards the stopped peer.
        note = b"n" * 60000
        ext = [[0, 4096]]
        deadline_s = 0.5
        hung_transfers, deadlines = [], []
        for _ in range(48):
            deadlines.append(time.monotonic() + deadline_s)
            hung_transfers.append(
                eng.post(
                    Op.WRITE,
                    p_hung,
                    rs,
                    hung_rid,
                    local_extents=ext,
                    remote_extents=ext,
                    notify=note,
                    timeout=deadline_s,
                )
            )
        # Meanwhile the healthy peer's transfers go through the same engine.
        healthy_transfers = []
        t0 = time.monotonic()
        for i in range(32):
            healthy_transfers.append(
                eng.post(
                    Op.WRITE,
                    p_ok,
                    rs,
                    ok_rid,
                    local_extents=[[i * 1024, 1024]],
                    remote_extents=[[i * 1024, 1024]],
                    notify=b"ok%d" % i,
                    timeout=5.0,
                )
            )
        for t in healthy_transfers:
            t.wait(10)
        healthy_elapsed = time.monotonic() - t0
        ends = end_times(hung_transfers, 10.0)
        assert all(e is not None for e in ends), "a transfer to the stopped peer never ended"
        late = sorted(e - d for e, d in zip(ends, deadlines, strict=True))
        p99 = late[int(0.99 * (len(late) - 1))]
        print(
            f"\n[figure] {backend}: lateness after deadline p50={late[len(late) // 2] * 1e3:.1f} ms "
            f"p99={p99 * 1e3:.1f} ms max={late[-1] * 1e3:.1f} ms; healthy peer 32 transfers "
            f"in {healthy_elapsed * 1e3:.0f} ms"
        )
        assert late[-1] <= LATE_BOUND, late
        for t in hung_transfers:
            assert t.poll() in (TransferState.DONE, TransferState.FAILED)
            if t.poll() == TransferState.FAILED:
                with pytest.raises(errors.TimeoutError):
                    t.wait()
        assert healthy_elapsed < deadline_s + 2.0
        assert healthy.ask("bytes", ok_rid, 0, 32 * 1024) == src[: 32 * 1024].tobytes()
        # Every memory reference is dropped soon after: nothing holds a worker.
        stop = time.monotonic() + 3
        while not all(t.quiesced for t in hung_transfers) and time.monotonic() < stop:
            time.sleep(0.01)
        assert all(t.quiesced for t in hung_transfers)
        os.kill(hung.pid, signal.SIGCONT)
    finally:
        hung.close()
        healthy.close()
        eng.close()


@pytest.mark.parametrize("backend", [b for b in ("shm", "tcp") if available(b)])
def test_killed_peer_fails_transfers_by_deadline(backend):
    eng = kvxfer.Engine("initiator", backends=[backend], timeout=30.0)
    victim = Target("victim", backend)
    try:
        src = np.ones(1 << 20, np.uint8)
        rs = eng.register(src)
        rid = victim.ask("register", 1 << 20, True, 0)
        peer = eng.add_peer(victim.ask("descriptor"))
        ext = [[0, 1 << 20]]
        eng.post(Op.WRITE, peer, rs, rid, local_extents=ext, remote_extents=ext).wait(10)
        os.kill(victim.pid, signal.SIGKILL)
        victim.proc.join(5)
        start = time.monotonic()
        outcomes = []
        for _ in range(8):
            try:
                t = eng.post(
                    Op.WRITE, peer, rs, rid, local_extents=ext, remote_extents=ext, notify=b"x", timeout=1.0
                )
                t.wait()
                outcomes.append("done")
            except (errors.PeerUnreachableError, errors.TimeoutError) as e:
                outcomes.append(type(e).__name__)
        assert "done" not in outcomes, outcomes
        assert time.monotonic() - start < 8 * (1.0 + LATE_BOUND)
    finally:
        victim.close()
        eng.close()


def test_wait_without_timeout_on_a_committing_transfer_reports_its_own_deadline():
    """tcp: END sent, ACK never comes (peer stopped). wait() with no timeout raises the
    transfer's own TimeoutError once it has ended, never 'gave up after 0 s' while PENDING."""
    if not available("tcp"):
        pytest.skip("this build has no tcp backend")
    eng = kvxfer.Engine("initiator", backends=["tcp"])
    hung = Target("hung", "tcp")
    try:
        src = np.ones(4096, np.uint8)
        rs = eng.register(src)
        rid = hung.ask("register", 4096, False, 0)
        peer = eng.add_peer(hung.ask("descriptor"))
        stop_process(hung.pid)
        ext = [[0, 4096]]
        t = eng.post(Op.WRITE, peer, rs, rid, local_extents=ext, remote_extents=ext, notify=b"x", timeout=0.3)
        results = []

        def waiter():
            try:
                t.wait()
            except errors.KvxferError as e:
                results.append((t.poll(), e))

        th = threading.Thread(target=waiter)
        th.start()
        th.join(5)
        assert results, "wait() did not return"
        state, err = results[0]
        assert state == TransferState.FAILED and isinstance(err, errors.TimeoutError)
        assert "0.000000" not in str(err)
        os.kill(hung.pid, signal.SIGCONT)
    finally:
        hung.close()
        eng.close()
