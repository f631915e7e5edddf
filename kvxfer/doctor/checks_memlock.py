"""Memlock: RLIMIT_MEMLOCK and CAP_IPC_LOCK against what registering a KV pool with the
ibverbs backend pins (the pool plus the backend's own registered buffers)."""

from __future__ import annotations

import resource

from .context import Context, human_bytes
from .report import Check

CAP_IPC_LOCK = 14


def _effective_caps() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return 0


def ibverbs_pinned_overhead(ctx: Context) -> int:
    """Bytes one ibverbs backend registers for itself (native ibverbs_backend.cc): the
    shared receive buffers (recv_buffers, default 64), the first slab of 32 buffers for
    notifications too large to go inline (64 KiB + 8 each, 64-byte aligned; more slabs of 32
    are registered on demand, at most 16, while stopped peers hold buffers) and the
    connection manager's UD buffers (96 x (40 + 1024))."""
    try:
        recv = min(4096, max(4, int(ctx.env_value("backend.ibverbs.recv_buffers")[1] or "64", 0)))
    except ValueError:
        recv = 64
    slot = (8 + 64 * 1024 + 63) & ~63
    ud = (40 + 1024 + 63) & ~63
    return (recv + 32) * slot + (64 + 32) * ud


def check_memlock(ctx: Context) -> Check:
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    inf = resource.RLIM_INFINITY
    cap = bool(_effective_caps() & (1 << CAP_IPC_LOCK))
    required = ctx.pool_bytes + ibverbs_pinned_overhead(ctx)
    data = {
        "soft_bytes": None if soft == inf else soft,
        "hard_bytes": None if hard == inf else hard,
        "cap_ipc_lock": cap,
        "required_bytes": required,
        "pool_bytes": ctx.pool_bytes,
    }
    limit = f"RLIMIT_MEMLOCK soft {human_bytes(data['soft_bytes'])}, hard {human_bytes(data['hard_bytes'])}"
    what = (
        f"registering a {human_bytes(ctx.pool_bytes)} KV pool with ibverbs pins "
        f"{human_bytes(required)} (pool + the backend's own buffers)"
    )
    if soft == inf:
        return Check("memlock", "ok", f"{limit}: {what}, no limit", data=data)
    if cap:
        return Check(
            "memlock", "ok", f"{limit}, but CAP_IPC_LOCK is held, so the kernel does not apply it", data=data
        )
    if soft >= required:
        return Check("memlock", "ok", f"{limit} >= {human_bytes(required)}: {what}", data=data)
    if hard == inf or hard >= required:
        to = "unlimited" if hard == inf else str(hard // 1024)
        fix = (
            f"raise the soft limit before starting kvxfer: `ulimit -l {to}` (the hard limit allows it), "
            "or LimitMEMLOCK=infinity in the systemd unit"
        )
    else:
        fix = (
            "raise the hard limit: `* - memlock unlimited` in /etc/security/limits.conf (new login), "
            "LimitMEMLOCK=infinity (systemd), `docker run --ulimit memlock=-1:-1`, or grant CAP_IPC_LOCK "
            "(docker: --cap-add IPC_LOCK)"
        )
    if ctx.needed("rdma"):
        status, tail = "fail", "ibv_reg_mr of the pool would fail with ENOMEM"
    else:
        status, tail = "warn", "it matters only for RDMA, which is not in use here"
    return Check("memlock", status, f"{limit} < {human_bytes(required)}: {what}; {tail}", fix, data)
