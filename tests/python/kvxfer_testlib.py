"""Helpers shared by the engine tests (imported by name: a module called ``conftest``
would be shadowed by the serve tests' own conftest.py)."""

from __future__ import annotations

import numpy as np

import kvxfer

# Backends that connect two engines of one process (ibverbs runs in tests/rdma, in the VM).
# cuda_ipc moves GPU memory only: tests/gpu covers it.
IN_PROCESS = [b.name for b in kvxfer.list_backends() if b.available and b.name not in ("ibverbs", "cuda_ipc")]


def dense_layout(layers=4, kv=2, blocks=64, block_bytes=256) -> kvxfer.KvLayout:
    return kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=blocks, block_bytes=block_bytes)


def pool_bytes(layout: kvxfer.KvLayout) -> int:
    last = layout.piece_offset(layout.num_layers - 1, layout.num_kv - 1, layout.num_blocks - 1)
    return last + layout.block_bytes


def stream(pool: np.ndarray, layout: kvxfer.KvLayout, ids, layers=None) -> bytes:
    """The bytes of `ids` in stream order (layer, K/V, list position): the reference."""
    lo, hi = layers or (0, layout.num_layers)
    bb = layout.block_bytes
    parts = [
        pool[layout.piece_offset(layer, kv, int(i)) : layout.piece_offset(layer, kv, int(i)) + bb]
        for layer in range(lo, hi)
        for kv in range(layout.num_kv)
        for i in ids
    ]
    return b"".join(p.tobytes() for p in parts)


class Pair:
    """Engines `a` (initiator) and `b` (target), each with one registered KV pool."""

    def __init__(self, backend: str, layout: kvxfer.KvLayout, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.layout = layout
        self.a = kvxfer.Engine("a", backends=[backend], timeout=60.0)
        self.b = kvxfer.Engine("b", backends=[backend], timeout=60.0)
        self.src = rng.integers(0, 256, pool_bytes(layout), dtype=np.uint8)
        self.dst = rng.integers(0, 256, pool_bytes(layout), dtype=np.uint8)
        self.ra = self.a.register(self.src, layout)
        self.rb = self.b.register(self.dst, layout)
        self.peer = self.a.add_peer(self.b.descriptor())
        self.back = self.b.add_peer(self.a.descriptor())

    def close(self):
        self.a.close()
        self.b.close()
