"""Interoperability with a plain-verbs peer (Debian's python3-pyverbs) that implements the
ibverbs backend's UD connection manager from its documented wire format:

(a) pyverbs connects to a kvxfer engine, RDMA-WRITEs into (and READs from) kvxfer-registered
    memory and SENDs a notification that kvxfer delivers;
(b) kvxfer adds the pyverbs "engine" from a descriptor built with encode_descriptor (its UD
    QPN/GID endpoint info and its MR rkey as the region key), then WRITEs and READs its memory
    and notifies it.
"""

from __future__ import annotations

import struct

import numpy as np
import pytest
import rdma_helpers as h

import kvxfer

pytestmark = pytest.mark.rdma
h.require_rdma()


@pytest.fixture(scope="module")
def pyverbs_peer(tmp_path_factory):
    import pyverbs_peer as pp

    try:
        pp.import_pyverbs(str(tmp_path_factory.mktemp("pv")))
    except ImportError as exc:
        pytest.fail(f"pyverbs is needed for the interop tests: {exc}")
    dev = h.rdma_devices()[0]
    peer = pp.PvPeer("pyverbs-peer", device=dev, gid_index=1 if dev == "rxe0" else 0)
    peer.start()
    yield peer
    peer.stop()


def test_pyverbs_writes_into_kvxfer_memory(pyverbs_peer):
    eng = h.make_engine("kv-target")
    mem = np.zeros(1 << 20, np.uint8)
    region = eng.register(mem)
    d = pyverbs_peer.connect(eng.descriptor())
    reg = next(r for r in d["regions"] if r["id"] == region.id)
    rkey, addr = struct.unpack("<IQ", reg["remote_keys"][0])
    assert addr == mem.ctypes.data
    payload = bytes(h.random_bytes(256 << 10, 40))
    pyverbs_peer.write_local(0, payload)
    for i, qp in enumerate((0, 1)):  # both RC QPs of the connection
        pyverbs_peer.rdma(
            "IBV_WR_RDMA_WRITE", i * (128 << 10), addr + 4096 + i * (128 << 10), rkey, 128 << 10, qp_index=qp
        )
    assert bytes(mem[4096 : 4096 + (256 << 10)]) == payload
    mem[1 << 19 : (1 << 19) + 8192] = h.random_bytes(8192, 41)
    pyverbs_peer.rdma("IBV_WR_RDMA_READ", 600 << 10, addr + (1 << 19), rkey, 8192)
    assert pyverbs_peer.read(600 << 10, 8192) == bytes(mem[1 << 19 : (1 << 19) + 8192])
    pyverbs_peer.send_notification(b"from pyverbs")
    note = eng.wait_for_notifications(1, h.TIMEOUT)[0]
    assert note.payload == b"from pyverbs"
    assert note.peer == "pyverbs-peer" and note.peer_instance == pyverbs_peer.instance
    eng.close()


def test_kvxfer_writes_and_reads_pyverbs_memory(pyverbs_peer):
    eng = h.make_engine("kv-init")
    src = h.random_bytes(1 << 20, 42)
    region = eng.register(src)
    peer = eng.add_peer(pyverbs_peer.descriptor())
    assert peer.backend == "ibverbs" and peer.name == "pyverbs-peer"
    # Scattered extents: 64 pieces of 4 KiB to shuffled places of the pyverbs MR.
    rng = np.random.default_rng(43)
    dst = rng.permutation(256)[:64] * 4096
    local = np.stack([np.arange(64) * 4096, np.full(64, 4096)], axis=1).astype(np.uint64)
    remote = np.stack([dst, np.full(64, 4096)], axis=1).astype(np.uint64)
    t = eng.post(
        kvxfer.Op.WRITE, peer, region, 0, local_extents=local, remote_extents=remote, notify=b"to pyverbs"
    )
    t.wait(h.TIMEOUT)
    for i, o in enumerate(dst):
        assert pyverbs_peer.read(int(o), 4096) == bytes(src[i * 4096 : (i + 1) * 4096]), f"piece {i}"
    assert pyverbs_peer.wait_notes(1, h.TIMEOUT)[-1] == b"to pyverbs"
    # READ back a different map into a fresh local buffer.
    fresh = np.zeros(1 << 20, np.uint8)
    fregion = eng.register(fresh)
    pyverbs_peer.write_local(0, bytes(h.random_bytes(1 << 20, 44)))
    t = eng.post(kvxfer.Op.READ, peer, fregion, 0, local_extents=remote, remote_extents=local)
    t.wait(h.TIMEOUT)
    for i, o in enumerate(dst):
        assert bytes(fresh[int(o) : int(o) + 4096]) == pyverbs_peer.read(i * 4096, 4096)
    eng.notify(peer, b"standalone")
    assert pyverbs_peer.wait_notes(2, h.TIMEOUT)[-1] == b"standalone"
    eng.close()
