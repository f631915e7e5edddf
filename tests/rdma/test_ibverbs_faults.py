"""ibverbs fault handling with forged descriptors: the NIC, not kvxfer's validation, must
stop accesses outside a peer's registered memory, and the connection must recover.

The forged regions are added under new region ids with the target's real instance id, so
add_peer refreshes the existing peer in place and imports them next to the real ones."""

from __future__ import annotations

import gc

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer
import kvxfer._native as native

pytestmark = pytest.mark.rdma
h.require_rdma()

REGION = 1 << 20  # the target's registered region
GUARD = 64 << 10  # unregistered bytes on both sides of it (same numpy buffer)
FILL = 0x5A


class Scene:
    def __init__(self):
        self.a = h.make_engine("fault-init")
        self.b = h.make_engine("fault-target")
        self.src = h.random_bytes(REGION, 30)
        self.ra = self.a.register(self.src)
        self.backing = np.full(GUARD + REGION + GUARD, FILL, dtype=np.uint8)
        self.rb = self.b.register(self.backing[GUARD : GUARD + REGION])
        self.peer = self.a.add_peer(self.b.descriptor())

    def forge(self, region_id: int, **changes) -> int:
        """Adds a copy of the target's region under `region_id` with fields changed."""
        d = native.decode_descriptor(self.b.descriptor())
        real = next(r for r in d["regions"] if r["id"] == self.rb.id)
        fake = dict(real)
        fake["id"] = region_id
        fake.update(changes)
        d["regions"].append(fake)
        assert self.a.add_peer(native.encode_descriptor(d)) is self.peer  # refreshed in place
        return region_id

    def real_key(self) -> tuple[int, int]:
        d = native.decode_descriptor(self.b.descriptor())
        real = next(r for r in d["regions"] if r["id"] == self.rb.id)
        key = real["remote_keys"][0]
        return int.from_bytes(key[0:4], "little"), int.from_bytes(key[4:12], "little")

    def write(self, remote_region: int, remote_offset: int, length: int, local_offset: int = 0, **kw):
        return self.a.post(
            kvxfer.Op.WRITE,
            self.peer,
            self.ra,
            remote_region,
            local_extents=np.array([[local_offset, length]], dtype=np.uint64),
            remote_extents=np.array([[remote_offset, length]], dtype=np.uint64),
            **kw,
        )

    def assert_guards_intact(self):
        assert np.all(self.backing[:GUARD] == FILL), "bytes before the registered region changed"
        assert np.all(self.backing[GUARD + REGION :] == FILL), "bytes after the registered region changed"

    def assert_still_works(self, tag: int):
        """The same peer (connection repaired) and another peer both work after a fault."""
        t = self.write(self.rb.id, 4096 * tag, 4096, local_offset=8192, notify=b"ok")
        t.wait(h.TIMEOUT)
        assert np.array_equal(
            self.backing[GUARD + 4096 * tag : GUARD + 4096 * (tag + 1)], self.src[8192:12288]
        )
        assert self.b.wait_for_notifications(1, h.TIMEOUT)[0].payload == b"ok"
        c = h.make_engine(f"fault-other-{tag}")
        mc = np.zeros(REGION, np.uint8)
        rc = c.register(mc)
        pc = self.a.add_peer(c.descriptor())
        self.a.post(
            kvxfer.Op.WRITE,
            pc,
            self.ra,
            rc.id,
            local_extents=np.array([[0, REGION]], dtype=np.uint64),
            remote_extents=np.array([[0, REGION]], dtype=np.uint64),
        ).wait(h.TIMEOUT)
        assert np.array_equal(mc, self.src)
        self.a.remove_peer(c.name)
        c.close()

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def scene():
    s = Scene()
    yield s
    s.close()


def test_enlarged_region_write_past_the_end_is_a_remote_access_error(scene):
    fake = scene.forge(1000, length=REGION + GUARD)
    # 8 KiB starting 4 KiB before the end: half inside, half in the guard.
    t = scene.write(fake, REGION - 4096, 8192, timeout=30.0)
    with pytest.raises(kvxfer.errors.RemoteError) as err:
        t.wait(h.TIMEOUT)
    assert "remote access error" in str(err.value).lower(), err.value
    assert t.quiesced
    scene.assert_guards_intact()
    # Entirely outside, READ as well.
    t = scene.write(fake, REGION + 100, 4096)
    with pytest.raises(kvxfer.errors.RemoteError):
        t.wait(h.TIMEOUT)
    t = scene.a.post(
        kvxfer.Op.READ,
        scene.peer,
        scene.ra,
        fake,
        local_extents=np.array([[0, 4096]], dtype=np.uint64),
        remote_extents=np.array([[REGION + 4096, 4096]], dtype=np.uint64),
    )
    with pytest.raises(kvxfer.errors.RemoteError):
        t.wait(h.TIMEOUT)
    scene.assert_guards_intact()
    scene.assert_still_works(1)


def test_innocent_transfers_survive_a_neighbours_remote_fault(scene):
    # A faulting transfer between good ones on the same connection: only it fails; the
    # flushed work requests of the others are posted again on the repaired queue pairs.
    fake = scene.forge(1001, length=REGION + GUARD)
    good = [scene.write(scene.rb.id, i * 65536, 65536, local_offset=i * 65536) for i in range(6)]
    bad = scene.write(fake, REGION, 65536)
    good += [scene.write(scene.rb.id, i * 65536, 65536, local_offset=i * 65536) for i in range(6, 12)]
    with pytest.raises(kvxfer.errors.RemoteError):
        bad.wait(h.TIMEOUT)
    for t in good:
        t.wait(h.TIMEOUT)
    assert np.array_equal(scene.backing[GUARD : GUARD + 12 * 65536], scene.src[: 12 * 65536])
    scene.assert_guards_intact()


def test_forged_rkey_fails(scene):
    rkey, addr = scene.real_key()
    forged = (rkey ^ 0x00A5A500).to_bytes(4, "little") + addr.to_bytes(8, "little")
    fake = scene.forge(1002, remote_keys=[forged])
    t = scene.write(fake, 0, 4096)
    with pytest.raises(kvxfer.errors.RemoteError):
        t.wait(h.TIMEOUT)
    assert np.all(scene.backing[GUARD : GUARD + 4096] == FILL)
    scene.assert_still_works(2)


def test_forged_address_below_the_region_fails(scene):
    rkey, addr = scene.real_key()
    fake = scene.forge(1003, remote_keys=[rkey.to_bytes(4, "little") + (addr - GUARD).to_bytes(8, "little")])
    t = scene.write(fake, 0, 8192)
    with pytest.raises(kvxfer.errors.RemoteError):
        t.wait(h.TIMEOUT)
    scene.assert_guards_intact()
    scene.assert_still_works(3)


def test_stale_rkey_of_a_deregistered_region_fails(scene):
    other = np.full(REGION, FILL, dtype=np.uint8)
    r2 = scene.b.register(other)
    peer = scene.a.add_peer(scene.b.descriptor())
    rid = r2.id
    scene.write(rid, 0, 4096).wait(h.TIMEOUT)  # valid while registered
    assert np.array_equal(other[:4096], scene.src[:4096])
    other[:] = FILL
    scene.b.deregister(r2)
    del r2
    gc.collect()  # the Region goes: its MR is deregistered, the initiator still holds the rkey
    assert peer is scene.peer
    t = scene.write(rid, 0, 4096)
    with pytest.raises(kvxfer.errors.RemoteError):
        t.wait(h.TIMEOUT)
    assert np.all(other == FILL), "a deregistered region was written"
    scene.assert_still_works(4)


def test_malformed_remote_key_is_a_bad_descriptor(scene):
    d = native.decode_descriptor(scene.b.descriptor())
    fake = dict(d["regions"][0])
    fake["id"] = 1004
    fake["remote_keys"] = [b"\x01\x02\x03"]
    d["regions"].append(fake)
    with pytest.raises(kvxfer.errors.BadDescriptorError, match="remote key"):
        scene.a.add_peer(native.encode_descriptor(d))
