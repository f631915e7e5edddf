"""No kvxfer thread outlives its engine. Each CPU backend's engines start native threads
(deadline timer, copy pool, listener, notifier, senders...); close() joins them all before
it returns (the application may still hold every object), and they are joined once the
application has let go of an engine it never closed, also when the last reference goes
while a transfer is still in flight (then on one of the engine's own threads, and the
engine is destroyed on another), so that none runs on while the process exits (OpenSSL's
exit cleanup freed its locks under such a thread: commit 371f301).

Threads are counted in /proc/self/task, less the Python threads (threading.enumerate)."""

from __future__ import annotations

import gc
import os
import threading
import time

import numpy as np
import pytest
from kvxfer_testlib import IN_PROCESS, Pair, dense_layout

from kvxfer import Op, TransferState


def native_threads() -> set[int]:
    """Thread ids of this process that Python did not start (the main thread excluded)."""
    python = {t.native_id for t in threading.enumerate()}
    return {int(t) for t in os.listdir("/proc/self/task")} - python - {os.getpid()}


def left_over(before: set[int], within: float = 10.0, collect: bool = True) -> set[int]:
    """Threads started since `before` that are still alive after `within` seconds."""
    stop = time.monotonic() + within
    while True:
        if collect:
            gc.collect()
        extra = native_threads() - before
        if not extra or time.monotonic() >= stop:
            return extra
        time.sleep(0.02)


@pytest.mark.parametrize("backend", IN_PROCESS)
def test_threads_end_when_a_closed_engine_is_released(backend):
    before = native_threads()
    pair = Pair(backend, dense_layout())
    started = native_threads() - before
    assert started, f"{backend}: the engines started no native thread, so this test checks nothing"
    ids = np.arange(8)
    t = pair.a.post(Op.WRITE, pair.peer, pair.ra, pair.rb.id, local_blocks=ids, notify=b"done")
    assert t.wait(60) == TransferState.DONE
    (note,) = pair.b.wait_for_notifications(1, timeout=10)
    assert note.payload == b"done"
    pair.close()
    del t, pair, note
    assert not left_over(before), f"{backend}: threads outlived the closed, released engines"


@pytest.mark.parametrize("backend", IN_PROCESS)
def test_close_alone_joins_every_thread(backend):
    """close() returns only once every native thread of the engine has ended: no waiting,
    no garbage collection, every object still held; transfers it cut short have ended and
    their backend has let go of them."""
    before = native_threads()
    pair = Pair(backend, dense_layout(blocks=256, block_bytes=4096))
    assert native_threads() - before, f"{backend}: the engines started no native thread"
    ids = np.arange(256)
    moving = [
        pair.a.post(Op.WRITE, pair.peer, pair.ra, pair.rb.id, local_blocks=ids, notify=b"%d" % i)
        for i in range(16)
    ]
    pair.close()
    # No garbage collection and no release: only the short grace the kernel takes to drop a
    # joined thread's /proc entry (it wakes the joiner first).
    left = left_over(before, within=2.0, collect=False)
    assert not left, f"{backend}: {len(left)} native threads still run right after close()"
    for t in moving:
        assert t.state != TransferState.PENDING
        assert t.quiesced, f"{backend}: a backend still holds a transfer after close()"
    pair.a.close()  # idempotent
    assert not left_over(before, within=2.0, collect=False)


@pytest.mark.parametrize("close", [True, False], ids=["closed", "dropped"])
@pytest.mark.parametrize("backend", IN_PROCESS)
def test_threads_end_when_released_with_transfers_in_flight(backend, close):
    """The application drops everything without waiting (after close(), or leaving the close
    to garbage collection): the last reference may go on a backend thread (a job ending),
    which must not leave that thread running."""
    before = native_threads()
    pair = Pair(backend, dense_layout(blocks=256, block_bytes=4096))
    ids = np.arange(256)
    for i in range(16):
        pair.a.post(Op.WRITE, pair.peer, pair.ra, pair.rb.id, local_blocks=ids, notify=b"%d" % i)
    if close:
        pair.close()
    del pair
    assert not left_over(before), f"{backend}: threads outlived engines released with transfers in flight"
