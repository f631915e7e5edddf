"""What every doctor check reads: the needs, the KV pool size, the parsed RDMA devices and
kvxfer's own backend list, gathered once per run."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidArgumentError
from . import sysfs

# What a check can be asked to treat as required (``--need``).
NEEDS = ("shm", "tcp", "rdma", "cuda")
# The Llama-3-8B-shaped pool of the README: 32 layers x K/V x 2048 blocks x 32 KiB.
DEFAULT_POOL_BYTES = 32 * 2 * 2048 * 32768

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mib": 1 << 20, "g": 1 << 30}
_UNITS |= {"gib": 1 << 30, "t": 1 << 40, "tib": 1 << 40, "kb": 1000, "mb": 10**6, "gb": 10**9, "tb": 10**12}


def parse_size(text: str) -> int:
    """'4GiB', '512M', '1073741824' -> bytes. Raises InvalidArgumentError naming the text."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = m.group(2).lower() if m else ""
    if not m or unit not in _UNITS:
        raise InvalidArgumentError(
            f"size {text!r} is not a number with an optional unit (KiB, MiB, GiB, TiB)"
        )
    value = int(float(m.group(1)) * _UNITS[unit])
    if value <= 0:
        raise InvalidArgumentError(f"size {text!r} must be positive")
    return value


def human_bytes(n: float | None) -> str:
    if n is None:
        return "unlimited"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" or n == int(n) else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} TiB"


# Variable names of kvxfer 0.1, before the configuration overlay (config field -> name).
LEGACY_ENV = {
    "backend.tcp.listen": "KVXFER_TCP_BIND",
    "backend.ibverbs.device": "KVXFER_IB_DEVICE",
    "backend.ibverbs.gid_index": "KVXFER_IB_GID",
    "backend.ibverbs.port_num": "KVXFER_IB_PORT_NUM",
    "backend.ibverbs.qps_per_peer": "KVXFER_IB_QPS",
    "backend.ibverbs.sq_depth": "KVXFER_IB_SQ_DEPTH",
    "backend.ibverbs.recv_buffers": "KVXFER_IB_RECV_BUFFERS",
    "backend.ibverbs.max_wr_bytes": "KVXFER_IB_MAX_WR_BYTES",
    "backend.ibverbs.ack_timeout": "KVXFER_IB_ACK_TIMEOUT",
    "backend.ibverbs.retry_cnt": "KVXFER_IB_RETRY_CNT",
    "backend.ibverbs.rnr_retry": "KVXFER_IB_RNR_RETRY",
    "backend.ibverbs.traffic_class": "KVXFER_IB_TC",
    "backend.ibverbs.service_level": "KVXFER_IB_SL",
    "backend.ibverbs.spin_us": "KVXFER_IB_SPIN_US",
}


def overlay_names() -> dict[str, str] | None:
    """{config field: environment variable} as this kvxfer build reads them, or None for a
    build without the configuration overlay (it reads the LEGACY_ENV names)."""
    import kvxfer

    listing = getattr(kvxfer, "environment_variables", None)
    if listing is None:
        return None
    return {field_: name for name, field_ in listing()}


@dataclass
class Context:
    need: set[str]
    pool_bytes: int
    ib_root: str = sysfs.IB_ROOT
    net_root: str = sysfs.NET_ROOT
    devices: list[sysfs.Device] = field(default_factory=list)
    backends: dict[str, Any] = field(default_factory=dict)  # name -> kvxfer.BackendInfo
    env: dict[str, str] = field(default_factory=lambda: dict(os.environ))
    overlay: dict[str, str] | None = None  # overlay_names(), None = legacy names

    def needed(self, what: str) -> bool:
        return what in self.need

    def env_name(self, config_field: str) -> str:
        """The environment variable that sets ``config_field`` in this build."""
        if self.overlay is not None and config_field in self.overlay:
            return self.overlay[config_field]
        return LEGACY_ENV.get(config_field, "")

    def env_value(self, config_field: str) -> tuple[str, str]:
        """(variable name, its value or "")."""
        name = self.env_name(config_field)
        return name, self.env.get(name, "") if name else ""


def resolve_need(asked: list[str] | None, backends: dict[str, Any]) -> set[str]:
    """The asked needs plus the defaults: shm always (same-host serving), rdma when the
    ibverbs backend is available (a default Engine then starts it and pins memory with it)."""
    need = {"shm"}
    ib = backends.get("ibverbs")
    if ib is not None and ib.available:
        need.add("rdma")
    for item in asked or []:
        for word in filter(None, (w.strip().lower() for w in item.split(","))):
            if word not in NEEDS:
                raise InvalidArgumentError(f"unknown need {word!r}: choose from {', '.join(NEEDS)}")
            need.add(word)
    return need
