"""The decode side's paged KV pool and the sequences that live in it.

Layout (one contiguous tensor, registered with kvxfer as ONE region)::

    pool.tensor[layer, kv, block, slot, kv_head, head_dim]      kv: 0 = K, 1 = V

so piece ``(layer, kv, block)`` of ``block_tokens * H_kv * D * esize`` bytes sits at
``((layer * 2 + kv) * num_blocks + block) * block_bytes``: kvxfer's dense ``KvLayout``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig
from .errors import InvalidArgumentError, PoolExhaustedError


@dataclass
class Sequence:
    """A request being decoded out of a :class:`PagedKVPool`.

    ``length``: tokens whose K/V are in the pool (positions ``0 .. length-1``, in
    ``block_table`` order, ``block_tokens`` per block). ``last_token``: the next input token,
    whose K/V are not in the pool yet (after prefill: the first generated token).
    ``decode_step`` writes its K/V at position ``length``, then advances both.
    """

    request_id: str
    block_table: list[int]
    length: int
    last_token: int


class PagedKVPool:
    """Fixed-size blocks of K/V for every layer, handed out by a free list.

    Contract: :meth:`allocate` is all-or-nothing (raises :class:`PoolExhaustedError`
    without taking any block); :meth:`free` refuses ids that are not currently allocated.
    Not thread-safe: one decode loop owns a pool.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_blocks: int,
        block_tokens: int,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        buffer: torch.Tensor | np.ndarray | None = None,
    ) -> None:
        """``buffer``: optional memory for the pool, e.g. ``kvxfer.empty(PagedKVPool.nbytes_for(...))``
        (which a same-host peer can map); contiguous, at least :meth:`nbytes_for` bytes, on
        ``device``. It is zeroed. Without it the pool allocates its own tensor."""
        if num_blocks <= 0 or block_tokens <= 0:
            raise InvalidArgumentError(
                f"num_blocks and block_tokens must be positive, got {num_blocks}, {block_tokens}"
            )
        self.config = cfg
        self.num_blocks = int(num_blocks)
        self.block_tokens = int(block_tokens)
        self.device = torch.device(device)
        self.dtype = dtype
        shape = (cfg.num_layers, 2, self.num_blocks, self.block_tokens, cfg.num_kv_heads, cfg.head_dim)
        if buffer is None:
            self.tensor = torch.zeros(shape, device=self.device, dtype=dtype)
        else:
            self.tensor = _view(buffer, shape, dtype, self.device)
            self.tensor.zero_()
        # LIFO free list, lowest ids handed out first on a fresh pool.
        self._free: list[int] = list(range(self.num_blocks - 1, -1, -1))
        self._used = bytearray(self.num_blocks)

    # -- sizes ---------------------------------------------------------------------------------
    @staticmethod
    def nbytes_for(
        cfg: ModelConfig, num_blocks: int, block_tokens: int, dtype: torch.dtype = torch.float32
    ) -> int:
        """Bytes of a pool of this shape (what ``buffer`` must hold)."""
        esize = torch.empty((), dtype=dtype).element_size()
        return cfg.num_layers * 2 * num_blocks * block_tokens * cfg.num_kv_heads * cfg.head_dim * esize

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @property
    def block_bytes(self) -> int:
        c = self.config
        return self.block_tokens * c.num_kv_heads * c.head_dim * self.tensor.element_size()

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    def blocks_for(self, n_tokens: int) -> int:
        return -(-int(n_tokens) // self.block_tokens)

    def layout(self):
        """The kvxfer ``KvLayout`` of :attr:`tensor` (dense ``[layer][kv][block]`` order)."""
        from .. import KvLayout  # imported late: the runtime itself does not need the native module

        c = self.config
        return KvLayout(
            num_layers=c.num_layers, num_kv=2, num_blocks=self.num_blocks, block_bytes=self.block_bytes
        )

    # -- allocation ----------------------------------------------------------------------------
    def allocate(self, n_tokens: int) -> list[int]:
        """Block ids for ``n_tokens`` tokens (``ceil(n_tokens / block_tokens)`` blocks)."""
        if n_tokens < 0:
            raise InvalidArgumentError(f"allocate: n_tokens must be >= 0, got {n_tokens}")
        need = self.blocks_for(n_tokens)
        if need > len(self._free):
            raise PoolExhaustedError(
                f"KV pool out of blocks: {need} needed for {n_tokens} tokens, {len(self._free)} free "
                f"of {self.num_blocks}"
            )
        ids = [self._free.pop() for _ in range(need)]
        for i in ids:
            self._used[i] = 1
        return ids

    def free(self, block_ids) -> None:
        ids = [int(i) for i in block_ids]
        for i in ids:
            if not 0 <= i < self.num_blocks or not self._used[i]:
                raise InvalidArgumentError(f"free: block {i} is not allocated in this pool")
        if len(set(ids)) != len(ids):
            raise InvalidArgumentError("free: duplicate block ids")
        for i in reversed(ids):
            self._used[i] = 0
            self._free.append(i)

    def check_blocks(self, block_ids, n_tokens: int) -> None:
        """Raises unless ``block_ids`` are valid ids that cover ``n_tokens`` tokens."""
        if len(block_ids) < self.blocks_for(n_tokens):
            raise InvalidArgumentError(
                f"{len(block_ids)} blocks cannot hold {n_tokens} tokens of {self.block_tokens} per block"
            )
        for i in block_ids:
            if not 0 <= int(i) < self.num_blocks:
                raise InvalidArgumentError(f"block id {i} outside the pool's 0..{self.num_blocks - 1}")

    # -- RecvScatter (function form) -----------------------------------------------------------
    def scatter_from_contiguous(self, kv: torch.Tensor, block_ids, num_tokens: int | None = None) -> None:
        """Copies a prefill buffer ``kv [L, 2, T_pad, H_kv, D]`` into the blocks ``block_ids``.

        Token ``t`` goes to block ``block_ids[t // block_tokens]``, slot ``t % block_tokens``,
        for ``t < num_tokens`` (default ``T_pad``). The reference path for what one kvxfer
        transfer (one local extent, remote block ids) does byte for byte when
        ``T_pad == len(block_ids) * block_tokens``.
        """
        c = self.config
        if (
            kv.dim() != 5
            or tuple(kv.shape[:2]) != (c.num_layers, 2)
            or tuple(kv.shape[3:])
            != (
                c.num_kv_heads,
                c.head_dim,
            )
        ):
            raise InvalidArgumentError(
                f"scatter_from_contiguous: kv must be "
                f"[{c.num_layers}, 2, T, {c.num_kv_heads}, {c.head_dim}], "
                f"got {list(kv.shape)}"
            )
        n = kv.shape[2] if num_tokens is None else int(num_tokens)
        if not 0 <= n <= kv.shape[2]:
            raise InvalidArgumentError(f"num_tokens {n} outside 0..{kv.shape[2]}")
        self.check_blocks(block_ids, n)
        nb = self.blocks_for(n)
        if nb == 0:
            return
        full = nb * self.block_tokens
        src = kv[:, :, :n].to(device=self.device, dtype=self.dtype)
        if full != n:
            pad = torch.zeros(
                (c.num_layers, 2, full - n, c.num_kv_heads, c.head_dim), device=self.device, dtype=self.dtype
            )
            src = torch.cat([src, pad], dim=2)
        src = src.reshape(c.num_layers, 2, nb, self.block_tokens, c.num_kv_heads, c.head_dim)
        idx = torch.as_tensor([int(i) for i in block_ids[:nb]], device=self.device, dtype=torch.long)
        if full != n:
            # Leave the tail of the last block untouched (it may not be ours to clear).
            head, last = idx[:-1], idx[-1]
            if nb > 1:
                self.tensor[:, :, head] = src[:, :, :-1]
            r = n - (nb - 1) * self.block_tokens
            self.tensor[:, :, last, :r] = src[:, :, -1, :r]
        else:
            self.tensor[:, :, idx] = src

    def gather_contiguous(self, block_ids, num_tokens: int) -> torch.Tensor:
        """The inverse: ``[L, 2, num_tokens, H_kv, D]`` of a sequence's KV (a copy)."""
        self.check_blocks(block_ids, num_tokens)
        c = self.config
        nb = self.blocks_for(num_tokens)
        idx = torch.as_tensor([int(i) for i in block_ids[:nb]], device=self.device, dtype=torch.long)
        g = self.tensor[:, :, idx].reshape(
            c.num_layers, 2, nb * self.block_tokens, c.num_kv_heads, c.head_dim
        )
        return g[:, :, :num_tokens].clone()


def _view(buffer, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if isinstance(buffer, np.ndarray):
        buffer = torch.from_numpy(buffer)
    if not isinstance(buffer, torch.Tensor):
        raise InvalidArgumentError(f"buffer must be a tensor or numpy array, got {type(buffer).__name__}")
    if not buffer.is_contiguous():
        raise InvalidArgumentError("buffer must be contiguous")
    same_index = device.index is None or buffer.device.index == device.index
    if buffer.device.type != device.type or not same_index:
        raise InvalidArgumentError(f"buffer on {buffer.device}, pool on {device}")
    need = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    have = buffer.numel() * buffer.element_size()
    if have < need:
        raise InvalidArgumentError(f"buffer holds {have} bytes, the pool needs {need}")
    return buffer.reshape(-1).view(torch.uint8)[:need].view(dtype).view(shape)
