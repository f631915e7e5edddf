"""kvxfer: KV-cache block transfer between processes, GPUs and hosts.

Quick tour::

    import numpy as np, kvxfer
    eng = kvxfer.Engine("prefill-0", backends=["shm"])
    pool = kvxfer.empty(2048 * 32768)
    region = eng.register(pool, kvxfer.KvLayout(num_blocks=2048, block_bytes=32768))
    blob = eng.descriptor()               # send to the peer, any way you like
    peer = eng.add_peer(peer_blob)        # the peer's descriptor
    t = eng.write(peer, region, 0, blocks=np.array([3, 4, 5]), notify=b"req-17")
    t.wait()                              # or: await t

See docs/api.md for the whole surface and its thread and lifetime contracts.
"""

from __future__ import annotations

from . import errors
from ._native import KvLayout, MemoryKind, Peer, Region, RemoteRegion, TransferState
from .config import (
    BackendConfigs,
    EngineConfig,
    FaultConfig,
    IbverbsConfig,
    LoopbackConfig,
    ShmConfig,
    TcpConfig,
    environment_variables,
)
from .engine import BackendInfo, Engine, Part, RegionGroup, empty, list_backends
from .errors import KvxferError
from .notify import Notification
from .transfer import Op, Transfer

__version__ = "0.2.0"

__all__ = [
    "BackendConfigs",
    "BackendInfo",
    "Engine",
    "EngineConfig",
    "FaultConfig",
    "IbverbsConfig",
    "KvLayout",
    "KvxferError",
    "LoopbackConfig",
    "MemoryKind",
    "Notification",
    "Op",
    "Part",
    "Peer",
    "Region",
    "RegionGroup",
    "RemoteRegion",
    "ShmConfig",
    "TcpConfig",
    "Transfer",
    "TransferState",
    "empty",
    "environment_variables",
    "errors",
    "gpu",
    "list_backends",
    "__version__",
]

# After the compiled core, so a missing build reports the missing module.
from . import gpu  # noqa: E402
