"""Core v2 from Python: one transfer across many regions, notification-only transfers,
keyed notifications, asyncio without threads, typed configuration and its environment
overlay, memory kinds, telemetry, and the fault backend driving deadlines."""

from __future__ import annotations

import asyncio
import os
import threading
import time

import numpy as np
import pytest
from kvxfer_testlib import IN_PROCESS

import kvxfer
from kvxfer import MemoryKind, Op, Part, TransferState, errors


def engine_pair(backend: str, **kw):
    a = kvxfer.Engine("v2a", backends=[backend], timeout=60.0, **kw)
    b = kvxfer.Engine("v2b", backends=[backend], timeout=60.0)
    return a, b


def os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


def test_one_transfer_across_a_region_group_is_byte_exact(backend):
    """vLLM-style: one region per layer for K and one for V (here 16 x 2), the same block
    ids moved in every region by one transfer, one notification after all of them."""
    layout = kvxfer.KvLayout(num_blocks=64, block_bytes=1024)
    rng = np.random.default_rng(7)
    a, b = engine_pair(backend)
    try:
        srcs = [rng.integers(0, 256, 64 * 1024, dtype=np.uint8) for _ in range(32)]
        dsts = [np.zeros(64 * 1024, np.uint8) for _ in range(32)]
        ga, gb = a.register_group(srcs, layout), b.register_group(dsts, layout)
        peer = a.add_peer(b.descriptor())
        local_ids = rng.permutation(64)[:40]
        remote_ids = rng.permutation(64)[:40]
        t = a.post(
            Op.WRITE, peer, ga, gb.ids, local_blocks=local_ids, remote_blocks=remote_ids, notify=b"req-g"
        )
        assert t.plan["parts"] == 32 and t.plan["bytes"] == 32 * 40 * 1024
        note = b.wait_notification(b"req-g", timeout=60)
        # Every byte of every region is in place when the notification is visible.
        for s, d in zip(srcs, dsts, strict=True):
            for li, ri in zip(local_ids, remote_ids, strict=True):
                assert d[ri * 1024 : (ri + 1) * 1024].tobytes() == s[li * 1024 : (li + 1) * 1024].tobytes()
        assert note.peer == "v2a"
        assert t.wait(60) == TransferState.DONE
        tele = t.telemetry
        assert tele["parts"] == 32 and tele["bytes"] == t.bytes and tele["total_s"] >= tele["data_s"] >= 0
        with pytest.raises(errors.InvalidArgumentError, match="as many remote region ids"):
            a.post(Op.WRITE, peer, ga, gb.ids[:3], local_blocks=local_ids)
    finally:
        a.close()
        b.close()


def test_notification_only_transfer_and_parts_api(backend):
    a, b = engine_pair(backend)
    try:
        src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        t = a.post_parts(Op.WRITE, peer, [], notify=b"prefix-hit")  # nothing to move
        assert t.wait(30) == TransferState.DONE and t.bytes == 0
        assert b.wait_notification(b"prefix-hit", 30).payload == b"prefix-hit"
        parts = [
            Part(ra, rb.id, local_extents=[[0, 1024]], remote_extents=[[2048, 1024]]),
            Part(ra, rb.id, local_extents=[[1024, 512]], remote_extents=[[0, 512]]),
        ]
        a.post_parts(Op.WRITE, peer, parts, notify=b"two").wait(30)
        assert (
            dst[2048:3072].tobytes() == src[0:1024].tobytes()
            and dst[0:512].tobytes() == src[1024:1536].tobytes()
        )
        with pytest.raises(errors.InvalidArgumentError, match="at least one part or a notification"):
            a.post_parts(Op.WRITE, peer, [])
    finally:
        a.close()
        b.close()


def test_keyed_notifications_do_not_steal_each_other(backend):
    a, b = engine_pair(backend)
    try:
        peer = a.add_peer(b.descriptor())
        for key in (b"req-1", b"req-2", b"req-3"):
            a.notify(peer, key)
        assert b.wait_notification(b"req-2", 30).payload == b"req-2"
        assert [n.payload for n in b.wait_for_notifications(2, 30)] == [b"req-1", b"req-3"]
        with pytest.raises(errors.WaitTimeoutError):
            b.wait_notification(b"never", timeout=0.05)
        # Threads waiting for different keys each get theirs.
        got: dict[bytes, bytes] = {}

        def waiter(k: bytes) -> None:
            got[k] = b.wait_notification(k, 30).payload

        threads = [threading.Thread(target=waiter, args=(k,)) for k in (b"x", b"y", b"z")]
        for th in threads:
            th.start()
        for k in (b"z", b"y", b"x"):
            a.notify(peer, k)
        for th in threads:
            th.join(30)
        assert got == {b"x": b"x", b"y": b"y", b"z": b"z"}
    finally:
        a.close()
        b.close()


@pytest.mark.parametrize("backend", [b for b in IN_PROCESS if b in ("loopback", "shm", "tcp")])
def test_a_thousand_transfers_awaited_from_one_loop_without_threads(backend):
    a, b = engine_pair(backend)
    try:
        layout = kvxfer.KvLayout(num_blocks=1000, block_bytes=256)
        src = np.random.default_rng(3).integers(0, 256, 1000 * 256, dtype=np.uint8)
        dst = np.zeros_like(src)
        ra, rb = a.register(src, layout), b.register(dst, layout)
        peer = a.add_peer(b.descriptor())

        async def main() -> list:
            before_py, before_os = threading.active_count(), os_threads()
            transfers = [a.write(peer, ra, rb.id, [i], notify=f"n{i}".encode()) for i in range(1000)]
            states = await asyncio.gather(*transfers)
            notes = [await b.notification(f"n{i}".encode()) for i in (0, 999)]
            # No thread per waiter: the loop waits on the engine's completion fd.
            assert threading.active_count() == before_py
            assert os_threads() <= before_os + 2, (before_os, os_threads())
            return [states, notes]

        states, notes = asyncio.run(main())
        assert all(s == TransferState.DONE for s in states) and len(states) == 1000
        assert [n.payload for n in notes] == [b"n0", b"n999"]
        assert dst.tobytes() == src.tobytes()
    finally:
        a.close()
        b.close()


def test_async_notifications_iterator_and_failed_await():
    script = kvxfer.EngineConfig()
    script.backend.fault.script = "fail@2=REMOTE"
    a = kvxfer.Engine("fa", backends=["fault"], config=script)
    b = kvxfer.Engine("fb", backends=["fault"])
    try:
        src, dst = np.arange(256, dtype=np.uint8), np.zeros(256, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())

        async def main() -> list[bytes]:
            ok = a.post(
                Op.WRITE, peer, ra, rb.id, local_extents=[[0, 256]], remote_extents=[[0, 256]], notify=b"a"
            )
            bad = a.post(
                Op.WRITE, peer, ra, rb.id, local_extents=[[0, 16]], remote_extents=[[0, 16]], notify=b"b"
            )
            assert await ok == TransferState.DONE
            with pytest.raises(errors.RemoteError, match="injected"):
                await bad
            a.notify(peer, b"c")
            seen = []
            async for note in b.notifications_async():
                seen.append(note.payload)
                if len(seen) == 2:
                    break
            return seen

        assert asyncio.run(main()) == [b"a", b"c"]  # the failed transfer notified nobody
    finally:
        a.close()
        b.close()


def test_fault_backend_hang_ends_by_deadline_and_wait_timeout_is_not_failure():
    cfg = kvxfer.EngineConfig()
    cfg.backend.fault.script = "hang@1;delay@2=300"
    a = kvxfer.Engine("ha", backends=["fault"], config=cfg)
    b = kvxfer.Engine("hb", backends=["fault"])
    try:
        src, dst = np.arange(4096, dtype=np.uint8), np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        t0 = time.monotonic()
        hung = a.post(
            Op.WRITE, peer, ra, rb.id, local_extents=[[0, 4096]], remote_extents=[[0, 4096]], timeout=0.2
        )
        with pytest.raises(errors.TimeoutError) as ei:
            hung.wait()
        assert not isinstance(ei.value, errors.WaitTimeoutError)  # the transfer itself failed
        assert 0.2 <= time.monotonic() - t0 < 0.2 + 0.15
        slow = a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[0, 4096]], remote_extents=[[0, 4096]])
        with pytest.raises(errors.WaitTimeoutError, match="still pending"):
            slow.wait(0.02)
        assert slow.state == TransferState.PENDING
        assert slow.wait(10) == TransferState.DONE and dst.tobytes() == src.tobytes()
    finally:
        a.close()
        b.close()


def test_typed_config_and_environment_overlay(monkeypatch):
    names = dict(kvxfer.environment_variables())
    assert names["KVXFER_TCP_LISTEN"] == "backend.tcp.listen"
    assert names["KVXFER_IBVERBS_DEVICE"] == "backend.ibverbs.device"
    assert "KVXFER_FAULT_SCRIPT" in names
    monkeypatch.setenv("KVXFER_FAULT_SCRIPT", "explode")
    with pytest.raises(errors.InvalidArgumentError, match="fault script"):
        kvxfer.Engine("x", backends=["fault"])
    monkeypatch.setenv("KVXFER_SHM_THREADS", "-2")
    with pytest.raises(errors.InvalidArgumentError, match="KVXFER_SHM_THREADS"):
        kvxfer.Engine("x", backends=["loopback"])
    monkeypatch.delenv("KVXFER_SHM_THREADS")
    monkeypatch.delenv("KVXFER_FAULT_SCRIPT")
    cfg = kvxfer.EngineConfig(timeout=-1)
    with pytest.raises(errors.InvalidArgumentError, match="timeout"):
        kvxfer.Engine("x", config=cfg)
    with pytest.raises(errors.InvalidArgumentError, match="list of names"):
        kvxfer.Engine("x", backends="shm")


def test_memory_kinds_are_published():
    a = kvxfer.Engine("mk", backends=["shm"])
    try:
        host = a.register(np.zeros(4096, np.uint8))
        shareable = a.register(kvxfer.empty(4096))
        assert host.kind == MemoryKind.HOST and shareable.kind == MemoryKind.HOST_SHAREABLE
        regions = {r["id"]: r for r in kvxfer._native.decode_descriptor(a.descriptor())["regions"]}
        assert regions[shareable.id]["kind"] == MemoryKind.HOST_SHAREABLE
        caps = a.backend_caps()["shm"]
        assert "host" in caps["memory_kinds"] and "cuda" not in caps["memory_kinds"]
        with pytest.raises(errors.UnsupportedError, match="cuda memory"):
            a.register_ptr(host.address, 4096, kind=MemoryKind.CUDA, device=0)
    finally:
        a.close()
