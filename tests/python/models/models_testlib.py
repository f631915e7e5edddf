"""Helpers of the model-runtime tests: the device under test and transformers' reference model.

No conftest.py in this folder: with the suite's rootdir-relative imports, a second module named
``conftest`` would shadow tests/python/conftest.py for ``from conftest import ...``. Each test
module imports :func:`one_thread` (an autouse fixture) from here instead.
"""

from __future__ import annotations

import os

import pytest
import torch

# Device of the tiny-model tests: cpu here; KVXFER_TEST_DEVICE=cuda runs them on a GPU.
DEVICE = os.environ.get("KVXFER_TEST_DEVICE", "cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per test module (2 cores shared by several processes: two threads spin
    against each other). Module scope: set before the modules' own model fixtures, restored after."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def hf_llama(cfg, state_dict, attn="sdpa"):
    """transformers' LlamaForCausalLM with the same weights (the independent reference)."""
    transformers = pytest.importorskip("transformers", reason="reference needs transformers")
    hcfg = transformers.LlamaConfig(**cfg.to_hf_dict())
    hcfg._attn_implementation = attn
    model = transformers.LlamaForCausalLM(hcfg).eval()
    res = model.load_state_dict(state_dict, strict=False)
    model.to(DEVICE)
    # tied models have no lm_head.weight in the state dict; anything else must match exactly
    assert not res.unexpected_keys, res.unexpected_keys
    assert set(res.missing_keys) <= ({"lm_head.weight"} if cfg.tie_word_embeddings else set()), (
        res.missing_keys
    )
    return model


def hf_greedy(model, ids, n):
    """n greedy tokens from transformers' generate (KV-cached, no early stop)."""
    inp = torch.tensor([ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            inp,
            attention_mask=torch.ones_like(inp),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(ids) :].tolist()
