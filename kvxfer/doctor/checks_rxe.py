"""Soft-RoCE: an rxe device, or whether the rdma_rxe module is loaded, loadable (module
file or built in), or not in this kernel at all."""

from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess

from .context import Context
from .report import Check


def _rxe_info(ctx: Context) -> dict[str, object]:
    """Where rdma_rxe stands: loaded, loadable (module file or built in), or absent."""
    release = platform.release()
    moddir = f"/lib/modules/{release}"
    info: dict[str, object] = {"kernel": release, "loaded": os.path.isdir("/sys/module/rdma_rxe")}
    path = ""
    modinfo = shutil.which("modinfo") or next(
        (p for p in ("/sbin/modinfo", "/usr/sbin/modinfo") if os.access(p, os.X_OK)), None
    )
    if modinfo:
        try:
            r = subprocess.run([modinfo, "-n", "rdma_rxe"], capture_output=True, text=True, timeout=10)
            if r.returncode == 0:
                path = r.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    if not path and os.path.isdir(moddir):
        hits = glob.glob(f"{moddir}/**/rdma_rxe.ko*", recursive=True)
        path = hits[0] if hits else ""
    builtin = False
    try:
        with open(f"{moddir}/modules.builtin", encoding="ascii") as f:
            builtin = any(line.strip().endswith("/rdma_rxe.ko") for line in f)
    except OSError:
        pass
    info["module"] = path or ("(built in)" if builtin else None)
    info["moddir_exists"] = os.path.isdir(moddir)
    try:
        with open("/proc/sys/kernel/modules_disabled", encoding="ascii") as f:
            info["modules_disabled"] = f.read().strip() == "1"
    except OSError:
        info["modules_disabled"] = not os.path.exists("/proc/modules")
    return info


def check_rxe(ctx: Context) -> Check:
    info = _rxe_info(ctx)
    soft = [d for d in ctx.devices if d.soft]
    hard = [d for d in ctx.devices if not d.soft]
    if soft:
        on = ", ".join(f"{d.name} on {d.parent or d.ports[0].netdev if d.ports else '?'}" for d in soft)
        return Check("rdma.rxe", "ok", f"soft-RoCE device present: {on}", data=info)
    if hard:
        return Check("rdma.rxe", "skip", "not needed: hardware RDMA devices are present", data=info)
    vm_fix = (
        "run the RDMA path in tools/softroce/softroce-vm (a QEMU guest with rdma_rxe, docs/soft-roce.md), "
        "or on a kernel built with CONFIG_RDMA_RXE"
    )
    if info["loaded"]:
        return Check(
            "rdma.rxe",
            "ok",
            "rdma_rxe is loaded but no rxe device exists",
            "`rdma link add rxe0 type rxe netdev <interface>`",
            info,
        )
    if info["module"] and not info["modules_disabled"]:
        return Check(
            "rdma.rxe",
            "ok",
            f"rdma_rxe can be loaded ({info['module']})",
            "`modprobe rdma_rxe && rdma link add rxe0 type rxe netdev <interface>`",
            info,
        )
    if info["module"]:
        why = f"rdma_rxe exists ({info['module']}) but module loading is disabled in this kernel"
    elif not info["moddir_exists"]:
        k = info["kernel"]
        why = f"rdma_rxe is not in this kernel ({k}: no /lib/modules/{k}, not built in)"
    else:
        why = f"rdma_rxe is not in this kernel ({info['kernel']}: no rdma_rxe module, not built in)"
    return Check("rdma.rxe", "skip", why, vm_fix, info)
