"""kvxfer: KV-cache block transfer between processes and hosts.

Quick tour::

    import numpy as np, kvxfer
    eng = kvxfer.Engine("prefill-0", backends=["shm"])
    pool = np.zeros(2048 * 32768, np.uint8)
    region = eng.register(pool, layout=kvxfer.KvLayout(num_blocks=2048, block_bytes=32768))
    blob = eng.descriptor()               # send to the peer, any way you like
    peer = eng.add_peer(peer_blob)        # the peer's descriptor
    t = eng.write(peer, region, remote_region=0, blocks=np.array([3, 4, 5]), notify=b"req-17")
    t.wait()

See docs/api.md for the whole surface and its thread and lifetime contracts.
"""

from __future__ import annotations

from . import errors
from ._native import KvLayout, Op, Peer, Region, RemoteRegion, Transfer, TransferState
from .engine import BackendInfo, Engine, Notification, empty, list_backends
from .errors import KvxferError

__version__ = "0.1.0"

__all__ = [
    "BackendInfo",
    "Engine",
    "KvLayout",
    "KvxferError",
    "Notification",
    "Op",
    "Peer",
    "Region",
    "RemoteRegion",
    "Transfer",
    "TransferState",
    "empty",
    "errors",
    "list_backends",
    "__version__",
]
