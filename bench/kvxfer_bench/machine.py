"""What machine a figure was measured on."""

from __future__ import annotations

import os
import platform
import socket


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_bytes(key: str) -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    return _mem_bytes("MemAvailable")


def info() -> dict:
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = -1.0
    import numpy

    try:
        import kvxfer

        kv_version = kvxfer.__version__
    except Exception:  # noqa: BLE001 - informational only
        kv_version = "?"
    return {
        "hostname": socket.gethostname(),
        "cpu": _cpu_model(),
        "cores": os.cpu_count() or 1,
        "usable_cores": usable,
        "kernel": platform.release(),
        "mem_bytes": _mem_bytes("MemTotal"),
        "loadavg_1m": round(load, 2),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "kvxfer": kv_version,
    }


def one_line(m: dict) -> str:
    gib = m.get("mem_bytes", 0) / (1 << 30)
    return (
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores ({m.get('usable_cores', '?')} usable), "
        f"{gib:.0f} GiB, kernel {m.get('kernel', '?')}, host {m.get('hostname', '?')}, "
        f"load {m.get('loadavg_1m', '?')}"
    )
