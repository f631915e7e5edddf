"""A short name for the machine a figure was measured on, recorded with every result."""

from __future__ import annotations

import os
import platform
from functools import lru_cache


@lru_cache(maxsize=1)
def machine() -> str:
    """``"<cpu model>, <n> cores[, <gpu>]"``, e.g. ``"AMD EPYC 7B13, 2 cores"``."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    parts = [cpu, f"{len(os.sched_getaffinity(0))} cores"]
    try:
        import torch

        if torch.cuda.is_available():
            parts.append(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    except ImportError:
        pass
    return ", ".join(parts)
