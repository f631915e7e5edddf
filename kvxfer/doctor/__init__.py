"""``kvxfer doctor [--json] [--need shm,tcp,rdma,cuda] [--pool-bytes SIZE]``: checks this host
for what kvxfer's backends need (memlock, RDMA devices, GIDs, port state and MTU, rdma_rxe,
CUDA and GPU memory registration, shared-memory and ptrace rules, listen addresses).

Contract: ``main(argv) -> int`` prints a table (or, with ``--json``, one JSON object, see
``kvxfer.doctor.report``) and returns 1 when a check failed, 0 otherwise, 2 on a usage
error. A check fails only for something that is needed: shm always, rdma when the ibverbs
backend is available here (a default Engine starts it), and whatever ``--need`` adds;
everything else that is missing is ``skip`` (with the reason) or ``warn``.
``run_checks(...) -> (checks, header)`` is the same without printing. Needs neither torch
nor aiohttp. See docs/doctor.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import sys

from ..errors import KvxferError
from . import (
    checks_config,
    checks_cuda,
    checks_memlock,
    checks_net,
    checks_rdma,
    checks_rxe,
    checks_shm,
    sysfs,
)
from .context import DEFAULT_POOL_BYTES, NEEDS, Context, human_bytes, overlay_names, parse_size, resolve_need
from .report import Check, exit_code, to_json, to_table

__all__ = ["Check", "main", "run_checks"]


def check_backends(ctx: Context) -> Check:
    rows, missing = [], []
    for name, b in ctx.backends.items():
        default = "" if b.on_by_default else ", off by default"
        rows.append(f"{name} available{default}" if b.available else f"{name} unavailable ({b.reason})")
        wanted = {"shm": "shm", "tcp": "tcp", "ibverbs": "rdma"}.get(name)
        if not b.available and wanted and ctx.needed(wanted):
            missing.append(name)
    data = {
        n: {"available": b.available, "reason": b.reason, "on_by_default": b.on_by_default}
        for n, b in ctx.backends.items()
    }
    if missing:
        return Check(
            "backends",
            "fail",
            "; ".join(rows),
            f"needed but unavailable: {', '.join(missing)} (the rows below say why)",
            data,
        )
    return Check("backends", "ok", "; ".join(rows), data=data)


def run_checks(
    need: list[str] | None = None,
    pool_bytes: int = DEFAULT_POOL_BYTES,
    ib_root: str = sysfs.IB_ROOT,
    net_root: str = sysfs.NET_ROOT,
) -> tuple[list[Check], dict[str, object]]:
    """Runs every check. ``need``: extra needs from ``NEEDS`` (unknown ones raise
    kvxfer.errors.InvalidArgumentError). A check that crashes becomes a ``fail`` row."""
    import kvxfer

    backends = {b.name: b for b in kvxfer.list_backends()}
    ctx = Context(
        resolve_need(need, backends),
        pool_bytes,
        ib_root,
        net_root,
        sysfs.read_devices(ib_root, net_root),
        backends,
        overlay=overlay_names(),
    )
    cuda = checks_cuda.probe_cuda()
    steps = [
        ("backends", lambda: check_backends(ctx)),
        ("config.env", lambda: checks_config.check_env(ctx)),
        ("memlock", lambda: checks_memlock.check_memlock(ctx)),
        ("rdma.devices", lambda: checks_rdma.check_devices(ctx)),
        ("rdma.ports", lambda: checks_rdma.check_ports(ctx)),
        ("rdma.gids", lambda: checks_rdma.check_gids(ctx)),
        ("rdma.ibverbs", lambda: checks_rdma.check_ibverbs(ctx)),
        ("rdma.rxe", lambda: checks_rxe.check_rxe(ctx)),
        ("cuda.driver", lambda: checks_cuda.check_driver(ctx, cuda)),
        ("cuda.gpu_registration", lambda: checks_cuda.check_gpu_registration(ctx, cuda)),
        ("shm.cross_process", lambda: checks_shm.check_cross_process(ctx)),
        ("shm.memfd", lambda: checks_shm.check_memfd(ctx)),
        ("shm.socket", lambda: checks_shm.check_socket(ctx)),
        ("shm.dev_shm", lambda: checks_shm.check_dev_shm(ctx)),
        ("net.listen", lambda: checks_net.check_listen(ctx)),
    ]
    checks = []
    for name, step in steps:
        try:
            checks.append(step())
        except Exception as e:  # a broken probe is a finding, not a crash of the whole report
            checks.append(
                Check(
                    name,
                    "fail",
                    f"the check itself failed: {type(e).__name__}: {e}",
                    "report this as a kvxfer bug, with `kvxfer doctor --json`",
                )
            )
    header = {
        "kvxfer": kvxfer.__version__,
        "native": getattr(kvxfer._native, "__file__", "?"),
        "host": socket.gethostname(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "need": sorted(ctx.need),
        "pool_bytes": pool_bytes,
    }
    return checks, header


def _size(text: str) -> int:
    try:
        return parse_size(text)
    except KvxferError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="kvxfer doctor",
        description="Check this host for kvxfer: memlock, RDMA devices/GIDs/MTU, rdma_rxe, CUDA, "
        "shared memory and ptrace rules, listen addresses. Exit 1 when something needed is wrong.",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--need",
        action="append",
        default=[],
        metavar="LIST",
        help=f"also require these ({', '.join(NEEDS)}; comma-separated, repeatable); "
        "default: shm, plus rdma when the ibverbs backend is available",
    )
    parser.add_argument(
        "--pool-bytes",
        type=_size,
        default=DEFAULT_POOL_BYTES,
        metavar="SIZE",
        help=f"KV pool one process registers, for the memlock check (default "
        f"{human_bytes(DEFAULT_POOL_BYTES)}; e.g. 512MiB, 80GiB)",
    )
    args = parser.parse_args(argv)
    try:
        checks, header = run_checks(args.need, args.pool_bytes)
    except KvxferError as e:
        print(f"kvxfer doctor: {e}", file=sys.stderr)
        return 2
    print(to_json(checks, header) if args.json else to_table(checks, header, _width()))
    return exit_code(checks)


def _width() -> int:
    try:
        return max(80, min(160, os.get_terminal_size().columns))
    except OSError:
        return 110


if __name__ == "__main__":
    sys.exit(main())
