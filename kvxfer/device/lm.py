"""The language model as P/D-Device uses it, on top of :mod:`kvxfer.models` (torch).

Both sides run the same :class:`kvxfer.models.Model`. The device needs an incremental KV:
:meth:`LM.extend` prefills a batch of new tokens on top of what the state holds (the batched
absorb of cloud tokens, and chunked prompt prefill), :meth:`LM.truncate` keeps a prefix (when
the refined prompt replaces the raw one), :meth:`LM.decode` takes greedy steps on a paged pool.
:meth:`LM.identity` is what the session handshake compares: the model version (config and a
weight digest) and the tokenizer digest.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch

from kvxfer.device.errors import BadSettingsError
from kvxfer.models import Model, PagedKVPool, Sequence, tiny_config

BLOCK = 16


@dataclass
class KvState:
    ids: list[int] = field(default_factory=list)
    kv: torch.Tensor | None = None  # [L, 2, >= len(ids), H_kv, D]
    next_token: int | None = None  # greedy token after ids (logits of the last extend)
    pool: PagedKVPool | None = None
    seq: Sequence | None = None


class LM:
    def __init__(self, model: Model, tokenizer=None, tokenizer_id: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self._tokenizer_id = tokenizer_id
        self._identity: dict | None = None

    # ---- identity ----------------------------------------------------------------------------
    def identity(self) -> dict:
        if self._identity is None:
            cfg = self.model.config
            h = hashlib.sha256(json.dumps(cfg.to_hf_dict(), sort_keys=True, default=str).encode())
            for t in (self.model.embed, self.model.lm_head):
                h.update(t[: min(64, t.shape[0])].detach().float().cpu().contiguous().numpy().tobytes())
            if self.tokenizer is not None:
                vocab = sorted(self.tokenizer.get_vocab().items())
                tok = hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
            else:
                tok = hashlib.sha256((self._tokenizer_id or f"ids:{cfg.vocab_size}").encode()).hexdigest()[
                    :16
                ]
            self._identity = {"model": cfg.name, "model_version": h.hexdigest()[:16], "tokenizer_hash": tok}
        return dict(self._identity)

    # ---- incremental KV ----------------------------------------------------------------------
    def extend(self, st: KvState, ids: list[int], return_attention_mass: bool = False):
        """Prefills ``ids`` after ``st.ids`` in one batched pass. Returns the attention mass
        over all positions when asked (the last-layer mass of the new queries)."""
        if not ids:
            raise BadSettingsError("extend: no tokens")
        if st.seq is not None:
            raise BadSettingsError("extend after decode is not supported")
        allids = st.ids + [int(t) for t in ids]
        p = len(st.ids)
        res = self.model.prefill(
            allids,
            prefix_kv=st.kv if p else None,
            prefix_len=p,
            return_attention_mass=return_attention_mass,
        )
        st.ids, st.kv, st.next_token = allids, res.kv, res.first_token
        return res.attention_mass

    def truncate(self, st: KvState, n: int) -> None:
        if st.seq is not None or n > len(st.ids) or n < 0:
            raise BadSettingsError(f"truncate to {n} of {len(st.ids)} tokens")
        st.ids = st.ids[:n]
        st.kv = None if n == 0 or st.kv is None else st.kv[:, :, :n]
        st.next_token = None

    def decode(self, st: KvState, max_new: int) -> int:
        """One greedy step: returns the token after ``st.next_token`` and advances."""
        if st.next_token is None:
            raise BadSettingsError("decode needs a state whose last extend produced a token")
        if st.seq is None:
            n = len(st.ids)
            cfg = self.model.config
            st.pool = PagedKVPool(
                cfg,
                num_blocks=-(-(n + max_new + 1) // BLOCK),
                block_tokens=BLOCK,
                device=self.model.device,
                dtype=self.model.dtype,
            )
            st.seq = Sequence("device", st.pool.allocate(n), n, st.next_token)
            st.pool.scatter_from_contiguous(st.kv, st.seq.block_table, n)
        st.ids.append(st.next_token)
        (t,) = self.model.decode_step(st.pool, [st.seq])
        st.next_token = t
        return t

    def greedy(self, ids: list[int], max_tokens: int) -> list[int]:
        return self.model.generate(ids, max_tokens)


def tiny_lm(seed: int = 0, max_positions: int = 16384, device: str = "cpu", **overrides) -> LM:
    """A seeded random tiny model (tests, timing runs): same seed, same model on both sides."""
    cfg = tiny_config(seed=seed, max_position_embeddings=max_positions, **overrides)
    return LM(Model(cfg, device=device))


def smollm2_lm() -> LM:
    """SmolLM2-135M-Instruct with its tokenizer (real weights)."""
    from kvxfer.models import load_smollm2

    tok, model = load_smollm2()
    return LM(model, tokenizer=tok)


def serve_tiny_lm(seed: int = 0, device: str = "cpu") -> LM:
    """The tiny model a P/D-Serve deployment runs for ``model="tiny"`` (mirrors
    ``kvxfer.serve.runtime.tiny_model_config``: vocabulary 512 for its byte tokenizer, 4096
    positions), so a device can share a session with the P/D-Serve gateway."""
    cfg = tiny_config(seed=seed, vocab_size=512, max_position_embeddings=4096)
    return LM(Model(cfg, device=device), tokenizer_id="bytes:512")


def load_lm(name: str, device: str = "cpu") -> LM:
    """``tiny[:SEED]``, ``serve-tiny[:SEED]`` or ``smollm2``."""
    if name.startswith("serve-tiny"):
        seed = int(name.split(":", 1)[1]) if ":" in name else 0
        return serve_tiny_lm(seed, device=device)
    if name.startswith("tiny"):
        seed = int(name.split(":", 1)[1]) if ":" in name else 0
        return tiny_lm(seed, device=device)
    if name == "smollm2":
        return smollm2_lm()
    raise BadSettingsError(f"unknown model {name!r}; use tiny[:SEED] or smollm2")
