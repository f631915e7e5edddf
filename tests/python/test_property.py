"""Property: for any layouts and block maps, the coalesced plan and the block-by-block
plan produce byte-identical destinations, equal to a numpy reference of the stream
semantics; coalescing never adds operations."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kvxfer_testlib import pool_bytes, stream

import kvxfer
from kvxfer import Op


@st.composite
def transfer_case(draw):
    layers = draw(st.integers(1, 4))
    kv = draw(st.integers(1, 2))
    block_bytes = draw(st.sampled_from([1, 8, 24, 64]))
    cross_layer = draw(st.booleans())

    def layout(blocks):
        if cross_layer:  # one block spans every layer's K and V
            return kvxfer.KvLayout(
                num_layers=layers,
                num_kv=kv,
                num_blocks=blocks,
                block_bytes=block_bytes,
                kv_stride=block_bytes,
                layer_stride=kv * block_bytes,
                block_stride=layers * kv * block_bytes,
            )
        return kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=blocks, block_bytes=block_bytes)

    lblocks = draw(st.integers(1, 48))
    rblocks = draw(st.integers(1, 48))
    n = draw(st.integers(1, min(lblocks, rblocks)))
    # Runs of consecutive ids (what coalescing feeds on) mixed with random picks.
    lids = draw(st.permutations(range(lblocks)).map(lambda p: list(p)[:n]))
    if draw(st.booleans()):
        start = draw(st.integers(0, lblocks - n))
        lids = list(range(start, start + n))
    rids = draw(st.permutations(range(rblocks)).map(lambda p: list(p)[:n]))
    if draw(st.booleans()):
        start = draw(st.integers(0, rblocks - n))
        rids = list(range(start, start + n))
    return layout(lblocks), layout(rblocks), np.array(lids), np.array(rids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=transfer_case(), seed=st.integers(0, 2**32 - 1))
def test_coalesced_equals_block_by_block(case, seed):
    llay, rlay, lids, rids = case
    rng = np.random.default_rng(seed)
    src = rng.integers(0, 256, pool_bytes(llay), dtype=np.uint8)
    results = []
    with kvxfer.Engine("pa", backends=["loopback"]) as a, kvxfer.Engine("pb", backends=["loopback"]) as b:
        ra = a.register(src, llay)
        plans = []
        for coalesce in (True, False):
            dst = np.zeros(pool_bytes(rlay), dtype=np.uint8)
            rb = b.register(dst, rlay)
            peer = a.add_peer(b.descriptor())
            t = a.post(Op.WRITE, peer, ra, rb.id, local_blocks=lids, remote_blocks=rids, coalesce=coalesce)
            t.wait(30)
            plans.append(t.plan)
            results.append(dst)
    assert np.array_equal(results[0], results[1])
    assert stream(results[0], rlay, rids) == stream(src, llay, lids)
    coalesced, single = plans
    assert (
        coalesced["bytes"] == single["bytes"] == len(lids) * llay.num_layers * llay.num_kv * llay.block_bytes
    )
    assert coalesced["runs"] <= single["runs"] == single["pieces"]
    untouched = np.ones(results[0].size, bool)
    for layer in range(rlay.num_layers):
        for kv in range(rlay.num_kv):
            for i in rids:
                off = rlay.piece_offset(layer, kv, int(i))
                untouched[off : off + rlay.block_bytes] = False
    assert not results[0][untouched].any()
