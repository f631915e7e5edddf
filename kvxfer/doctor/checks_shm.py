"""Shared-memory checks: what the shm backend needs to move bytes between two processes
of this host (native/src/backends/shm/shm_backend.cc): cross-memory attach
(process_vm_readv/writev) and pidfd_getfd into the peer, both under the ptrace access
rules (same user, Yama, seccomp); memfd for kvxfer.empty(); an abstract-namespace
SOCK_SEQPACKET socket for notifications; and /dev/shm for the frameworks around it."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import shutil
import socket
import subprocess
import sys
import time

from .context import Context, human_bytes
from .report import Check

SYS_PIDFD_GETFD = 438  # same number on x86_64 and aarch64 (and every arch since 5.6)
CAP_SYS_PTRACE = 19


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _yama() -> int | None:
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def _elf_base(pid: int) -> int | None:
    """Start of the first mapping of the process's executable (begins with b'\\x7fELF')."""
    exe = os.readlink(f"/proc/{pid}/exe")
    with open(f"/proc/{pid}/maps", encoding="ascii", errors="replace") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 6 and parts[5] == exe and parts[2] == "00000000":
                return int(parts[0].split("-")[0], 16)
    return None


def probe_cross_process(timeout: float = 10.0) -> dict[str, object]:
    """Reads 4 bytes of another process's memory with process_vm_readv and takes a copy
    of one of its fds with pidfd_getfd: the two calls the shm backend makes. The other
    process is a child (``sleep``) killed afterwards; every wait is bounded."""
    out: dict[str, object] = {"cma": None, "cma_error": "", "pidfd_getfd": None, "pidfd_error": ""}
    sleeper = shutil.which("sleep")
    cmd = (
        [sleeper, str(int(timeout) + 5)] if sleeper else [sys.executable, "-c", "import time; time.sleep(15)"]
    )
    child = subprocess.Popen(
        cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    image = os.path.realpath(cmd[0])  # what /proc/PID/exe shows once exec has happened
    try:
        deadline = time.monotonic() + timeout
        base = None
        while base is None and time.monotonic() < deadline:  # until exec has replaced the image
            try:
                base = _elf_base(child.pid) if os.readlink(f"/proc/{child.pid}/exe") == image else None
            except OSError:
                base = None
            if base is None:
                time.sleep(0.005)
        if base is None:
            out["cma_error"] = "could not find the child's executable mapping"
            return out
        libc = _libc()
        local = ctypes.create_string_buffer(4)
        liov = _Iovec(ctypes.cast(local, ctypes.c_void_p), 4)
        riov = _Iovec(base, 4)
        libc.process_vm_readv.restype = ctypes.c_ssize_t
        libc.process_vm_readv.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
            ctypes.c_ulong,
            ctypes.c_ulong,
        ]
        n = libc.process_vm_readv(child.pid, ctypes.byref(liov), 1, ctypes.byref(riov), 1, 0)
        if n == 4 and local.raw == b"\x7fELF":
            out["cma"] = True
        else:
            out["cma"] = False
            e = ctypes.get_errno()
            out["cma_error"] = (
                f"{errno.errorcode.get(e, e)}: {os.strerror(e)}" if n < 0 else f"read {n} bytes"
            )
        try:
            pidfd = os.pidfd_open(child.pid)
        except (OSError, AttributeError) as e:
            out["pidfd_getfd"], out["pidfd_error"] = False, f"pidfd_open: {e}"
            return out
        try:
            libc.syscall.restype = ctypes.c_long
            fd = libc.syscall(
                ctypes.c_long(SYS_PIDFD_GETFD), ctypes.c_int(pidfd), ctypes.c_int(0), ctypes.c_uint(0)
            )
            if fd >= 0:
                os.close(fd)
                out["pidfd_getfd"] = True
            else:
                e = ctypes.get_errno()
                out["pidfd_getfd"], out["pidfd_error"] = (
                    False,
                    f"{errno.errorcode.get(e, e)}: {os.strerror(e)}",
                )
        finally:
            os.close(pidfd)
    finally:
        child.kill()
        child.wait(timeout=timeout)
    return out


def check_cross_process(ctx: Context) -> Check:
    yama = _yama()
    probe = probe_cross_process()
    data = {"ptrace_scope": yama, **probe}
    scope = "no Yama LSM" if yama is None else f"Yama ptrace_scope {yama}"
    if yama == 1:
        scope += " (kvxfer's shm backend sets PR_SET_PTRACER_ANY, so same-user peers may attach)"
    need = ctx.needed("shm")
    fix_perm = (
        "run both engines as the same user in the same PID namespace; "
        + ("Yama: `sysctl kernel.yama.ptrace_scope=1` or grant CAP_SYS_PTRACE; " if (yama or 0) >= 2 else "")
        + "in a container the seccomp profile may forbid process_vm_*/pidfd_getfd: "
        "docker --cap-add SYS_PTRACE (or a profile that allows them)"
    )
    if not probe["cma"]:
        return Check(
            "shm.cross_process",
            "fail" if need else "warn",
            f"process_vm_readv into another process failed ({probe['cma_error']}); {scope}",
            fix_perm,
            data,
        )
    if not probe["pidfd_getfd"]:
        return Check(
            "shm.cross_process",
            "warn",
            f"process_vm_readv works, pidfd_getfd does not ({probe['pidfd_error']}): kvxfer.empty() "
            f"memory of a peer is reached by cross-memory attach instead of a mapping (slower); {scope}",
            "Linux >= 5.6 has pidfd_getfd; otherwise as for process_vm_readv: " + fix_perm,
            data,
        )
    return Check(
        "shm.cross_process",
        "ok",
        f"process_vm_readv and pidfd_getfd into another process work; {scope}",
        data=data,
    )


def check_memfd(ctx: Context) -> Check:
    size = 2 << 20
    try:
        fd = os.memfd_create("kvxfer-doctor", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            with mmap.mmap(fd, size) as m:
                m[0:4] = b"kvxf"
                m[size - 4 : size] = b"done"
                ok = m[0:4] == b"kvxf" and m[size - 4 : size] == b"done"
        finally:
            os.close(fd)
        import kvxfer

        arr = kvxfer.empty(1 << 20)
        arr[:] = 7
        ok = ok and int(arr.sum()) == 7 << 20
    except (OSError, AttributeError) as e:
        return Check(
            "shm.memfd",
            "fail" if ctx.needed("shm") else "warn",
            f"memfd_create/mmap failed: {e}: kvxfer.empty() cannot allocate shareable memory",
            "Linux >= 3.17 with shmem; a seccomp profile may forbid memfd_create",
        )
    limit = _cgroup_memory_max()
    data = {"cgroup_memory_max": limit, "pool_bytes": ctx.pool_bytes}
    detail = "memfd_create + mmap work (kvxfer.empty() memory: the shm fast path)"
    if not ok:
        return Check("shm.memfd", "fail", "memfd memory did not read back what was written", data=data)
    if limit is not None and limit < 2 * ctx.pool_bytes:
        return Check(
            "shm.memfd",
            "warn",
            f"{detail}; but the cgroup memory limit {human_bytes(limit)} is below two "
            f"{human_bytes(ctx.pool_bytes)} pools (prefill + decode on this host)",
            "raise the container's memory limit (docker --memory) or use smaller pools",
            data,
        )
    return Check(
        "shm.memfd",
        "ok",
        detail + (f"; cgroup memory limit {human_bytes(limit)}" if limit else ""),
        data=data,
    )


def _cgroup_memory_max() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path, encoding="ascii") as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
        return None
    return None


def check_dev_shm(ctx: Context) -> Check:  # noqa: ARG001
    try:
        st = os.statvfs("/dev/shm")
    except OSError as e:
        return Check(
            "shm.dev_shm",
            "warn",
            f"/dev/shm is missing ({e}); kvxfer itself does not use it, torch multiprocessing and NCCL do",
            "mount a tmpfs on /dev/shm",
        )
    size, free = st.f_blocks * st.f_frsize, st.f_bavail * st.f_frsize
    data = {"size_bytes": size, "free_bytes": free}
    detail = (
        f"/dev/shm {human_bytes(size)} ({human_bytes(free)} free); kvxfer's buffers are memfd, "
        "not /dev/shm, but torch multiprocessing and NCCL use it"
    )
    if size < (1 << 30):
        return Check(
            "shm.dev_shm",
            "warn",
            detail,
            "docker run --shm-size=16g (or --ipc=host); Kubernetes: an emptyDir with medium Memory",
            data,
        )
    return Check("shm.dev_shm", "ok", detail, data=data)


def check_socket(ctx: Context) -> Check:
    """The shm backend's notification socket: SOCK_SEQPACKET in the abstract namespace."""
    name = b"\0kvxfer-doctor-%d-%d" % (os.getpid(), time.monotonic_ns())
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as srv:
            srv.bind(name)
            srv.listen(1)
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as cli:
                cli.settimeout(5.0)
                cli.connect(name)
                conn, _ = srv.accept()
                with conn:
                    conn.settimeout(5.0)
                    cli.send(b"kvxfer")
                    got = conn.recv(64)
    except OSError as e:
        return Check(
            "shm.socket",
            "fail" if ctx.needed("shm") else "warn",
            f"abstract SOCK_SEQPACKET socket failed: {e}",
            "a seccomp or LSM policy forbids AF_UNIX sockets here",
        )
    if got != b"kvxfer":
        return Check("shm.socket", "fail", f"abstract socket delivered {got!r} instead of b'kvxfer'")
    return Check(
        "shm.socket",
        "ok",
        "abstract SOCK_SEQPACKET sockets work (shm notifications: @kvxfer-shm-<instance id>; "
        "peers must share a network namespace, e.g. docker --net=host or one pod)",
    )
