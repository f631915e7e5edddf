"""Our runtime vs transformers' LlamaForCausalLM on seeded random configurations (tiny ones and
the "medium" one), token for token."""

from __future__ import annotations

import pytest
import torch
from models_testlib import DEVICE, hf_greedy, hf_llama, one_thread  # noqa: F401 (autouse fixture)

from kvxfer.models import Model, medium_config, random_state_dict, tiny_config

CONFIGS = [
    tiny_config(seed=0),
    tiny_config(seed=1, num_layers=3),
    tiny_config(seed=2, tie_word_embeddings=True),
    tiny_config(
        seed=3, num_heads=4, num_kv_heads=1, head_dim=16, hidden_size=48
    ),  # GQA 4:1, head_dim*H != hidden
    medium_config(),  # the load experiments' model (8 layers, hidden 512, GQA 8:2)
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.name + ("-tied" if c.tie_word_embeddings else ""))
def test_greedy_tokens_match_transformers(cfg):
    sd = random_state_dict(cfg, cfg.seed)
    ours = Model(cfg, state_dict=sd, device=DEVICE)
    ref = hf_llama(cfg, sd)
    g = torch.Generator().manual_seed(cfg.seed + 100)
    for n in (1, 7, 33):
        ids = torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist()
        want = hf_greedy(ref, ids, 24)
        got = ours.generate(ids, 24)
        assert got == want, f"prompt of {n}: ours {got} vs transformers {want}"
        # the prefill buffer's K/V equal transformers' cache, layer by layer
        res = ours.prefill(ids)
        assert res.first_token == want[0]
        with torch.no_grad():
            out = ref(torch.tensor([ids], device=DEVICE), use_cache=True)
        cache = getattr(out, "cache", None)  # renamed from past_key_values in transformers 5.2x
        cache = out.past_key_values if cache is None else cache
        for layer in range(cfg.num_layers):
            k_ref, v_ref = _layer_kv(cache, layer)
            torch.testing.assert_close(res.kv[layer, 0], k_ref[0].transpose(0, 1), rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(res.kv[layer, 1], v_ref[0].transpose(0, 1), rtol=1e-4, atol=1e-5)


def _layer_kv(cache, layer):
    if hasattr(cache, "layers"):  # transformers >= 4.56 DynamicCache
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache[layer]


def test_attention_mass_matches_transformers_eager_attentions():
    cfg = tiny_config(seed=4, num_layers=3)
    sd = random_state_dict(cfg, cfg.seed)
    ours = Model(cfg, state_dict=sd, device=DEVICE)
    ref = hf_llama(cfg, sd, attn="eager")
    ids = torch.randint(0, cfg.vocab_size, (19,), generator=torch.Generator().manual_seed(5)).tolist()
    res = ours.prefill(ids, return_attention_mass=True)
    with torch.no_grad():
        atts = ref(
            torch.tensor([ids], device=DEVICE), output_attentions=True
        ).attentions  # per layer [1, Hq, T, T]
    want = sum(a[0].sum(dim=(0, 1)) for a in atts[-ours.attention_mass_layers :])
    assert res.attention_mass.shape == (19,)
    torch.testing.assert_close(res.attention_mass, want.float().cpu(), rtol=1e-4, atol=1e-4)
    # every query's weights sum to one: total = layers x heads x queries
    assert res.attention_mass.sum().item() == pytest.approx(
        ours.attention_mass_layers * cfg.num_heads * 19, rel=1e-5
    )
    assert ours.prefill(ids).attention_mass is None
