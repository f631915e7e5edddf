"""Model geometries for the paged KV workloads.

A paged KV cache stores, for every layer and for K and V separately, fixed-size blocks
of ``tokens_per_block`` tokens. One block of one layer and one of K/V is

    block_bytes = kv_heads x head_dim x dtype_bytes x tokens_per_block

and that is the "piece" kvxfer moves (``KvLayout.block_bytes``); a block id covers
``layers x num_kv`` pieces. MLA models (DeepSeek) cache one fused latent per token
instead of K and V (``num_kv = 1``, ``head_dim`` = latent width, ``kv_heads`` = 1).

Numbers are from each model's ``config.json`` on the Hugging Face Hub (the repository
named in ``source``): ``num_hidden_layers``, ``num_key_value_heads``, and head_dim =
``hidden_size / num_attention_heads`` unless the config sets ``head_dim``. The dtype is
the checkpoint's ``torch_dtype`` (bf16 = 2 bytes); ``--kv-dtype`` overrides it (fp8 KV
caches are common). 16 tokens per block is vLLM's default block size.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Model:
    name: str
    layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int
    num_kv: int  # 2 = separate K and V, 1 = fused latent (MLA)
    source: str

    def block_bytes(self, tokens_per_block: int = 16, dtype_bytes: int | None = None) -> int:
        d = self.dtype_bytes if dtype_bytes is None else dtype_bytes
        return self.kv_heads * self.head_dim * d * tokens_per_block


HF = "https://huggingface.co/{}/blob/main/config.json"

MODELS: dict[str, Model] = {
    m.name: m
    for m in (
        # hidden 4096 / 32 heads = 128
        Model("llama3-8b", 32, 8, 128, 2, 2, HF.format("meta-llama/Meta-Llama-3-8B")),
        # hidden 8192 / 64 heads = 128
        Model("llama3-70b", 80, 8, 128, 2, 2, HF.format("meta-llama/Meta-Llama-3-70B")),
        # hidden 16384 / 128 heads = 128
        Model("llama3.1-405b", 126, 8, 128, 2, 2, HF.format("meta-llama/Llama-3.1-405B")),
        # Llama 2 7B has no GQA: 32 KV heads; hidden 4096 / 32 = 128
        Model("llama2-7b", 32, 32, 128, 2, 2, HF.format("meta-llama/Llama-2-7b-hf")),
        # hidden 3584 / 28 heads = 128, 4 KV heads
        Model("qwen2.5-7b", 28, 4, 128, 2, 2, HF.format("Qwen/Qwen2.5-7B")),
        # hidden 8192 / 64 heads = 128, 8 KV heads
        Model("qwen2.5-72b", 80, 8, 128, 2, 2, HF.format("Qwen/Qwen2.5-72B")),
        # hidden 896 / 14 heads = 64, 2 KV heads
        Model("qwen2.5-0.5b", 24, 2, 64, 2, 2, HF.format("Qwen/Qwen2.5-0.5B")),
        # hidden 4096 / 32 heads = 128, 8 KV heads
        Model("mistral-7b", 32, 8, 128, 2, 2, HF.format("mistralai/Mistral-7B-v0.1")),
        Model("mixtral-8x7b", 32, 8, 128, 2, 2, HF.format("mistralai/Mixtral-8x7B-v0.1")),
        # MLA: kv_lora_rank 512 + qk_rope_head_dim 64 = 576 cached values per token per layer
        Model("deepseek-v3", 61, 1, 576, 2, 1, HF.format("deepseek-ai/DeepSeek-V3")),
    )
}

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2, "fp8": 1, "int8": 1}


def get(name: str) -> Model:
    try:
        return MODELS[name.lower()]
    except KeyError:
        raise ValueError(
            f"unknown model '{name}'; known: {', '.join(MODELS)} (or 'none' with --block-bytes)"
        ) from None


def table() -> str:
    """The model table as text (``kvxfer-bench --list-models``)."""
    rows = [
        f"{'model':<15} {'layers':>6} {'kv':>3} {'kv_heads':>8} {'head_dim':>8} {'dtype':>5} "
        f"{'block_bytes@16':>14}  source"
    ]
    for m in MODELS.values():
        rows.append(
            f"{m.name:<15} {m.layers:>6} {m.num_kv:>3} {m.kv_heads:>8} {m.head_dim:>8} "
            f"{m.dtype_bytes:>5} {m.block_bytes():>14}  {m.source}"
        )
    return "\n".join(rows)
