"""The bench's ``--device`` as typed engine configuration: the RDMA device for ibverbs,
the listen address for tcp; other backends have no device."""

from __future__ import annotations


def engine_config(backend: str, device: str):
    import kvxfer

    cfg = kvxfer.EngineConfig()
    if device:
        if backend == "ibverbs":
            cfg.backend.ibverbs.device = device
        elif backend == "tcp":
            cfg.backend.tcp.listen = device
    return cfg
