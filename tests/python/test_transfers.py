"""Transfers between two engines of this process, over every in-process backend,
checked byte for byte against a numpy reference."""

from __future__ import annotations

import numpy as np
import pytest
from kvxfer_testlib import Pair, dense_layout, stream

import kvxfer
from kvxfer import Op, TransferState


def random_map(rng, pool, n):
    return rng.choice(pool, size=n, replace=False).astype(np.int64)


@pytest.mark.parametrize("op", [Op.WRITE, Op.READ])
@pytest.mark.parametrize("seed", range(3))
def test_random_block_maps_byte_exact(pair, op, seed):
    rng = np.random.default_rng(seed)
    lids, rids = random_map(rng, 64, 37), random_map(rng, 64, 37)
    before_dst, before_src = pair.dst.copy(), pair.src.copy()
    t = pair.a.post(op, pair.peer, pair.ra, pair.rb.id, local_blocks=lids, remote_blocks=rids)
    assert t.wait(60) == TransferState.DONE
    assert t.state == TransferState.DONE and t.error is None and t.quiesced
    if op == Op.WRITE:
        assert stream(pair.dst, pair.layout, rids) == stream(pair.src, pair.layout, lids)
        assert np.array_equal(pair.src, before_src)
        changed = np.flatnonzero(pair.dst != before_dst)
        touched = {
            pair.layout.piece_offset(layer, kv, int(i)) // pair.layout.block_bytes
            for layer in range(4)
            for kv in range(2)
            for i in rids
        }
        assert all(int(c) // pair.layout.block_bytes in touched for c in changed)
    else:
        assert stream(pair.src, pair.layout, lids) == stream(pair.dst, pair.layout, rids)
        assert np.array_equal(pair.dst, before_dst)


def test_same_ids_helper_and_plan_info(pair):
    ids = np.array([1, 2, 3, 9])
    info = pair.a.plan(Op.WRITE, pair.peer, pair.ra, 0, local_blocks=ids)
    assert info["pieces"] == 4 * 2 * 4 and info["runs"] == 4 * 2 * 2
    assert info["coalescing_ratio"] == pytest.approx(2.0)
    t = pair.a.write(pair.peer, pair.ra, 0, ids)
    t.wait(60)
    assert t.plan == info
    assert stream(pair.dst, pair.layout, ids) == stream(pair.src, pair.layout, ids)
    off = pair.a.plan(Op.WRITE, pair.peer, pair.ra, 0, local_blocks=ids, coalesce=False)
    assert off["runs"] == off["pieces"]


def test_layer_subset_moves_only_those_layers(pair):
    ids = np.array([5, 6, 40])
    before = pair.dst.copy()
    pair.a.write(pair.peer, pair.ra, 0, ids, layers=(1, 3)).wait(60)
    assert stream(pair.dst, pair.layout, ids, (1, 3)) == stream(pair.src, pair.layout, ids, (1, 3))
    for layer in (0, 3):
        assert stream(pair.dst, pair.layout, ids, (layer, layer + 1)) == stream(
            before, pair.layout, ids, (layer, layer + 1)
        )


def test_extents_both_sides(pair):
    ext_l = np.array([[0, 100], [1000, 7], [5000, 333]], dtype=np.uint64)
    ext_r = np.array([[10, 50], [60, 50], [20000, 340]], dtype=np.uint64)
    pair.a.post(Op.WRITE, pair.peer, pair.ra, 0, local_extents=ext_l, remote_extents=ext_r).wait(60)
    src = b"".join(pair.src[o : o + n].tobytes() for o, n in ext_l)
    dst = b"".join(pair.dst[o : o + n].tobytes() for o, n in ext_r)
    assert src == dst


def test_block_free_contiguous_range_scatters_into_paged_blocks(pair):
    """P/D-Serve's block-free transfer: one contiguous range on the sender lands in
    the receiver's scattered blocks, in (layer, K/V, block list) order."""
    ids = np.array([63, 0, 17, 18])
    nbytes = 4 * 2 * len(ids) * pair.layout.block_bytes
    pair.a.post(Op.WRITE, pair.peer, pair.ra, 0, local_extents=[[256, nbytes]], remote_blocks=ids).wait(60)
    assert stream(pair.dst, pair.layout, ids) == pair.src[256 : 256 + nbytes].tobytes()


def test_notification_visible_only_after_data(pair):
    ids = np.arange(64)
    t = pair.a.write(pair.peer, pair.ra, 0, ids, notify=b"req-42:done")
    (note,) = pair.b.wait_for_notifications(1, timeout=60)
    # Checked at the moment the notification is seen: all bytes are already there.
    assert stream(pair.dst, pair.layout, ids) == stream(pair.src, pair.layout, ids)
    assert note.payload == b"req-42:done" and note.peer == "a" and note.peer_instance == pair.a.instance_id
    t.wait(60)


def test_standalone_notify(pair):
    pair.a.notify(pair.peer, b"hello")
    assert [n.payload for n in pair.b.wait_for_notifications(1, timeout=30)] == [b"hello"]


def test_many_transfers_in_flight(pair):
    ts = [pair.a.write(pair.peer, pair.ra, 0, np.arange(i * 4, i * 4 + 4)) for i in range(16)]
    pair.a.wait_all(ts, timeout=60)
    assert stream(pair.dst, pair.layout, range(64)) == stream(pair.src, pair.layout, range(64))
    assert pair.a.stats()["transfers_done"] == 16


def test_cross_layer_layout_coalesces_whole_blocks(backend):
    # One block holds every layer's K and V (vLLM cross-layer blocks): a run of blocks
    # is one operation.
    layout = kvxfer.KvLayout(
        num_layers=4,
        num_kv=2,
        num_blocks=32,
        block_bytes=64,
        kv_stride=64,
        layer_stride=128,
        block_stride=512,
    )
    p = Pair(backend, layout)
    try:
        ids = np.array([3, 4, 5, 20])
        t = p.a.write(p.peer, p.ra, 0, ids)
        t.wait(60)
        assert t.plan["runs"] == 2 and t.plan["pieces"] == 32
        assert stream(p.dst, layout, ids) == stream(p.src, layout, ids)
    finally:
        p.close()


def test_duck_typed_tensor_registration(backend):
    """A CPU tensor-like object (data_ptr/element_size/numel/is_contiguous/device) is
    registered by pointer, and the region keeps it alive."""

    class FakeTensor:
        def __init__(self, arr):
            self._arr, self.device = arr, "cpu"

        def data_ptr(self):
            return self._arr.ctypes.data

        def element_size(self):
            return self._arr.itemsize

        def numel(self):
            return self._arr.size

        def is_contiguous(self):
            return True

    layout = dense_layout(1, 1, 8, 64)
    a = kvxfer.Engine("ta", backends=[backend])
    b = kvxfer.Engine("tb", backends=[backend])
    src = np.arange(512, dtype=np.uint8)
    dst_arr = np.zeros(128, dtype=np.float32)  # 512 bytes of another dtype
    ra = a.register(FakeTensor(src), layout)
    rb = b.register(FakeTensor(dst_arr), layout)
    view = dst_arr.view(np.uint8)
    del dst_arr  # the region holds the tensor, which holds the array
    peer = a.add_peer(b.descriptor())
    a.write(peer, ra, 0, [0, 7]).wait(30)
    (rb_region,) = peer.regions
    assert rb_region.nbytes == 512 and rb.nbytes == 512
    assert np.array_equal(view[:64], src[:64]) and np.array_equal(view[448:], src[448:])
    assert not view[64:448].any()
    a.close()
    b.close()


def test_large_request_of_one_million_block_ids(backend):
    """A single request of 1M block ids (256-B blocks) is accepted and completes
    byte-exact: no internal queue limit fails it."""
    n = 1 << 20
    layout = dense_layout(1, 1, n, 256)
    p = Pair(backend, layout, seed=9)
    try:
        rng = np.random.default_rng(3)
        lids, rids = rng.permutation(n), rng.permutation(n)
        t = p.a.post(Op.WRITE, p.peer, p.ra, 0, local_blocks=lids, remote_blocks=rids, timeout=120)
        t.wait()
        src_blocks = p.src.reshape(n, 256)
        dst_blocks = p.dst.reshape(n, 256)
        assert np.array_equal(dst_blocks[rids], src_blocks[lids])
    finally:
        p.close()


def test_shareable_host_memory(backend):
    """kvxfer.empty gives zeroed, page-aligned, writable arrays that transfer like any
    other memory (and take the shm backend's mapped-memcpy path)."""
    arr = kvxfer.empty((4, 1024), np.float32)
    assert arr.shape == (4, 1024) and arr.dtype == np.float32 and not arr.any()
    assert arr.ctypes.data % 4096 == 0
    layout = dense_layout(2, 2, 16, 512)
    a = kvxfer.Engine("sa", backends=[backend])
    b = kvxfer.Engine("sb", backends=[backend])
    src = kvxfer.empty(2 * 2 * 16 * 512)
    src[:] = np.random.default_rng(1).integers(0, 256, src.size, dtype=np.uint8)
    dst = kvxfer.empty(src.size)
    ra, rb = a.register(src, layout), b.register(dst, layout)
    peer = a.add_peer(b.descriptor())
    ids = np.array([3, 9, 10, 15])
    a.write(peer, ra, rb.id, ids).wait(30)
    assert stream(dst, layout, ids) == stream(src, layout, ids)
    dst[:] = 7
    a.read(peer, ra, rb.id, ids).wait(30)
    assert stream(src, layout, ids) == stream(dst, layout, ids)
    a.close()
    b.close()
