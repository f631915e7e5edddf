"""GPU test fixtures. Every test that needs a GPU skips with its printed reason where
there is none (CPU-only machines, CI)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
from gpu_env import GPUS, WHY  # noqa: E402


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
