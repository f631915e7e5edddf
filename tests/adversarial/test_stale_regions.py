"""Stale descriptors and lifetimes: after the target deregisters a region, closes, or
registers the same memory again under a new id, a peer holding the old descriptor reaches
nothing; forged shm keys cannot redirect the initiator's writes. Every case checks the
target's bytes, not only the error.
"""

from __future__ import annotations

import multiprocessing as mp
import signal
import struct
import threading
import time

import numpy as np
import pytest
from target_process import Target

import kvxfer
from kvxfer import Op, errors

pytestmark = [pytest.mark.multiprocess]

SIZE = 1 << 16


def available(name: str) -> bool:
    return any(b.name == name and b.available for b in kvxfer.list_backends())


CASES = [(b, s) for b in ("shm", "tcp") if available(b) for s in (False, True)]


def ids(case):
    return f"{case[0]}-{'memfd' if case[1] else 'numpy'}"


class Setup:
    def __init__(self, backend: str, shareable: bool):
        self.eng = kvxfer.Engine("initiator", backends=[backend], timeout=10.0)
        self.target = Target("target", backend)
        self.src = np.full(SIZE, 0xEE, np.uint8)
        self.rs = self.eng.register(self.src)
        self.rid = self.target.ask("register", SIZE, shareable, 0x11)
        self.peer = self.eng.add_peer(self.target.ask("descriptor"))

    def write(self, rid, notify=b""):
        ext = [[0, SIZE]]
        return self.eng.post(
            Op.WRITE, self.peer, self.rs, rid, local_extents=ext, remote_extents=ext, notify=notify, timeout=5
        )

    def close(self):
        self.target.close()
        self.eng.close()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_write_after_deregister_never_lands(case):
    s = Setup(*case)
    try:
        s.target.ask("deregister", s.rid)
        with pytest.raises(errors.KvxferError):
            s.write(s.rid, notify=b"stale").wait()
        # The memory is still alive in the target (it keeps the buffer): untouched.
        assert s.target.ask("bytes", s.rid, 0, SIZE) == b"\x11" * SIZE
        assert s.target.ask("notifications") == []
    finally:
        s.close()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_old_region_id_never_reaches_a_new_registration_of_the_same_memory(case):
    s = Setup(*case)
    try:
        new_rid = s.target.ask("reregister_same_memory", s.rid)
        assert new_rid != s.rid
        with pytest.raises(errors.KvxferError):
            s.write(s.rid, notify=b"stale").wait()
        assert s.target.ask("bytes", new_rid, 0, SIZE) == b"\x11" * SIZE
        assert s.target.ask("notifications") == []
        # The fresh descriptor reaches the new registration.
        s.eng.add_peer(s.target.ask("descriptor"))
        s.write(new_rid).wait()
        assert s.target.ask("bytes", new_rid, 0, SIZE) == b"\xee" * SIZE
    finally:
        s.close()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_deregister_racing_a_stream_of_writes_ends_access_when_it_returns(case):
    """Lifetime race: the peer keeps writing while the target deregisters. In-flight writes
    finish or fail, and from the moment deregister() returns nothing lands."""
    s = Setup(*case)
    stop = threading.Event()
    outcomes = {"done": 0, "failed": 0}

    def writer():
        k = 0
        while not stop.is_set():
            k += 1
            s.src[:] = k % 250 + 1  # every write changes every byte it lands on
            try:
                s.write(s.rid).wait()
                outcomes["done"] += 1
            except errors.KvxferError:
                outcomes["failed"] += 1

    th = threading.Thread(target=writer)
    try:
        th.start()
        time.sleep(0.3)  # writes are flowing
        changed = s.target.ask("deregister_and_watch", s.rid, 0.5)
        stop.set()
        th.join(30)
        assert changed == 0, f"{changed} bytes changed after deregister() returned"
        assert outcomes["done"] > 0 and outcomes["failed"] > 0, outcomes
    finally:
        stop.set()
        s.close()


@pytest.mark.parametrize("case", CASES, ids=ids)
def test_nothing_lands_after_the_target_closed(case):
    s = Setup(*case)
    try:
        s.target.ask("close_engine")
        with pytest.raises(errors.KvxferError):
            s.write(s.rid, notify=b"late").wait()
        assert s.target.ask("bytes", s.rid, 0, SIZE) == b"\x11" * SIZE
    finally:
        s.close()


@pytest.mark.parametrize("backend", [b for b in ("shm", "tcp", "loopback") if available(b)])
def test_deregistered_local_region_no_longer_posts(backend):
    a = kvxfer.Engine("a", backends=[backend])
    b = kvxfer.Engine("b", backends=[backend])
    try:
        src = np.ones(4096, np.uint8)
        dst = np.zeros(4096, np.uint8)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        a.deregister(ra)
        with pytest.raises(errors.NotFoundError, match="deregistered"):
            a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[0, 8]], remote_extents=[[0, 8]])
        assert (dst == 0).all()
    finally:
        a.close()
        b.close()


def forged(descriptor: bytes, region_id: int, **changes) -> bytes:
    d = kvxfer._native.decode_descriptor(descriptor)
    for r in d["regions"]:
        if r["id"] == region_id:
            r.update({k: v for k, v in changes.items() if k != "key"})
            if "key" in changes:
                r["remote_keys"] = [changes["key"](k) for k in r["remote_keys"]]
    return kvxfer._native.encode_descriptor(d)


def _oversized_write(descriptor: bytes, region_id: int, length: int, conn) -> None:
    eng = kvxfer.Engine("liar-victim", backends=["shm"])
    src = np.full(length, 0xEE, np.uint8)
    rs = eng.register(src)
    try:
        peer = eng.add_peer(forged(descriptor, region_id, length=length))
        ext = [[length - 4096, 4096]]
        eng.post(Op.WRITE, peer, rs, region_id, local_extents=ext, remote_extents=ext).wait(10)
        conn.send("done")
    except kvxfer.KvxferError as e:
        conn.send(type(e).__name__)
    eng.close()


@pytest.mark.skipif(not available("shm"), reason="this build has no shm backend")
def test_shm_region_longer_than_its_memfd_is_refused_not_sigbus():
    target = Target("target", "shm")
    try:
        rid = target.ask("register", SIZE, True, 0x11)
        ctx = mp.get_context("spawn")
        parent, child = ctx.Pipe()
        p = ctx.Process(target=_oversized_write, args=(target.ask("descriptor"), rid, 64 * SIZE, child))
        p.start()
        p.join(60)
        assert p.exitcode != -signal.SIGBUS, "the initiator died of SIGBUS"
        assert p.exitcode == 0
        outcome = parent.recv()
        assert outcome != "done", "a write past the memfd's end was accepted"
        assert target.ask("bytes", rid, 0, SIZE) == b"\x11" * SIZE
    finally:
        target.close()


@pytest.mark.skipif(not available("shm"), reason="this build has no shm backend")
def test_shm_forged_memfd_key_cannot_aim_at_another_file_of_the_peer():
    eng = kvxfer.Engine("initiator", backends=["shm"])
    target = Target("target", "shm")
    try:
        src = np.full(SIZE, 0xEE, np.uint8)
        rs = eng.register(src)
        rid = target.ask("register", SIZE, True, 0x11)
        fd = target.ask("open_file", SIZE)

        def aim(key: bytes) -> bytes:
            # A key that carries the owner's fd number (version 1) is aimed at the file; a
            # key that only names an export slot (version 2) is aimed at the neighbouring slot.
            if key and key[0] == 1 and len(key) >= 13:
                return key[:1] + struct.pack("<i", fd) + key[5:]
            if key and key[0] == 2 and len(key) == 13:
                return key[:1] + struct.pack("<I", struct.unpack_from("<I", key, 1)[0] + 1) + key[5:]
            return key

        ext = [[0, SIZE]]
        try:
            peer = eng.add_peer(forged(target.ask("descriptor"), rid, key=aim))
            eng.post(Op.WRITE, peer, rs, rid, local_extents=ext, remote_extents=ext).wait(10)
        except kvxfer.KvxferError:
            pass
        assert target.ask("file_bytes", fd, SIZE) == b"\0" * SIZE, "the write landed in the peer's file"
    finally:
        target.close()
        eng.close()


@pytest.mark.skipif(not available("shm"), reason="this build has no shm backend")
def test_shm_forged_base_address_cannot_aim_outside_the_exported_region():
    """A descriptor whose region names other addresses of the peer (numpy memory, reached by
    cross-memory attach) is refused: the target's own export table is what counts."""
    eng = kvxfer.Engine("initiator", backends=["shm"])
    target = Target("target", "shm")
    try:
        src = np.full(SIZE, 0xEE, np.uint8)
        rs = eng.register(src)
        rid = target.ask("register", 2 * SIZE, False, 0x11)
        d = kvxfer._native.decode_descriptor(target.ask("descriptor"))
        base = next(r["base_address"] for r in d["regions"] if r["id"] == rid)
        ext = [[0, SIZE]]
        with pytest.raises(errors.BadDescriptorError, match="does not match what the peer exports"):
            peer = eng.add_peer(forged(target.ask("descriptor"), rid, base_address=base + SIZE, length=SIZE))
            eng.post(Op.WRITE, peer, rs, rid, local_extents=ext, remote_extents=ext).wait(10)
        assert target.ask("bytes", rid, 0, 2 * SIZE) == b"\x11" * (2 * SIZE)
    finally:
        target.close()
        eng.close()


def test_non_utf8_notification_never_hides_the_legitimate_ones():
    a = kvxfer.Engine(b"\xff\xfeodd".decode("latin-1"), backends=["loopback"])
    b = kvxfer.Engine("b", backends=["loopback"])
    try:
        peer = a.add_peer(b.descriptor())
        a.notify(peer, b"\xff\x00payload")
        notes = b.notifications()
        assert len(notes) == 1 and notes[0].payload == b"\xff\x00payload"
        assert isinstance(notes[0].peer, str)
    finally:
        a.close()
        b.close()
