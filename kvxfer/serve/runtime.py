"""What a worker computes with: the model (``real``) or its profile (``profiled``), shareable
KV memory, the kvxfer engine, and the per-scenario prefix-KV cache.

``profiled`` [issue 11; the paper has no such mode]: the worker sleeps for the TTFT / TPOT
that a profile measured from the real model on a named machine predicts, yet still fills
and moves KV bytes of the real size: every prompt's KV buffer is filled with a value derived
from its request id, which the decode side checks after the transfer.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import kvxfer

from .config import WorkerConfig
from .kv_transfer import KvGeometry
from .profile import Profile, load_profile

TINY_VOCAB = 512  # the gateway's byte tokenizer ("bytes:512") fits the tiny model


def tiny_model_config(seed: int = 0):
    from kvxfer.models import tiny_config

    return tiny_config(seed=seed, vocab_size=TINY_VOCAB, max_position_embeddings=4096)


def medium_model_config(seed: int = 0):
    from kvxfer.models import medium_config

    return medium_config(seed=seed, vocab_size=TINY_VOCAB)


# The models a worker runs: two with seeded random weights (the byte tokenizer's vocabulary),
# "tiny" for tests and "medium" for load experiments whose compute must take real time, and
# SmolLM2 with its real weights.
RANDOM_MODELS = {"tiny": tiny_model_config, "medium": medium_model_config}


def load_model(model: str, seed: int = 0, device: str = "cpu"):
    """``(tokenizer_or_None, Model)`` for ``"tiny"`` or ``"medium"`` (seeded random weights) or
    ``"smollm2"``."""
    from kvxfer.models import Model, load_smollm2

    if model in RANDOM_MODELS:
        return None, Model(RANDOM_MODELS[model](seed), device=device)
    tok, m = load_smollm2(device=device)
    return tok, m


def shared_tensor(nbytes: int, device: str = "cpu") -> torch.Tensor:
    """A uint8 tensor for KV that kvxfer moves. On the host: memfd memory (kvxfer.empty), which
    a same-host peer maps and copies with memcpy (docs/shm.md) instead of cross-memory attach.
    On a GPU (``device="cuda:N"``): device memory, registered as CUDA memory (docs/gpu.md)."""
    if torch.device(device).type != "cpu":
        return torch.empty(max(1, nbytes), dtype=torch.uint8, device=device)
    return torch.from_numpy(kvxfer.empty(max(1, nbytes)))


def fill_value(request_id: str) -> float:
    """The value a profiled prefill writes into every KV element of ``request_id``."""
    return float(zlib.crc32(request_id.encode()) % 65521 + 1)


@dataclass
class PrefillOut:
    first_token: int
    kv: torch.Tensor  # [L, 2, T_pad, H, D] view of the slot buffer
    num_tokens: int
    prefix_len: int


class Compute:
    """The model's two calls, real or profiled. Not thread-safe: one compute thread calls it."""

    mode = "real"

    def __init__(self, model: Any, cfg: Any, dtype: torch.dtype) -> None:
        self.model = model
        self.config = cfg
        self.dtype = dtype
        self.geometry = KvGeometry(
            cfg.num_layers, cfg.num_kv_heads, cfg.head_dim, torch.empty((), dtype=dtype).element_size()
        )

    def prefill(
        self, request_id: str, ids: list[int], kv_out: torch.Tensor, pad_to: int, prefix_kv, prefix_len
    ):
        r = self.model.prefill(ids, kv_out=kv_out, pad_to=pad_to, prefix_kv=prefix_kv, prefix_len=prefix_len)
        return PrefillOut(r.first_token, r.kv, r.num_tokens, r.prefix_len)

    def decode_step(self, pool, seqs) -> list[int]:
        return self.model.decode_step(pool, seqs)

    def check_kv(self, request_id: str, pool, block_ids: list[int], tokens: int) -> bool:
        """Whether the received KV is plausibly the sender's (real mode: no cheap check)."""
        return True


class ProfiledCompute(Compute):
    """Sleeps for the profile's prediction; writes KV bytes of the real size."""

    mode = "profiled"

    def __init__(self, profile: Profile, cfg: Any, dtype: torch.dtype) -> None:
        super().__init__(None, cfg, dtype)
        self.profile = profile

    def prefill(
        self, request_id: str, ids: list[int], kv_out: torch.Tensor, pad_to: int, prefix_kv, prefix_len
    ):
        c = self.config
        n = len(ids)
        p = min(int(prefix_len), n - 1) if prefix_kv is not None else 0
        t_pad = -(-n // pad_to) * pad_to
        t0 = time.monotonic()
        shape = (c.num_layers, 2, t_pad, c.num_kv_heads, c.head_dim)
        nbytes = int(np.prod(shape)) * self.geometry.dtype_bytes
        kv = kv_out.reshape(-1).view(torch.uint8)[:nbytes].view(self.dtype).view(shape)
        kv.fill_(fill_value(request_id))
        left = self.profile.prefill_s(n - p) - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        first = (sum(ids) * 31 + n) % c.vocab_size
        return PrefillOut(int(first), kv, n, p)

    def decode_step(self, pool, seqs) -> list[int]:
        t0 = time.monotonic()
        bt = pool.block_tokens
        out = []
        for s in seqs:
            more = pool.blocks_for(s.length + 1) - len(s.block_table)
            if more > 0:
                s.block_table.extend(pool.allocate(more * bt))
            s.length += 1
            s.last_token = int((s.last_token * 1103515245 + 12345 + s.length) % self.config.vocab_size)
            out.append(s.last_token)
        left = self.profile.decode_s(len(seqs)) - (time.monotonic() - t0)
        if left > 0:
            time.sleep(left)
        return out

    def check_kv(self, request_id: str, pool, block_ids: list[int], tokens: int) -> bool:
        want = fill_value(request_id)
        bt = pool.block_tokens
        last = block_ids[(tokens - 1) // bt]
        t = pool.tensor
        return bool(
            t[0, 0, block_ids[0], 0, 0, 0] == want and t[-1, 1, last, (tokens - 1) % bt, -1, -1] == want
        )


def make_compute(cfg: WorkerConfig) -> tuple[Any, Compute]:
    """``(tokenizer_or_None, Compute)`` for a worker configuration."""
    torch.set_num_threads(max(1, cfg.torch_threads))
    if cfg.mode == "real":
        tok, model = load_model(cfg.model, cfg.seed, cfg.device)
        return tok, Compute(model, model.config, model.dtype)
    prof = load_profile(cfg.profile or cfg.model)
    if cfg.model in RANDOM_MODELS:
        mcfg = RANDOM_MODELS[cfg.model](cfg.seed)
    else:
        from kvxfer.models import ModelConfig

        mcfg = ModelConfig.from_hf_dict(prof.config, name=cfg.model)
    return None, ProfiledCompute(prof, mcfg, getattr(torch, prof.dtype))


class PrefixCache:
    """Per-scenario KV of the shared setting part [paper: prefix reuse inside a scenario;
    the policy below is ours, inferred].

    One entry per scenario: token ids and their K/V. A prompt's common prefix with the entry,
    if at least ``min_tokens`` long, is reused (a hit) and the entry shrinks to that common
    part (the setting part). A miss replaces the entry with the new prompt. ``kv`` is None in
    profiled mode (only the token bookkeeping and the saved compute matter there).
    """

    def __init__(self, min_tokens: int = 16, max_scenarios: int = 64, enabled: bool = True) -> None:
        self.min_tokens = min_tokens
        self.max_scenarios = max_scenarios
        self.enabled = enabled
        self._entries: dict[str, tuple[list[int], torch.Tensor | None]] = {}
        self.lookups = 0
        self.hits = 0
        self.tokens_reused = 0
        self.tokens_total = 0

    @staticmethod
    def _common(a: list[int], b: list[int]) -> int:
        n = min(len(a), len(b))
        x = np.asarray(a[:n], dtype=np.int64) != np.asarray(b[:n], dtype=np.int64)
        return int(np.argmax(x)) if x.any() else n

    def lookup(self, scenario: str, ids: list[int]) -> tuple[torch.Tensor | None, int]:
        """(prefix K/V or None, prefix length) to pass to prefill."""
        if not self.enabled:
            return None, 0
        self.lookups += 1
        self.tokens_total += len(ids)
        entry = self._entries.get(scenario)
        if entry is None:
            return None, 0
        c = min(self._common(entry[0], ids), len(ids) - 1)
        if c < self.min_tokens:
            return None, 0
        self.hits += 1
        self.tokens_reused += c
        kv = entry[1]
        return (kv if kv is not None else torch.empty(0)), c

    def update(self, scenario: str, ids: list[int], kv: torch.Tensor | None) -> None:
        """After a prefill: keep the setting part (``kv`` holds the prompt's K/V, [L,2,>=T,H,D])."""
        if not self.enabled:
            return
        entry = self._entries.get(scenario)
        c = 0 if entry is None else self._common(entry[0], ids)
        if entry is not None and c >= self.min_tokens:
            if c < len(entry[0]):
                ekv = entry[1]
                self._entries[scenario] = (entry[0][:c], None if ekv is None else ekv[:, :, :c].clone())
            return
        if len(self._entries) >= self.max_scenarios and scenario not in self._entries:
            self._entries.pop(next(iter(self._entries)))
        self._entries[scenario] = (list(ids), None if kv is None else kv[:, :, : len(ids)].clone())

    def stats(self) -> dict[str, float]:
        return {
            "prefix_lookups": self.lookups,
            "prefix_hits": self.hits,
            "prefix_hit_rate": self.hits / self.lookups if self.lookups else 0.0,
            "prefix_token_reuse": self.tokens_reused / self.tokens_total if self.tokens_total else 0.0,
        }
