"""GPU detection shared by the GPU tests (not in conftest.py: a module named conftest
would be shadowed by tests/python's when both folders run in one pytest session)."""

from __future__ import annotations

import kvxfer
import kvxfer.gpu


def _gpu_count() -> tuple[int, str]:
    status = kvxfer.gpu.cuda_status()
    if status:
        return 0, status
    try:
        import torch
    except ImportError:
        return 0, "torch is not installed (the GPU tests allocate CUDA memory with torch)"
    if not torch.cuda.is_available():
        return 0, "torch sees no CUDA device"
    return torch.cuda.device_count(), ""


GPUS, WHY = _gpu_count()
