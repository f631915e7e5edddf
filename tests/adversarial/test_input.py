"""Bad input from a careless or hostile caller: a typed KvxferError naming the bad value,
nothing moved, no hang."""

from __future__ import annotations

import numpy as np
import pytest

import kvxfer
from kvxfer import Op, errors


@pytest.fixture
def pair():
    a = kvxfer.Engine("a", backends=["loopback"])
    b = kvxfer.Engine("b", backends=["loopback"])
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, np.uint8)
    lay = kvxfer.KvLayout(num_blocks=16, block_bytes=256)
    ra, rb = a.register(src, lay), b.register(dst, lay)
    peer = a.add_peer(b.descriptor())
    yield a, b, ra, rb, peer, dst
    a.close()
    b.close()


@pytest.mark.parametrize(
    "kw",
    [
        dict(local_extents=[[0.5, 8]], remote_extents=[[0, 8]]),
        dict(local_extents=[[0, 8]], remote_extents=[[-8, 8]]),
        dict(local_extents=[[0, 16]], remote_extents=[[0, 8], [4, 8]]),  # overlapping destinations
    ],
)
def test_bad_extents_are_typed(pair, kw):
    a, b, ra, rb, peer, dst = pair
    with pytest.raises(errors.KvxferError):
        a.post(Op.WRITE, peer, ra, rb.id, **kw).wait(5)
    assert (dst == 0).all()


@pytest.mark.parametrize("rid", [-1, 2**32, 2**64])
def test_remote_region_out_of_range_is_typed(pair, rid):
    a, b, ra, rb, peer, dst = pair
    with pytest.raises(errors.KvxferError):
        a.post(Op.WRITE, peer, ra, rid, local_extents=[[0, 8]], remote_extents=[[0, 8]])


def test_negative_sizes_layers_and_read_only_buffers():
    with pytest.raises(errors.KvxferError):
        kvxfer.empty(-1)
    with pytest.raises(errors.KvxferError):
        kvxfer.KvLayout(num_layers=-1, num_blocks=4, block_bytes=64)
    with kvxfer.Engine("ro", backends=["loopback"]) as e:
        ro = np.zeros(64, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(errors.KvxferError):
            e.register(ro)


@pytest.mark.parametrize("timeout", [1e10, 1e300])
def test_huge_timeouts_saturate(pair, timeout):
    a, b, ra, rb, peer, dst = pair
    t = a.post(Op.WRITE, peer, ra, rb.id, local_extents=[[0, 8]], remote_extents=[[0, 8]], timeout=timeout)
    t.wait(timeout)
    assert (dst[:8] == np.arange(8)).all()
