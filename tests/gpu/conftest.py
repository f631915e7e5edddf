"""GPU test fixtures. Every test that needs a GPU skips with its printed reason where
there is none (CPU-only machines, CI)."""

from __future__ import annotations

import pytest

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


def pytest_report_header(config):
    return f"kvxfer GPU tests: {GPUS} GPU(s)" + (f" ({WHY})" if WHY else "")


@pytest.fixture
def one_gpu():
    if GPUS < 1:
        pytest.skip(f"needs a GPU: {WHY}")


@pytest.fixture
def two_gpus():
    if GPUS < 2:
        pytest.skip(f"needs two GPUs, this machine has {GPUS}" + (f": {WHY}" if WHY else ""))
