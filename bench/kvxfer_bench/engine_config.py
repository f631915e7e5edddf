"""The bench's ``--device`` as typed engine configuration: the RDMA device for ibverbs,
the listen address for tcp; other backends have no device."""

from __future__ import annotations

import socket


def engine_config(backend: str, device: str, local_host: str = ""):
    """``local_host``: this host's address on the path to the other side. Without
    ``--device``, tcp listens there (kvxfer's own default is 127.0.0.1, which a peer on
    another host or network namespace cannot reach)."""
    import kvxfer

    cfg = kvxfer.EngineConfig()
    if device:
        if backend == "ibverbs":
            cfg.backend.ibverbs.device = device
        elif backend == "tcp":
            cfg.backend.tcp.listen = device
    elif backend == "tcp" and local_host:
        cfg.backend.tcp.listen = (f"[{local_host}]" if ":" in local_host else local_host) + ":0"
    return cfg


def local_host_towards(host: str, port: int) -> str:
    """The local address the kernel would use to reach ``host`` (no packet is sent)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return s.getsockname()[0]
    except OSError:
        return ""


def local_host_of(sock: socket.socket) -> str:
    """The local address of a connected IP socket; "" for a Unix socket."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return ""
    return sock.getsockname()[0]
