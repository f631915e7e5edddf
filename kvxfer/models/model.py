"""A decoder-only Llama-family transformer with a block-free prefill and a paged, batched decode.

Prefill writes every layer's K and V, layer-major, into ONE contiguous buffer
``[L][2][T_pad][H_kv][D]`` (the P/D-Serve sender buffer); decode reads and appends K/V in a
:class:`~kvxfer.models.pool.PagedKVPool` through per-sequence block tables, for a batch of
sequences of any mix of lengths (continuous batching). Weights use transformers' Llama
state-dict names, so one state dict loads into this model and into ``LlamaForCausalLM``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable
from collections.abc import Sequence as SequenceT
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .config import ModelConfig
from .errors import (
    BufferTooSmallError,
    ContextLengthError,
    EmptyPromptError,
    InvalidArgumentError,
    InvalidTokenError,
    PoolExhaustedError,
    WeightsError,
)
from .pool import PagedKVPool, Sequence


@dataclass
class PrefillResult:
    """What :meth:`Model.prefill` returns.

    ``first_token``: greedy argmax after the prompt. ``kv``: ``[L, 2, T_pad, H_kv, D]`` view of
    the contiguous KV buffer (positions ``>= num_tokens`` are zero). ``attention_mass``:
    ``[num_tokens]`` float32 CPU tensor or ``None``. ``prefix_len``: how many leading tokens'
    K/V were reused instead of computed.
    """

    first_token: int
    kv: torch.Tensor
    num_tokens: int
    prefix_len: int = 0
    attention_mass: torch.Tensor | None = None


def random_state_dict(cfg: ModelConfig, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights (float32, CPU) under transformers' Llama names.

    Scales keep activations O(1) so greedy tokens are decided by clear logit margins.
    """
    g = torch.Generator().manual_seed(int(seed))

    def lin(out: int, inp: int) -> torch.Tensor:
        return torch.randn(out, inp, generator=g) / math.sqrt(inp)

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    c = cfg
    qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    sd = {"model.embed_tokens.weight": torch.randn(c.vocab_size, c.hidden_size, generator=g)}
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = norm(c.hidden_size)
        sd[p + "self_attn.q_proj.weight"] = lin(qd, c.hidden_size)
        sd[p + "self_attn.k_proj.weight"] = lin(kvd, c.hidden_size)
        sd[p + "self_attn.v_proj.weight"] = lin(kvd, c.hidden_size)
        sd[p + "self_attn.o_proj.weight"] = lin(c.hidden_size, qd)
        sd[p + "post_attention_layernorm.weight"] = norm(c.hidden_size)
        sd[p + "mlp.gate_proj.weight"] = lin(c.intermediate_size, c.hidden_size)
        sd[p + "mlp.up_proj.weight"] = lin(c.intermediate_size, c.hidden_size)
        sd[p + "mlp.down_proj.weight"] = lin(c.hidden_size, c.intermediate_size)
    sd["model.norm.weight"] = norm(c.hidden_size)
    if not c.tie_word_embeddings:
        sd["lm_head.weight"] = lin(c.vocab_size, c.hidden_size) * 4.0
    return sd


class _Layer:
    __slots__ = ("attn_norm", "wqkv", "wo", "mlp_norm", "wgu", "wdown")


class Model:
    """Greedy Llama-family decoder. See the module docstring for the KV layouts.

    ``Model(cfg, state_dict=None, seed=None, device="cpu", dtype=torch.float32)``: random
    weights from ``seed`` (default ``cfg.seed``) when no state dict is given. Not thread-safe.
    """

    #: how many of the last layers' attention is summed into ``PrefillResult.attention_mass``
    attention_mass_layers: int = 2

    def __init__(
        self,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor] | None = None,
        seed: int | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = cfg
        self.device = torch.device(device)
        self.dtype = dtype
        if not dtype.is_floating_point:
            raise InvalidArgumentError(f"model dtype must be floating point, got {dtype}")
        if state_dict is None:
            state_dict = random_state_dict(cfg, cfg.seed if seed is None else seed)
        self._load(state_dict)
        c = cfg
        self._group = c.num_heads // c.num_kv_heads
        self._scale = 1.0 / math.sqrt(c.head_dim)
        self._inv_freq = 1.0 / (
            c.rope_theta
            ** (torch.arange(0, c.head_dim, 2, dtype=torch.float32, device=self.device) / c.head_dim)
        )
        self.attention_mass_layers = min(self.attention_mass_layers, c.num_layers)

    # -- weights -------------------------------------------------------------------------------
    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        c = self.config
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        used: set[str] = set()

        def get(name: str, shape: tuple[int, ...]) -> torch.Tensor:
            if name not in sd:
                raise WeightsError(f"state dict lacks {name!r} (config {c.name})")
            t = sd[name]
            if tuple(t.shape) != shape:
                raise WeightsError(f"{name}: shape {tuple(t.shape)} but the config needs {shape}")
            used.add(name)
            return t.detach().to(device=self.device, dtype=self.dtype).contiguous()

        h = c.hidden_size
        self.embed = get("model.embed_tokens.weight", (c.vocab_size, h))
        self.layers: list[_Layer] = []
        for i in range(c.num_layers):
            p = f"model.layers.{i}."
            lay = _Layer()
            lay.attn_norm = get(p + "input_layernorm.weight", (h,))
            lay.wqkv = torch.cat(
                [
                    get(p + "self_attn.q_proj.weight", (qd, h)),
                    get(p + "self_attn.k_proj.weight", (kvd, h)),
                    get(p + "self_attn.v_proj.weight", (kvd, h)),
                ]
            )
            lay.wo = get(p + "self_attn.o_proj.weight", (h, qd))
            lay.mlp_norm = get(p + "post_attention_layernorm.weight", (h,))
            lay.wgu = torch.cat(
                [
                    get(p + "mlp.gate_proj.weight", (c.intermediate_size, h)),
                    get(p + "mlp.up_proj.weight", (c.intermediate_size, h)),
                ]
            )
            lay.wdown = get(p + "mlp.down_proj.weight", (h, c.intermediate_size))
            self.layers.append(lay)
        self.norm = get("model.norm.weight", (h,))
        if c.tie_word_embeddings:
            self.lm_head = self.embed
            used.add("lm_head.weight")
        else:
            self.lm_head = get("lm_head.weight", (c.vocab_size, h))
        extra = [k for k in sd if k not in used and not k.endswith("rotary_emb.inv_freq")]
        if extra:
            raise WeightsError(f"state dict has {len(extra)} unexpected tensors, e.g. {extra[:3]}")

    @property
    def kv_bytes_per_token(self) -> int:
        c = self.config
        return (
            2 * c.num_layers * c.num_kv_heads * c.head_dim * torch.empty((), dtype=self.dtype).element_size()
        )

    def kv_buffer_bytes(self, num_tokens: int, pad_to: int = 1) -> int:
        """Bytes of the contiguous prefill buffer for a prompt of ``num_tokens`` tokens."""
        return _round_up(int(num_tokens), int(pad_to)) * self.kv_bytes_per_token

    # -- building blocks -----------------------------------------------------------------------
    def _rms(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return w * xf.to(x.dtype)

    def _rope(self, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = pos.to(torch.float32)[:, None] * self._inv_freq[None, :]
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    @staticmethod
    def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [..., n, H, D]; cos/sin [n, D] broadcast over heads (the "rotate half" convention).
        half = x.shape[-1] // 2
        rot = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos[:, None, :] + rot * sin[:, None, :]

    def _qkv(self, lay: _Layer, x: torch.Tensor, cos, sin):
        c = self.config
        qkv = self._rms(x, lay.attn_norm) @ lay.wqkv.T
        qd, kvd = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        q = qkv[:, :qd].reshape(-1, c.num_heads, c.head_dim)
        k = qkv[:, qd : qd + kvd].reshape(-1, c.num_kv_heads, c.head_dim)
        v = qkv[:, qd + kvd :].reshape(-1, c.num_kv_heads, c.head_dim)
        return self._apply_rope(q, cos, sin), self._apply_rope(k, cos, sin), v

    def _mlp(self, lay: _Layer, x: torch.Tensor) -> torch.Tensor:
        gu = self._rms(x, lay.mlp_norm) @ lay.wgu.T
        g, u = gu.split(self.config.intermediate_size, dim=-1)
        return (F.silu(g) * u) @ lay.wdown.T

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._rms(x, self.norm) @ self.lm_head.T

    def _check_tokens(self, token_ids: SequenceT[int], what: str) -> list[int]:
        ids = [int(t) for t in token_ids]
        v = self.config.vocab_size
        bad = [t for t in ids if not 0 <= t < v]
        if bad:
            raise InvalidTokenError(f"{what}: token id {bad[0]} outside the vocabulary 0..{v - 1}")
        return ids

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(
        self,
        token_ids: SequenceT[int],
        kv_out: torch.Tensor | np.ndarray | None = None,
        pad_to: int = 1,
        prefix_kv: torch.Tensor | None = None,
        prefix_len: int = 0,
        return_attention_mass: bool = False,
    ) -> PrefillResult:
        """Runs the prompt, writes its K/V layer-major into one contiguous buffer.

        ``kv_out``: a contiguous uint8 or float tensor (or numpy array) of at least
        :meth:`kv_buffer_bytes` bytes, on any device; its leading bytes become ``res.kv``
        (dtype = the model's). ``prefix_kv`` ``[L, 2, >= prefix_len, H_kv, D]`` holds the K/V
        of ``token_ids[:prefix_len]`` (e.g. an earlier ``res.kv`` of a prompt with the same
        prefix); those tokens are not recomputed. The caller vouches that the prefix matches.
        At least the last token is always computed (its logits give ``first_token``).
        """
        c = self.config
        ids = self._check_tokens(token_ids, "prefill")
        n_tok = len(ids)
        if n_tok == 0:
            raise EmptyPromptError("prefill: the prompt has no tokens")
        if n_tok > c.max_position_embeddings:
            raise ContextLengthError(
                f"prefill: prompt of {n_tok} tokens exceeds max_position_embeddings "
                f"{c.max_position_embeddings}"
            )
        if int(pad_to) < 1:
            raise InvalidArgumentError(f"prefill: pad_to must be >= 1, got {pad_to}")
        t_pad = _round_up(n_tok, int(pad_to))
        shape = (c.num_layers, 2, t_pad, c.num_kv_heads, c.head_dim)
        kv = self._kv_view(kv_out, shape)

        p = int(prefix_len)
        if p < 0 or p > n_tok:
            raise InvalidArgumentError(f"prefill: prefix_len {p} outside 0..{n_tok}")
        if p and prefix_kv is None:
            raise InvalidArgumentError("prefill: prefix_len > 0 needs prefix_kv")
        p = min(p, n_tok - 1)
        if p:
            if (
                prefix_kv.dim() != 5
                or tuple(prefix_kv.shape[:2]) != (c.num_layers, 2)
                or tuple(prefix_kv.shape[3:]) != (c.num_kv_heads, c.head_dim)
                or prefix_kv.shape[2] < p
            ):
                raise InvalidArgumentError(
                    f"prefill: prefix_kv must be [{c.num_layers}, 2, >={p}, {c.num_kv_heads}, {c.head_dim}], "
                    f"got {list(prefix_kv.shape)}"
                )

        x = self.embed[torch.as_tensor(ids[p:], device=self.device)]
        cos, sin = self._rope(torch.arange(p, n_tok, device=self.device))
        # causal: query i (position p + i) sees keys 0 .. p + i
        causal = (
            torch.arange(n_tok, device=self.device)[None, :]
            <= torch.arange(p, n_tok, device=self.device)[:, None]
        )
        mass = torch.zeros(n_tok, dtype=torch.float32, device=self.device) if return_attention_mass else None
        with _attention_backends(self.device):
            x = self._prefill_layers(x, cos, sin, kv, prefix_kv, p, n_tok, causal, mass)
        if t_pad > n_tok:
            kv[:, :, n_tok:].zero_()
        first = int(self._logits(x[-1:]).argmax(-1).item())
        return PrefillResult(
            first_token=first,
            kv=kv,
            num_tokens=n_tok,
            prefix_len=p,
            attention_mass=None if mass is None else mass.cpu(),
        )

    def _prefill_layers(self, x, cos, sin, kv, prefix_kv, p, n_tok, causal, mass):
        c = self.config
        n = n_tok - p
        first_mass_layer = c.num_layers - self.attention_mass_layers
        for li, lay in enumerate(self.layers):
            q, k, v = self._qkv(lay, x, cos, sin)
            if p:
                pk = prefix_kv[li, :, :p].to(device=self.device, dtype=self.dtype)
                k_all, v_all = torch.cat([pk[0], k]), torch.cat([pk[1], v])
            else:
                k_all, v_all = k, v
            kv[li, 0, :n_tok].copy_(k_all)
            kv[li, 1, :n_tok].copy_(v_all)
            qh = q.transpose(0, 1)  # [Hq, n, D]
            kh = k_all.transpose(0, 1).repeat_interleave(self._group, dim=0)  # [Hq, T, D]
            vh = v_all.transpose(0, 1).repeat_interleave(self._group, dim=0)
            if mass is not None and li >= first_mass_layer:
                scores = (qh @ kh.transpose(1, 2)).float() * self._scale
                probs = scores.masked_fill(~causal, float("-inf")).softmax(-1)
                mass += probs.sum(dim=(0, 1))
                att = probs.to(self.dtype) @ vh
            else:  # 4-D [1, H, T, D]: the fused CUDA kernels take only that
                mask = None if p == 0 else causal  # a plain causal square: torch's flash kernel
                att = F.scaled_dot_product_attention(
                    qh[None], kh[None], vh[None], attn_mask=mask, is_causal=p == 0, scale=self._scale
                )[0]
            x = x + att.transpose(0, 1).reshape(n, -1) @ lay.wo.T
            x = x + self._mlp(lay, x)
        return x

    def _kv_view(self, kv_out, shape: tuple[int, ...]) -> torch.Tensor:
        if kv_out is None:
            return torch.empty(shape, device=self.device, dtype=self.dtype)
        if isinstance(kv_out, np.ndarray):
            kv_out = torch.from_numpy(kv_out)
        if not isinstance(kv_out, torch.Tensor):
            raise InvalidArgumentError(f"kv_out must be a tensor or numpy array, got {type(kv_out).__name__}")
        if not kv_out.is_contiguous():
            raise InvalidArgumentError("kv_out must be contiguous")
        need = math.prod(shape) * torch.empty((), dtype=self.dtype).element_size()
        have = kv_out.numel() * kv_out.element_size()
        if have < need:
            raise BufferTooSmallError(f"kv_out holds {have} bytes, the prompt's KV needs {need}")
        raw = kv_out.reshape(-1).view(torch.uint8)[:need]
        return raw.view(self.dtype).view(shape)

    # -- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_step(self, pool: PagedKVPool, seqs: list[Sequence]) -> list[int]:
        """One greedy step for every sequence in ``seqs`` (any mix of lengths).

        For each sequence: writes the K/V of ``last_token`` at position ``length`` (taking a
        block from ``pool`` when the table is full), attends over positions ``0..length``,
        then sets ``last_token`` to the argmax and ``length += 1``. Returns the new tokens in
        ``seqs`` order. Raises before changing anything if the pool lacks blocks
        (:class:`PoolExhaustedError`) or a sequence would exceed the context.
        """
        if not seqs:
            return []
        c = self.config
        self._check_pool(pool)
        bt = pool.block_tokens
        if len({id(s) for s in seqs}) != len(seqs):
            raise InvalidArgumentError("decode_step: the same Sequence appears twice in the batch")
        need_new = 0
        for s in seqs:
            if s.length < 0:
                raise InvalidArgumentError(f"decode_step: {s.request_id}: negative length {s.length}")
            if s.length + 1 > c.max_position_embeddings:
                raise ContextLengthError(
                    f"decode_step: {s.request_id} would reach {s.length + 1} positions, "
                    f"max_position_embeddings is {c.max_position_embeddings}"
                )
            self._check_tokens([s.last_token], f"decode_step: {s.request_id}")
            pool.check_blocks(s.block_table, s.length)
            need_new += max(0, pool.blocks_for(s.length + 1) - len(s.block_table))
        if need_new > pool.free_blocks:
            raise PoolExhaustedError(
                f"decode_step: {need_new} new blocks needed for {len(seqs)} sequences, "
                f"{pool.free_blocks} free"
            )
        for s in seqs:
            more = pool.blocks_for(s.length + 1) - len(s.block_table)
            if more > 0:
                s.block_table.extend(pool.allocate(more * bt))

        bsz = len(seqs)
        lengths = torch.tensor([s.length for s in seqs], dtype=torch.long)
        max_blocks = max(pool.blocks_for(s.length + 1) for s in seqs)
        table = torch.zeros((bsz, max_blocks), dtype=torch.long)
        for b, s in enumerate(seqs):
            nb = pool.blocks_for(s.length + 1)
            table[b, :nb] = torch.as_tensor(s.block_table[:nb], dtype=torch.long)
        span = int(lengths.max()) + 1
        pos = torch.arange(span)
        slots = table[:, pos // bt] * bt + pos % bt  # [B, span] flat slot of each position
        write = slots[torch.arange(bsz), lengths]  # [B] slot of the new token
        mask = (pos[None, :] <= lengths[:, None])[:, None, None, :].to(self.device)  # [B, 1, 1, span]
        slots, write = slots.reshape(-1).to(self.device), write.to(self.device)

        flat = pool.tensor.view(c.num_layers, 2, pool.num_blocks * bt, c.num_kv_heads, c.head_dim)
        x = self.embed[torch.as_tensor([s.last_token for s in seqs], device=self.device)]
        cos, sin = self._rope(lengths.to(self.device))
        for li, lay in enumerate(self.layers):
            q, k, v = self._qkv(lay, x, cos, sin)
            flat[li, 0].index_copy_(0, write, k.to(pool.dtype))
            flat[li, 1].index_copy_(0, write, v.to(pool.dtype))
            keys = flat[li, 0].index_select(0, slots).view(bsz, span, c.num_kv_heads, c.head_dim)
            vals = flat[li, 1].index_select(0, slots).view(bsz, span, c.num_kv_heads, c.head_dim)
            # One query per sequence: plain matmuls, query heads grouped under their KV head
            # (no K/V repeat). SDPA is avoided here: on CUDA its cuDNN path rebuilds a graph for
            # every new span, i.e. every step.
            qg = q.view(bsz, c.num_kv_heads, self._group, c.head_dim)
            scores = (qg @ keys.to(self.dtype).permute(0, 2, 3, 1)).float() * self._scale  # [B, Hkv, G, span]
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1).to(self.dtype)
            att = probs @ vals.to(self.dtype).transpose(1, 2)  # [B, Hkv, G, D]
            x = x + att.reshape(bsz, -1) @ lay.wo.T
            x = x + self._mlp(lay, x)
        nxt = self._logits(x).argmax(-1).tolist()
        for s, t in zip(seqs, nxt, strict=True):
            s.length += 1
            s.last_token = int(t)
        return [int(t) for t in nxt]

    def _check_pool(self, pool: PagedKVPool) -> None:
        c, pc = self.config, pool.config
        if (pc.num_layers, pc.num_kv_heads, pc.head_dim) != (c.num_layers, c.num_kv_heads, c.head_dim):
            raise InvalidArgumentError("decode_step: the pool was made for another model shape")
        if pool.device != self.device and not (
            pool.device.type == self.device.type == "cuda"
            and (pool.device.index or 0) == (self.device.index or 0)
        ):
            raise InvalidArgumentError(f"decode_step: pool on {pool.device}, model on {self.device}")

    # -- aggregated reference ------------------------------------------------------------------
    def generate(
        self,
        token_ids: SequenceT[int],
        max_tokens: int,
        stop_token_ids: Iterable[int] = (),
        block_tokens: int = 16,
    ) -> list[int]:
        """Greedy generation on one private pool: prefill, scatter, decode.

        Returns up to ``max_tokens`` new tokens; a stop token ends it and is included as the
        last element.
        """
        if max_tokens < 0:
            raise InvalidArgumentError(f"generate: max_tokens must be >= 0, got {max_tokens}")
        ids = list(token_ids)
        if not ids:
            raise EmptyPromptError("generate: the prompt has no tokens")
        if max_tokens == 0:
            self._check_tokens(ids, "generate")
            return []
        if len(ids) + max_tokens - 1 > self.config.max_position_embeddings:
            raise ContextLengthError(
                f"generate: {len(ids)} prompt + {max_tokens} new tokens exceed max_position_embeddings "
                f"{self.config.max_position_embeddings}"
            )
        stops = {int(t) for t in stop_token_ids}
        res = self.prefill(ids, pad_to=block_tokens)
        out = [res.first_token]
        if res.first_token in stops or max_tokens == 1:
            return out
        pool = PagedKVPool(
            self.config,
            num_blocks=-(-(len(ids) + max_tokens) // block_tokens),
            block_tokens=block_tokens,
            device=self.device,
            dtype=self.dtype,
        )
        seq = Sequence("generate", pool.allocate(len(ids)), len(ids), res.first_token)
        pool.scatter_from_contiguous(res.kv, seq.block_table, len(ids))
        while len(out) < max_tokens:
            (t,) = self.decode_step(pool, [seq])
            out.append(t)
            if t in stops:
                break
        return out


def _attention_backends(device: torch.device):
    """SDPA without cuDNN on CUDA: its graph is built per shape (tens of ms), and prompts vary."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m
