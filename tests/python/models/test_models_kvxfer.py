"""Block-free transfer through a real kvxfer Engine pair (loopback): ONE local extent of the
prefill's contiguous buffer scattered into the decode pool's blocks (RecvScatter)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testlib import one_thread  # noqa: F401 (autouse fixture)

import kvxfer
from kvxfer.models import Model, PagedKVPool, Sequence, tiny_config

BT = 4  # block tokens


@pytest.fixture(scope="module")
def model():
    return Model(tiny_config(seed=5, num_layers=3))


@pytest.fixture
def engines():
    if "loopback" not in [b.name for b in kvxfer.list_backends() if b.available]:
        pytest.skip("the loopback backend is not available in this build")
    pre = kvxfer.Engine("prefill-0", backends=["loopback"], timeout=30.0)
    dec = kvxfer.Engine("decode-0", backends=["loopback"], timeout=30.0)
    yield pre, dec
    pre.close()
    dec.close()


def _setup(model, engines, n_tok, shareable=False):
    pre, dec = engines
    # sender: one buffer reserved in advance, bigger than this prompt needs
    nbytes = model.kv_buffer_bytes(64, pad_to=BT)
    buf = kvxfer.empty(nbytes) if shareable else torch.zeros(nbytes, dtype=torch.uint8)
    src_region = pre.register(buf)
    if shareable:  # pool memory a same-host peer can map (what the shm backend prefers)
        mem = kvxfer.empty(PagedKVPool.nbytes_for(model.config, 32, BT))
        pool = PagedKVPool(model.config, num_blocks=32, block_tokens=BT, buffer=mem)
        assert pool.tensor.data_ptr() == mem.ctypes.data
        dst_region = dec.register(mem, pool.layout())
    else:
        pool = PagedKVPool(model.config, num_blocks=32, block_tokens=BT)
        dst_region = dec.register(pool.tensor, pool.layout())
    pool.tensor.normal_()  # garbage where no block is written: it must stay untouched
    peer = pre.add_peer(dec.descriptor())
    ids = torch.randint(
        0, model.config.vocab_size, (n_tok,), generator=torch.Generator().manual_seed(n_tok)
    ).tolist()
    res = model.prefill(ids, kv_out=buf, pad_to=BT)
    # fragmented, out-of-order destination blocks: shuffle the pool's free list, then allocate
    pool.allocate(32 * BT)
    pool.free([int(b) for b in np.random.default_rng(n_tok).permutation(32)])
    blocks = pool.allocate(n_tok)
    assert blocks != sorted(blocks) or len(blocks) == 1
    return pre, dec, buf, src_region, pool, dst_region, peer, ids, res, blocks


@pytest.mark.parametrize("n_tok,shareable", [(1, False), (4, False), (13, True), (37, False)])
def test_one_extent_scattered_into_pool_blocks(model, engines, n_tok, shareable):
    setup = _setup(model, engines, n_tok, shareable)
    pre, dec, _, src_region, pool, dst_region, peer, ids, res, blocks = setup
    expect = pool.tensor.clone()
    ref = PagedKVPool(model.config, num_blocks=pool.num_blocks, block_tokens=BT)
    ref.tensor.copy_(expect)
    ref.scatter_from_contiguous(res.kv, blocks)

    nbytes = res.kv.numel() * res.kv.element_size()
    assert nbytes == len(blocks) * BT * model.kv_bytes_per_token  # whole blocks per (layer, kv)
    t = pre.post(
        kvxfer.Op.WRITE,
        peer,
        src_region,
        dst_region.id,
        local_extents=np.array([[0, nbytes]], dtype=np.int64),
        remote_blocks=np.array(blocks, dtype=np.int64),
        notify=f"req-{n_tok}".encode(),
        timeout=30.0,
    )
    assert t.wait(timeout=30.0) == kvxfer.TransferState.DONE
    notes = dec.wait_for_notifications(1, timeout=30.0)
    assert [n.payload for n in notes] == [f"req-{n_tok}".encode()]
    # byte for byte: the kvxfer scatter == the reference function, and nothing else changed
    assert pool.tensor.numpy().tobytes() == ref.tensor.numpy().tobytes()

    # decoding continues exactly like the aggregated reference
    want = model.generate(ids, 12)
    seq = Sequence(f"req-{n_tok}", list(blocks), n_tok, res.first_token)
    got = [res.first_token] + [model.decode_step(pool, [seq])[0] for _ in range(11)]
    assert got == want


def test_per_layer_transfers(model, engines):
    """The same buffer moved one layer at a time: (offset, length) of layer l, remote layer range (l, l+1)."""
    n_tok = 21
    pre, dec, buf, src_region, pool, dst_region, peer, ids, res, blocks = _setup(model, engines, n_tok)
    ref = PagedKVPool(model.config, num_blocks=pool.num_blocks, block_tokens=BT)
    ref.tensor.copy_(pool.tensor)
    ref.scatter_from_contiguous(res.kv, blocks)
    layer_bytes = res.kv[0].numel() * res.kv.element_size()
    transfers = [
        pre.post(
            kvxfer.Op.WRITE,
            peer,
            src_region,
            dst_region.id,
            local_extents=np.array([[layer * layer_bytes, layer_bytes]], dtype=np.int64),
            remote_blocks=np.array(blocks, dtype=np.int64),
            remote_layers=(layer, layer + 1),
            timeout=30.0,
        )
        for layer in range(model.config.num_layers)
    ]
    for t in transfers:
        assert t.wait(timeout=30.0) == kvxfer.TransferState.DONE
    assert pool.tensor.numpy().tobytes() == ref.tensor.numpy().tobytes()
    seq = Sequence("l", list(blocks), n_tok, res.first_token)
    got = [res.first_token] + [model.decode_step(pool, [seq])[0] for _ in range(7)]
    assert got == model.generate(ids, 8)
