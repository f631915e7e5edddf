"""Model runtime for P/D-Serve: a Llama-family decoder (torch) with a block-free prefill buffer
and a paged, continuously batched decode pool that kvxfer writes into.

    from kvxfer.models import Model, PagedKVPool, Sequence, tiny_config, load_smollm2
    model = Model(tiny_config(seed=0))
    res = model.prefill([1, 2, 3], pad_to=16)          # res.kv: [L, 2, T_pad, H_kv, D]
    pool = PagedKVPool(model.config, num_blocks=64, block_tokens=16)
    seq = Sequence("r0", pool.allocate(3), 3, res.first_token)
    pool.scatter_from_contiguous(res.kv, seq.block_table)
    model.decode_step(pool, [seq])

See docs/models.md. Needs torch (``pip install kvxfer[serve]``).
"""

from __future__ import annotations

from .config import ModelConfig, medium_config, tiny_config
from .errors import (
    BufferTooSmallError,
    ContextLengthError,
    EmptyPromptError,
    InvalidArgumentError,
    InvalidTokenError,
    ModelError,
    PoolExhaustedError,
    WeightsError,
)
from .model import Model, PrefillResult, random_state_dict
from .pool import PagedKVPool, Sequence


def load_smollm2(device="cpu", dtype=None, cache_dir=None):
    """``(tokenizer, Model)`` of SmolLM2-135M-Instruct; see :mod:`kvxfer.models.smollm2`."""
    from .smollm2 import load_smollm2 as _load

    return _load(device=device, dtype=dtype, cache_dir=cache_dir)


__all__ = [
    "BufferTooSmallError",
    "ContextLengthError",
    "EmptyPromptError",
    "InvalidArgumentError",
    "InvalidTokenError",
    "Model",
    "ModelConfig",
    "ModelError",
    "PagedKVPool",
    "PoolExhaustedError",
    "PrefillResult",
    "Sequence",
    "WeightsError",
    "load_smollm2",
    "medium_config",
    "random_state_dict",
    "tiny_config",
]
