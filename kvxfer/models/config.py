"""Llama-family decoder configuration, seeded tiny configurations for fast tests, and a seeded
"medium" one for load experiments that need compute of a real size."""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

from .errors import InvalidArgumentError


@dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a decoder-only Llama-family model (RMSNorm, RoPE, GQA, SwiGLU).

    ``seed`` is the default seed for random weights (``Model(cfg)`` without a state dict).
    Field names follow transformers' ``LlamaConfig`` where one exists, so :meth:`to_hf_dict`
    is a plain rename.
    """

    vocab_size: int = 256
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    max_position_embeddings: int = 512
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    name: str = "tiny-llama"
    seed: int = 0

    def __post_init__(self) -> None:
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if int(getattr(self, f)) <= 0:
                raise InvalidArgumentError(f"ModelConfig.{f} must be positive, got {getattr(self, f)}")
        if self.num_kv_heads <= 0 or self.num_heads % self.num_kv_heads:
            raise InvalidArgumentError(
                f"num_heads ({self.num_heads}) must be a positive multiple of "
                f"num_kv_heads ({self.num_kv_heads})"
            )
        if self.head_dim <= 0 or self.head_dim % 2:
            raise InvalidArgumentError(f"head_dim must be positive and even (RoPE), got {self.head_dim}")
        if self.max_position_embeddings <= 0:
            raise InvalidArgumentError("max_position_embeddings must be positive")

    def to_hf_dict(self) -> dict[str, Any]:
        """The same model as transformers' ``LlamaConfig(**d)`` arguments."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_norm_eps,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], name: str = "llama") -> ModelConfig:
        """From a transformers ``config.json`` dict of a Llama model (no rope scaling, no biases)."""
        rope_theta = d.get("rope_theta")
        if rope_theta is None:  # transformers >= 5 nests it under rope_parameters
            rope_theta = (d.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        scaling = d.get("rope_scaling") or (d.get("rope_parameters") or {}).get("rope_type", "default")
        if scaling not in (None, "default") and not (
            isinstance(scaling, dict) and scaling.get("rope_type") in (None, "default")
        ):
            raise InvalidArgumentError(f"rope scaling {scaling!r} is not supported by this runtime")
        if d.get("attention_bias") or d.get("mlp_bias"):
            raise InvalidArgumentError("attention/MLP biases are not supported by this runtime")
        heads = int(d["num_attention_heads"])
        return cls(
            vocab_size=int(d["vocab_size"]),
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_layers=int(d["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(d.get("num_key_value_heads") or heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // heads),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=float(rope_theta),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=_first(d.get("eos_token_id")),
            name=name,
        )

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _first(x: Any) -> int | None:
    if isinstance(x, (list, tuple)):
        return int(x[0]) if x else None
    return None if x is None else int(x)


def tiny_config(seed: int = 0, num_layers: int = 2, **overrides: Any) -> ModelConfig:
    """A seeded random tiny Llama configuration (GQA, untied head by default) for fast tests.

    Without overrides the shape is drawn from ``seed`` among small sizes, so different seeds
    exercise different head counts and dimensions; any field may be fixed by keyword.
    """
    rng = random.Random(seed)
    kv_heads = rng.choice([1, 2])
    group = rng.choice([1, 2, 4]) if kv_heads == 1 else rng.choice([1, 2])
    head_dim = rng.choice([8, 16])
    fields: dict[str, Any] = {
        "vocab_size": rng.choice([128, 256, 384]),
        "hidden_size": rng.choice([32, 48, 64]),
        "intermediate_size": rng.choice([64, 96, 128]),
        "num_layers": num_layers,
        "num_heads": kv_heads * group,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": 512,
        "rope_theta": rng.choice([10000.0, 100000.0]),
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "name": f"tiny-llama-s{seed}",
        "seed": seed,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def medium_config(seed: int = 0, **overrides: Any) -> ModelConfig:
    """A fixed Llama shape of about 25M parameters (8 layers, hidden 512, GQA 8/2 heads of 64),
    with seeded random weights, for load experiments that need a model that really computes
    but fits many one-thread workers on one host: on one CPU thread a 512-token prefill takes a
    few hundred milliseconds and a 128-token one about a quarter of that (docs/models.md has
    the figures). Vocabulary 512 (the byte tokenizer's); outputs mean nothing.
    """
    fields: dict[str, Any] = {
        "vocab_size": 512,
        "hidden_size": 512,
        "intermediate_size": 1536,
        "num_layers": 8,
        "num_heads": 8,
        "num_kv_heads": 2,
        "head_dim": 64,
        "max_position_embeddings": 4096,
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "name": f"medium-llama-s{seed}",
        "seed": seed,
    }
    fields.update(overrides)
    return ModelConfig(**fields)
