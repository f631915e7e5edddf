"""CUDA checks through the driver API (ctypes on libcuda.so.1, no toolkit, no torch):
driver version, devices, and what registering GPU memory with an RDMA NIC would use
(GPUDirect RDMA through nvidia-peermem, or dma-buf)."""

from __future__ import annotations

import ctypes
import os
import platform
import re

from .context import Context, human_bytes
from .report import Check

CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED = 116  # cuda.h
CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED = 124  # cuda.h


def probe_cuda() -> dict[str, object]:
    """{"loaded", "error", "driver_version", "devices": [{"index", "name", "memory_bytes",
    "gpudirect_rdma", "dma_buf"}]}; never raises."""
    out: dict[str, object] = {"loaded": False, "error": "", "driver_version": None, "devices": []}
    try:
        cu = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        out["error"] = f"libcuda.so.1 cannot be loaded ({e})"
        return out
    out["loaded"] = True

    def err(code: int) -> str:
        name = ctypes.c_char_p()
        cu.cuGetErrorName(code, ctypes.byref(name))
        return f"{(name.value or b'CUDA error').decode()} ({code})"

    version = ctypes.c_int(0)
    if cu.cuDriverGetVersion(ctypes.byref(version)) == 0:
        out["driver_version"] = f"{version.value // 1000}.{version.value % 1000 // 10}"
    rc = cu.cuInit(0)
    if rc != 0:
        out["error"] = f"cuInit failed: {err(rc)}"
        return out
    count = ctypes.c_int(0)
    rc = cu.cuDeviceGetCount(ctypes.byref(count))
    if rc != 0:
        out["error"] = f"cuDeviceGetCount failed: {err(rc)}"
        return out
    devices = []
    for i in range(count.value):
        dev = ctypes.c_int(0)
        if cu.cuDeviceGet(ctypes.byref(dev), i) != 0:
            continue
        name = ctypes.create_string_buffer(256)
        cu.cuDeviceGetName(name, 256, dev)
        mem = ctypes.c_size_t(0)
        cu.cuDeviceTotalMem_v2(ctypes.byref(mem), dev)
        attrs = {}
        for key, attr in (
            ("gpudirect_rdma", CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED),
            ("dma_buf", CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED),
        ):
            v = ctypes.c_int(0)
            attrs[key] = bool(v.value) if cu.cuDeviceGetAttribute(ctypes.byref(v), attr, dev) == 0 else None
        devices.append(
            {"index": i, "name": name.value.decode(errors="replace"), "memory_bytes": mem.value, **attrs}
        )
    out["devices"] = devices
    return out


def _kernel_version() -> tuple[int, int]:
    try:
        major, minor = platform.release().split(".")[:2]
        return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)
    except ValueError:
        return (0, 0)


def _proc_driver() -> str | None:
    """The kernel module's version line, e.g. 'NVRM version: NVIDIA UNIX Open Kernel Module
    for x86_64  580.159.04  Release Build ...'."""
    try:
        with open("/proc/driver/nvidia/version", encoding="ascii", errors="replace") as f:
            return f.readline().strip()
    except OSError:
        return None


def _module_version(line: str | None) -> str:
    m = re.search(r"Kernel Module\s+(?:for \S+\s+)?(\d+(?:\.\d+)+)", line or "")
    if not m:
        return ""
    kind = "open kernel module" if "Open Kernel Module" in (line or "") else "proprietary kernel module"
    return f" (NVIDIA driver {m.group(1)}, {kind})"


def check_driver(ctx: Context, probe: dict[str, object]) -> Check:
    data = dict(probe)
    data["proc_driver"] = _proc_driver()
    fail = "fail" if ctx.needed("cuda") else "skip"
    if not probe["loaded"]:
        return Check(
            "cuda.driver",
            fail,
            f"{probe['error']}: no NVIDIA driver here; kvxfer moves host memory without it",
            "install the NVIDIA driver (it ships libcuda.so.1); in a container: the NVIDIA "
            "container toolkit and --gpus all",
            data,
        )
    if probe["error"]:
        return Check(
            "cuda.driver",
            "fail" if ctx.needed("cuda") else "warn",
            f"libcuda.so.1 loads (driver {probe['driver_version']}) but {probe['error']}",
            "check `nvidia-smi`; CUDA_ERROR_NO_DEVICE: no GPU visible (CUDA_VISIBLE_DEVICES, --gpus); "
            "CUDA_ERROR_SYSTEM_DRIVER_MISMATCH: reboot or reload the kernel module",
            data,
        )
    devs = probe["devices"]
    if not devs:
        return Check(
            "cuda.driver",
            fail,
            f"driver {probe['driver_version']}, no CUDA device",
            "make a GPU visible (CUDA_VISIBLE_DEVICES, docker --gpus all)",
            data,
        )
    names = ", ".join(f"{d['index']}: {d['name']} {human_bytes(d['memory_bytes'])}" for d in devs)
    return Check(
        "cuda.driver",
        "ok",
        f"CUDA driver API {probe['driver_version']}{_module_version(data['proc_driver'])}, "
        f"{len(devs)} device(s): {names}",
        data=data,
    )


def check_gpu_registration(ctx: Context, probe: dict[str, object]) -> Check:
    """GPU memory registration with the NIC: nvidia-peermem (GPUDirect RDMA through
    ib_core's peer-memory API) or dma-buf (kernel >= 5.12 and a driver that exports it)."""
    devs = probe.get("devices") or []
    if not devs:
        return Check("cuda.gpu_registration", "skip", "no CUDA device (see cuda.driver)")
    peermem = any(os.path.isdir(f"/sys/module/{m}") for m in ("nvidia_peermem", "nv_peer_mem"))
    kernel = _kernel_version()
    dmabuf = all(d.get("dma_buf") for d in devs) and kernel >= (5, 12)
    gdr = all(d.get("gpudirect_rdma") for d in devs)
    data = {
        "nvidia_peermem_loaded": peermem,
        "dma_buf": dmabuf,
        "gpudirect_rdma_attr": gdr,
        "kernel": platform.release(),
    }
    facts = (
        f"GPUDirect RDMA attribute {'yes' if gdr else 'no'}, dma-buf {'yes' if dmabuf else 'no'} "
        f"(kernel {platform.release()}), nvidia-peermem {'loaded' if peermem else 'not loaded'}"
    )
    if not ctx.devices:
        return Check(
            "cuda.gpu_registration",
            "fail" if ctx.needed("rdma") else "skip",
            f"no RDMA NIC, so GPU memory cannot be registered with one ({facts})",
            "see rdma.devices: GPU memory registration needs an RDMA NIC first",
            data,
        )
    if peermem or dmabuf:
        how = "dma-buf" if dmabuf else "nvidia-peermem"
        return Check(
            "cuda.gpu_registration",
            "ok",
            f"GPU memory can be registered with the NIC via {how}: {facts}",
            data=data,
        )
    return Check(
        "cuda.gpu_registration",
        "fail" if ctx.needed("cuda") and ctx.needed("rdma") else "warn",
        f"GPU memory cannot be registered with the NIC: {facts}",
        "`modprobe nvidia-peermem` (ships with NVIDIA drivers >= 470), or dma-buf: the open GPU kernel "
        "modules (driver >= 515) on Linux >= 5.12",
        data,
    )
