"""Bad input to the model runtime raises typed errors (ModelError < KvxferError) and changes nothing."""

from __future__ import annotations

import pytest
import torch
from models_testlib import one_thread  # noqa: F401 (autouse fixture)

import kvxfer
from kvxfer.models import (
    BufferTooSmallError,
    ContextLengthError,
    EmptyPromptError,
    InvalidArgumentError,
    InvalidTokenError,
    Model,
    ModelConfig,
    ModelError,
    PagedKVPool,
    PoolExhaustedError,
    Sequence,
    WeightsError,
    random_state_dict,
    tiny_config,
)


@pytest.fixture(scope="module")
def model():
    return Model(tiny_config(seed=1, max_position_embeddings=32))


def test_errors_are_kvxfer_errors():
    for cls in (EmptyPromptError, ContextLengthError, PoolExhaustedError, BufferTooSmallError, WeightsError):
        assert issubclass(cls, ModelError) and issubclass(cls, kvxfer.KvxferError)


def test_prompt_errors(model):
    with pytest.raises(EmptyPromptError, match="no tokens"):
        model.prefill([])
    with pytest.raises(EmptyPromptError):
        model.generate([], 4)
    with pytest.raises(ContextLengthError, match="33 tokens exceeds max_position_embeddings 32"):
        model.prefill([1] * 33)
    with pytest.raises(ContextLengthError):
        model.generate([1] * 30, 4)  # 30 + 4 - 1 positions > 32
    with pytest.raises(InvalidTokenError, match="token id -1"):
        model.prefill([1, -1])
    with pytest.raises(InvalidTokenError, match=str(model.config.vocab_size)):
        model.prefill([model.config.vocab_size])
    with pytest.raises(BufferTooSmallError, match="needs"):
        model.prefill([1, 2, 3], kv_out=torch.zeros(model.kv_buffer_bytes(3) - 1, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError, match="pad_to"):
        model.prefill([1, 2], pad_to=0)
    with pytest.raises(InvalidArgumentError, match="prefix_kv"):
        model.prefill([1, 2, 3], prefix_len=2)
    with pytest.raises(InvalidArgumentError, match="prefix_len"):
        model.prefill([1, 2, 3], prefix_kv=model.prefill([1, 2, 3]).kv, prefix_len=4)


def test_pool_out_of_blocks_changes_nothing(model):
    pool = PagedKVPool(model.config, num_blocks=3, block_tokens=4)
    with pytest.raises(PoolExhaustedError, match="4 needed for 13 tokens, 3 free"):
        pool.allocate(13)
    assert pool.free_blocks == 3
    a, b = Sequence("a", pool.allocate(4), 4, 5), Sequence("b", pool.allocate(8), 8, 6)
    assert pool.free_blocks == 0
    before = pool.tensor.clone()
    with pytest.raises(PoolExhaustedError, match="2 new blocks needed for 2 sequences, 0 free"):
        model.decode_step(pool, [a, b])
    # nothing moved: no block taken, no length advanced, no K/V written
    assert (a.length, a.block_table, b.length, len(b.block_table)) == (4, [0], 8, 2)
    assert torch.equal(pool.tensor, before)
    with pytest.raises(InvalidArgumentError, match="duplicate"):
        pool.free([0, 0])
    pool.free(a.block_table)
    with pytest.raises(InvalidArgumentError, match="not allocated"):
        pool.free(a.block_table)
    with pytest.raises(InvalidArgumentError, match="outside the pool"):
        model.decode_step(pool, [Sequence("c", [7], 2, 1)])
    with pytest.raises(InvalidArgumentError, match="cannot hold"):
        model.decode_step(pool, [Sequence("d", [], 2, 1)])


def test_context_limit_in_decode(model):
    pool = PagedKVPool(model.config, num_blocks=16, block_tokens=4)
    seq = Sequence("x", pool.allocate(32), 32, 1)
    with pytest.raises(ContextLengthError, match="33 positions"):
        model.decode_step(pool, [seq])


def test_bad_weights_and_config():
    cfg = tiny_config(seed=0)
    sd = random_state_dict(cfg, 0)
    del sd["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(WeightsError, match="up_proj"):
        Model(cfg, state_dict=sd)
    sd = random_state_dict(cfg, 0)
    sd["model.norm.weight"] = torch.ones(3)
    with pytest.raises(WeightsError, match="shape"):
        Model(cfg, state_dict=sd)
    sd = random_state_dict(cfg, 0)
    sd["model.extra.weight"] = torch.ones(3)
    with pytest.raises(WeightsError, match="unexpected"):
        Model(cfg, state_dict=sd)
    with pytest.raises(InvalidArgumentError, match="num_kv_heads"):
        ModelConfig(num_heads=4, num_kv_heads=3)
    with pytest.raises(InvalidArgumentError, match="another model shape"):
        Model(cfg).decode_step(
            PagedKVPool(tiny_config(seed=0, num_layers=3), 4, 4), [Sequence("s", [0], 0, 1)]
        )


def test_pool_buffer_errors():
    cfg = tiny_config(seed=0)
    need = PagedKVPool.nbytes_for(cfg, 4, 4)
    with pytest.raises(InvalidArgumentError, match="needs"):
        PagedKVPool(cfg, 4, 4, buffer=torch.zeros(need - 1, dtype=torch.uint8))
    with pytest.raises(InvalidArgumentError, match="contiguous"):
        PagedKVPool(cfg, 4, 4, buffer=torch.zeros(2, need, dtype=torch.uint8)[:, ::2])
    with pytest.raises(InvalidArgumentError, match="tensor or numpy"):
        PagedKVPool(cfg, 4, 4, buffer=bytearray(need))
    pool = PagedKVPool(cfg, 4, 4, buffer=torch.full((need,), 0xFF, dtype=torch.uint8))
    assert pool.nbytes == need and torch.count_nonzero(pool.tensor) == 0  # zeroed
