"""GPUDirect RDMA through the ibverbs backend: GPU memory registered with the NIC (dma-buf,
else peer memory), WRITE and READ byte for byte between two engines in one process.

Needs an RDMA NIC and a GPU the NIC can reach (docs/gpu.md, "GPUDirect RDMA"). No machine
of this project has both (soft-RoCE runs in a VM without a GPU; the GPU machine has no RDMA
NIC), so this test has never run: it skips with its reason everywhere here. The
registration's decision logic is unit-tested in tests/cpp/unit/ibverbs_gpu_memory_test.cc."""

from __future__ import annotations

import os
import sys

import pytest

import kvxfer

sys.path.insert(0, os.path.dirname(__file__))
from gpu_env import GPUS, WHY, check_paged_write_read  # noqa: E402


def _why_not() -> str | None:
    if GPUS < 1:
        return f"needs a GPU: {WHY}"
    ib = next((b for b in kvxfer.list_backends() if b.name == "ibverbs"), None)
    if ib is None or not ib.available:
        return "needs the ibverbs backend: " + (ib.reason if ib else "not built")
    e = kvxfer.Engine("gpudirect-probe", backends=["ibverbs"])
    try:
        d = e.describe_backends()
    finally:
        e.close()
    if "GPU memory: GPUDirect" not in d:
        return f"ibverbs offers no GPU memory here: {d}"
    return None


def test_ibverbs_gpu_to_gpu_write_read_byte_exact():
    why = _why_not()
    if why:
        pytest.skip(why)
    import torch

    lay = kvxfer.KvLayout(num_layers=4, num_kv=2, num_blocks=256, block_bytes=16384)
    n = lay.num_layers * lay.num_kv * lay.num_blocks * lay.block_bytes
    g = torch.Generator(device="cpu").manual_seed(7)
    src = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).to("cuda:0")
    dst = torch.zeros(n, dtype=torch.uint8, device=f"cuda:{min(1, GPUS - 1)}")
    a = kvxfer.Engine("gd-a", backends=["ibverbs"], timeout=30.0)
    b = kvxfer.Engine("gd-b", backends=["ibverbs"], timeout=30.0)
    try:
        check_paged_write_read(a, b, src, dst, lay, b"gd")
    finally:
        a.close()
        b.close()
