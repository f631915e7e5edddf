"""GPU helpers: is CUDA usable here, and pack/unpack of paged KV blocks by one kernel launch.

``PackPlan`` gathers a request's blocks out of a paged KV pool into one contiguous buffer
(``pack``), or scatters a contiguous buffer into the pool's blocks (``unpack``: P/D-Serve's
RecvScatter as a kernel). The run table (pool offset, packed offset, length; consecutive
blocks merged) is computed and uploaded to the GPU once per plan; each call is then one
kernel launch on a CUDA stream, optionally after a CUDA event, so a model can pack each
layer's KV on a side stream as soon as that layer is computed:

    plan = kvxfer.gpu.PackPlan(layout, block_ids, device=0, layers=(layer, layer + 1))
    done = torch.cuda.Event()
    plan.pack(kv_pool, staging, stream=side_stream, after=layer_done_event)

Pools and buffers are anything :func:`kvxfer.memory.as_span` reads as CUDA memory (torch
tensors, ``__cuda_array_interface__``, DLPack). The CUDA driver is loaded at run time;
without it every call raises ``UnsupportedError`` naming why. docs/gpu.md has the design.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from . import _native
from .errors import InvalidArgumentError
from .memory import MemoryKind, as_span

__all__ = ["PackPlan", "available", "block_runs", "cuda_status"]


def cuda_status() -> str:
    """'' when the CUDA driver loads and sees a GPU, else the reason it cannot be used."""
    return _native.cuda_status()


def available() -> bool:
    return cuda_status() == ""


def block_runs(layout: Any, block_ids: Any, layers: tuple[int, int] | None = None) -> np.ndarray:
    """(N, 3) uint64 [pool offset, packed offset, length]: the pieces of ``block_ids`` in
    stream order (layer, K/V, list position), packed back to back, with pieces that
    continue each other on both sides merged."""
    ids = np.asarray(block_ids, dtype=np.int64).ravel()
    if ids.size and (ids.min() < 0 or ids.max() >= layout.num_blocks):
        raise InvalidArgumentError(f"block ids must be in [0, {layout.num_blocks})")
    lb, le = layers if layers is not None else (0, layout.num_layers)
    if not 0 <= lb < le <= layout.num_layers:
        raise InvalidArgumentError(f"layers {layers} outside [0, {layout.num_layers})")
    bb = int(layout.block_bytes)
    ls = np.arange(lb, le, dtype=np.uint64)[:, None, None] * np.uint64(layout.layer_stride)
    ks = np.arange(layout.num_kv, dtype=np.uint64)[None, :, None] * np.uint64(layout.kv_stride)
    bs = ids.astype(np.uint64)[None, None, :] * np.uint64(layout.block_stride)
    pool = (ls + ks + bs + np.uint64(layout.offset)).ravel()
    if pool.size == 0:
        return np.zeros((0, 3), np.uint64)
    packed = np.arange(pool.size, dtype=np.uint64) * np.uint64(bb)
    cont = pool[1:] == pool[:-1] + np.uint64(bb)  # packed side always continues
    starts = np.concatenate(([0], np.flatnonzero(~cont) + 1))
    lengths = np.diff(np.concatenate((starts, [pool.size]))).astype(np.uint64) * np.uint64(bb)
    return np.stack([pool[starts], packed[starts], lengths], axis=1)


def _stream_handle(stream: Any, after: Any, device: int) -> int:
    """A CUstream handle for ``stream`` (a torch.cuda.Stream, an int handle, or None =
    torch's current stream on ``device`` when torch is loaded, else the default stream);
    makes it wait for ``after`` (a torch.cuda.Event) first."""
    import sys

    torch = sys.modules.get("torch")
    if stream is None and torch is not None and torch.cuda.is_available():
        stream = torch.cuda.current_stream(device)
    if after is not None:
        if not hasattr(stream, "wait_event"):
            raise InvalidArgumentError(
                "after= needs a torch.cuda.Stream as stream (an int handle cannot wait)"
            )
        stream.wait_event(after)
    if stream is None:
        return 0
    if isinstance(stream, int):
        return stream
    return int(stream.cuda_stream)


def _cuda_span(obj: Any, what: str):
    span = as_span(obj)
    if span.kind != MemoryKind.CUDA:
        raise InvalidArgumentError(f"{what} is not CUDA memory")
    return span


class PackPlan:
    """Blocks of a paged KV layout <-> one contiguous buffer, by one kernel launch."""

    def __init__(self, layout: Any, block_ids: Any, device: int, layers: tuple[int, int] | None = None):
        runs = block_runs(layout, block_ids, layers)
        self.layout = layout
        self.device = int(device)
        self.runs = runs
        self._plan = _native.GpuCopyPlan(self.device, runs)

    @property
    def nbytes(self) -> int:
        """Bytes of the packed buffer."""
        return int(self._plan.bytes)

    @property
    def num_runs(self) -> int:
        return int(self._plan.runs)

    def _launch(self, src: Any, dst: Any, swap: bool, stream: Any, after: Any) -> None:
        s = _cuda_span(src, "the source")
        d = _cuda_span(dst, "the destination")
        if s.device != self.device or d.device != self.device:
            raise InvalidArgumentError(
                f"plan is for cuda:{self.device}; source is on cuda:{s.device}, "
                f"destination on cuda:{d.device}"
            )
        handle = _stream_handle(stream, after, self.device)
        self._plan.launch(s.ptr, s.nbytes, d.ptr, d.nbytes, swap, handle)

    def pack(self, pool: Any, out: Any, stream: Any = None, after: Any = None) -> None:
        """Copies the plan's blocks of ``pool`` into ``out`` (>= nbytes), asynchronously on ``stream``."""
        self._launch(pool, out, False, stream, after)

    def unpack(self, packed: Any, pool: Any, stream: Any = None, after: Any = None) -> None:
        """Copies ``packed`` into the plan's blocks of ``pool``, asynchronously on ``stream``."""
        self._launch(packed, pool, True, stream, after)
