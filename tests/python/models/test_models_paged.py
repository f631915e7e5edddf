"""Paged decode with continuous batching, prefix reuse and the prefill buffer contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from models_testlib import DEVICE, one_thread  # noqa: F401 (autouse fixture)

from kvxfer.models import Model, PagedKVPool, Sequence, tiny_config


@pytest.fixture(scope="module")
def model():
    return Model(tiny_config(seed=7, num_layers=2), device=DEVICE)


def _prompt(model, n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()


def test_continuous_batching_equals_single_sequence_generate(model):
    bt = 4
    pool = PagedKVPool(model.config, num_blocks=64, block_tokens=bt, device=DEVICE)
    # fragment the free list so block tables are not runs of consecutive ids
    held = pool.allocate(40 * bt)  # 40 blocks
    pool.free(held[::2])
    # (arrival step, prompt length, max_tokens): lengths on and around block boundaries,
    # sequences joining while others run and leaving at different steps
    plan = [
        (0, 5, 9),
        (0, 1, 3),
        (1, 4, 12),
        (2, 16, 1),
        (2, 7, 6),
        (3, 3, 10),
        (6, 13, 5),
        (9, 8, 8),
        (12, 17, 4),
    ]
    prompts = [_prompt(model, n, seed=i) for i, (_, n, _) in enumerate(plan)]
    want = [model.generate(p, mt) for p, (_, _, mt) in zip(prompts, plan, strict=True)]

    got: dict[int, list[int]] = {}
    running: list[tuple[int, Sequence]] = []
    batch_sizes = []
    step = 0
    while len(got) < len(plan) or running:
        for i, (arrive, n, mt) in enumerate(plan):
            if arrive == step:
                res = model.prefill(prompts[i], pad_to=bt)
                blocks = pool.allocate(n)
                pool.scatter_from_contiguous(res.kv, blocks)
                got[i] = [res.first_token]
                seq = Sequence(f"r{i}", blocks, n, res.first_token)
                if mt > 1:
                    running.append((i, seq))
                else:
                    pool.free(seq.block_table)
        if running:
            batch_sizes.append(len(running))
            toks = model.decode_step(pool, [s for _, s in running])
            for (i, s), t in zip(running, toks, strict=True):
                got[i].append(t)
                assert s.last_token == t and s.length == len(prompts[i]) + len(got[i]) - 1
            for _i, s in [r for r in running if len(got[r[0]]) == plan[r[0]][2]]:
                pool.free(s.block_table)
            running = [r for r in running if len(got[r[0]]) < plan[r[0]][2]]
        step += 1
        assert step < 100
    for i in range(len(plan)):
        assert got[i] == want[i], f"request {i} (prompt {plan[i][1]}): batched {got[i]} vs alone {want[i]}"
    assert max(batch_sizes) >= 4 and len(set(batch_sizes)) > 2
    assert pool.free_blocks == 64 - 20  # only the 20 still-held fragmenting blocks remain


def test_pool_layout_contract(model):
    c = model.config
    pool = PagedKVPool(c, num_blocks=10, block_tokens=8)
    assert pool.tensor.shape == (c.num_layers, 2, 10, 8, c.num_kv_heads, c.head_dim)
    assert pool.tensor.is_contiguous()
    lay = pool.layout()
    assert (lay.num_layers, lay.num_kv, lay.num_blocks) == (c.num_layers, 2, 10)
    assert lay.block_bytes == 8 * c.num_kv_heads * c.head_dim * 4
    assert model.kv_bytes_per_token == 2 * c.num_layers * c.num_kv_heads * c.head_dim * 4
    # piece (layer, kv, block) of the layout is exactly pool.tensor[layer, kv, block]
    base = pool.tensor.data_ptr()
    for layer, kv, blk in [(0, 0, 0), (1, 1, 9), (1, 0, 3)]:
        assert lay.piece_offset(layer, kv, blk) == pool.tensor[layer, kv, blk].data_ptr() - base
    a = pool.allocate(17)
    assert len(a) == 3 and pool.free_blocks == 7
    pool.free(a)
    assert pool.free_blocks == 10


def test_prefill_buffer_padding_and_kv_out(model):
    ids = _prompt(model, 11, seed=3)
    res = model.prefill(ids, pad_to=8)
    assert res.kv.shape[2] == 16 and res.num_tokens == 11
    assert torch.count_nonzero(res.kv[:, :, 11:]) == 0
    assert torch.count_nonzero(res.kv[:, :, 10]) > 0
    # a dirty preallocated uint8 buffer: res.kv is a view of its first bytes, padding zeroed
    need = model.kv_buffer_bytes(11, pad_to=8)
    assert need == 16 * model.kv_bytes_per_token
    buf = torch.full((need + 100,), 0xAB, dtype=torch.uint8)
    res2 = model.prefill(ids, kv_out=buf, pad_to=8)
    assert res2.kv.data_ptr() == buf.data_ptr()
    assert torch.equal(res2.kv, res.kv.cpu())  # kv_out may live on another device
    assert bytes(buf[need:].numpy()) == b"\xab" * 100
    # a numpy buffer (e.g. kvxfer.empty) works the same
    arr = np.zeros(need, np.uint8)
    res3 = model.prefill(ids, kv_out=arr, pad_to=8)
    assert torch.equal(torch.from_numpy(arr).view(torch.float32).view(res.kv.shape), res.kv.cpu())
    assert res3.first_token == res.first_token


@pytest.mark.parametrize("prefix_len", [1, 6, 8, 20, 21])
def test_prefix_reuse_equals_full_prefill(model, prefix_len):
    ids = _prompt(model, 21, seed=11)
    full = model.prefill(ids, pad_to=4)
    pre = model.prefill(ids[:prefix_len])  # an earlier prompt that shares the prefix
    res = model.prefill(ids, pad_to=4, prefix_kv=pre.kv, prefix_len=prefix_len)
    assert res.prefix_len == min(prefix_len, 20)  # the last token is always computed
    assert res.first_token == full.first_token
    p = res.prefix_len
    assert torch.equal(res.kv[:, :, :p], pre.kv[:, :, :p])  # reused bytes copied as they are
    torch.testing.assert_close(res.kv, full.kv, rtol=1e-5, atol=1e-6)
    # and decoding from the reused KV continues token for token like the full prompt
    want = model.generate(ids, 10)
    pool = PagedKVPool(model.config, num_blocks=16, block_tokens=4, device=DEVICE)
    seq = Sequence("p", pool.allocate(21), 21, res.first_token)
    pool.scatter_from_contiguous(res.kv, seq.block_table)
    got = [res.first_token] + [model.decode_step(pool, [seq])[0] for _ in range(9)]
    assert got == want


def test_scatter_gather_roundtrip_partial_block(model):
    ids = _prompt(model, 10, seed=5)
    res = model.prefill(ids)
    pool = PagedKVPool(model.config, num_blocks=8, block_tokens=4, device=DEVICE)
    pool.tensor.fill_(7.0)
    blocks = [5, 0, 6]
    pool.scatter_from_contiguous(res.kv, blocks)
    assert torch.equal(pool.gather_contiguous(blocks, 10), res.kv)
    # the unused tail of the last block is untouched
    assert torch.all(pool.tensor[:, :, 6, 2:] == 7.0)
    assert torch.all(pool.tensor[:, :, [1, 2, 3, 4, 7]] == 7.0)


def test_generate_stop_tokens(model):
    ids = _prompt(model, 6, seed=2)
    full = model.generate(ids, 12)
    stop = full[4]
    first = full.index(stop)
    assert model.generate(ids, 12, stop_token_ids=[stop]) == full[: first + 1]
    assert model.generate(ids, 0) == []


def test_bfloat16_kv_and_batched_decode():
    """Half-size KV (what a GPU deployment runs): buffer and pool in bf16, batched == alone."""
    m32 = Model(tiny_config(seed=8), device=DEVICE)
    m16 = Model(tiny_config(seed=8), device=DEVICE, dtype=torch.bfloat16)
    assert m16.kv_bytes_per_token * 2 == m32.kv_bytes_per_token
    ids = _prompt(m16, 9, seed=1)
    r16, r32 = m16.prefill(ids, pad_to=4), m32.prefill(ids, pad_to=4)
    assert r16.kv.dtype == torch.bfloat16 and r16.kv.shape == r32.kv.shape
    torch.testing.assert_close(r16.kv.float(), r32.kv, rtol=0.05, atol=0.05)
    pool = PagedKVPool(m16.config, num_blocks=16, block_tokens=4, device=DEVICE, dtype=torch.bfloat16)
    assert pool.block_bytes == 4 * m16.config.num_kv_heads * m16.config.head_dim * 2
    prompts = [ids, _prompt(m16, 3, seed=2)]
    want = [m16.generate(p, 6, block_tokens=4) for p in prompts]
    seqs, outs = [], []
    for i, p in enumerate(prompts):
        r = m16.prefill(p, pad_to=4)
        seqs.append(Sequence(str(i), pool.allocate(len(p)), len(p), r.first_token))
        pool.scatter_from_contiguous(r.kv, seqs[-1].block_table)
        outs.append([r.first_token])
    for _ in range(5):
        for o, t in zip(outs, m16.decode_step(pool, seqs), strict=True):
            o.append(t)
    assert outs == want
