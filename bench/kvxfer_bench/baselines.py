"""Baselines measured in the same run as the transfers they are compared with.

memcpy (shm, loopback, tcp): the same pieces (the same block ids, in the same order,
coalesced the same way as the transfer) copied between two buffers of this process by
glibc ``memcpy`` on up to the same number of threads (each case keeps the faster of one
thread and all of them, measured in its warm-up). The copy loop is a few lines of C
(``_memcpy.c``) built on first use with the system C compiler and called through ctypes,
because a Python loop over 32 KiB pieces measures the interpreter (numpy's strided copy
of the same blocks reaches ~6 GB/s on the reference machine where C reaches ~9 GB/s per
thread). Without a C compiler it falls back to numpy slices on a thread pool
(``baseline: memcpy-numpy`` in the output), which is slower, so ratios against it
flatter the transfer.

ib_write_bw (ibverbs): perftest's ``ib_write_bw`` on the same device, run through
``bench/baselines/ib_write_bw.sh SIZE``, with SIZE the mean run length of the
transfer after coalescing (the message size a hand-written verbs program would post).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

_SRC = Path(__file__).with_name("_memcpy.c")
_lib_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_lib_error = ""

# Each thread gets at least this many bytes before a copy is split; smaller copies run
# on one thread, as the engine's copy pool does with a small transfer.
MIN_PART_BYTES = 1 << 20
# Splitting has a price the copy may not recover (waking a thread costs tens of us on a
# VM), so each case measures the copy both on one thread and on all of them during the
# warm-up and keeps the faster: the baseline is the best memcpy with *up to* N threads.


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kvxfer-bench"


def load_helper() -> ctypes.CDLL | None:
    """Builds (once, cached by source hash) and loads the C copy helper; None if no compiler."""
    global _lib, _lib_error
    with _lib_lock:
        if _lib is not None or _lib_error:
            return _lib
        try:
            src = _SRC.read_bytes()
            tag = hashlib.sha256(src + sys.platform.encode()).hexdigest()[:16]
            out = _cache_dir() / f"memcpy-{tag}.so"
            if not out.exists():
                cc = (
                    os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
                )
                if not cc:
                    raise RuntimeError("no C compiler (cc/gcc/clang) found")
                out.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
                os.close(fd)
                r = subprocess.run(
                    [cc, "-O2", "-shared", "-fPIC", "-pthread", "-o", tmp, str(_SRC)],
                    capture_output=True,
                    text=True,
                )
                if r.returncode != 0:
                    os.unlink(tmp)
                    raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")
                os.replace(tmp, out)
            lib = ctypes.CDLL(str(out))
            lib.kvx_memcpy_init.argtypes = [ctypes.c_int]
            lib.kvx_memcpy_init.restype = ctypes.c_int
            p = ctypes.c_void_p
            lib.kvx_memcpy_pieces.argtypes = [p, p, p, p, p, ctypes.c_uint64, ctypes.c_int, ctypes.c_uint64]
            lib.kvx_memcpy_pieces.restype = ctypes.c_int
            _lib = lib
        except Exception as e:  # noqa: BLE001 - any failure means "use the numpy fallback"
            _lib_error = str(e)
        return _lib


def helper_error() -> str:
    return _lib_error


class CopyList:
    """One baseline request: pieces to copy from ``src`` to ``dst`` (uint64 arrays)."""

    def __init__(self, src_off: np.ndarray, dst_off: np.ndarray, lengths: np.ndarray):
        self.src_off = np.ascontiguousarray(src_off, dtype=np.uint64)
        self.dst_off = np.ascontiguousarray(dst_off, dtype=np.uint64)
        self.lengths = np.ascontiguousarray(lengths, dtype=np.uint64)
        self.prefix = np.concatenate(([0], np.cumsum(self.lengths, dtype=np.uint64))).astype(np.uint64)
        self.nbytes = int(self.prefix[-1])


class Memcpy:
    """Copies CopyLists from one buffer to another with up to ``threads`` threads."""

    def __init__(self, threads: int, prefer: str = "auto"):
        self.threads = max(1, int(threads))
        self.lib = None if prefer == "numpy" else load_helper()
        if prefer == "c" and self.lib is None:
            raise RuntimeError(f"the C memcpy helper is unavailable: {helper_error()}")
        self.name = "memcpy" if self.lib is not None else "memcpy-numpy"
        if self.lib is not None:
            self.lib.kvx_memcpy_init(self.threads)
            self._pool = None
        else:
            self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    def describe(self) -> str:
        if self.lib is not None:
            return f"glibc memcpy of the same pieces, C helper, up to {self.threads} threads"
        return (
            f"numpy slice copies of the same pieces on {self.threads} Python threads "
            f"(no C compiler: {helper_error()})"
        )

    def copy(self, dst: np.ndarray, src: np.ndarray, cl: CopyList, threads: int | None = None) -> None:
        """Copies ``cl`` on up to ``threads`` threads (default: all of this baseline's)."""
        if cl.lengths.size == 0:
            return
        threads = self.threads if threads is None else max(1, min(threads, self.threads))
        if self.lib is not None:
            self.lib.kvx_memcpy_pieces(
                dst.ctypes.data,
                src.ctypes.data,
                cl.dst_off.ctypes.data,
                cl.src_off.ctypes.data,
                cl.prefix.ctypes.data,
                cl.lengths.size,
                threads,
                MIN_PART_BYTES,
            )
            return
        parts = min(threads, max(1, cl.nbytes // MIN_PART_BYTES))
        if parts == 1 or self._pool is None:
            _numpy_copy(dst, src, cl, 0, cl.lengths.size)
            return
        bounds = np.searchsorted(cl.prefix, np.linspace(0, cl.nbytes, parts + 1).astype(np.uint64))
        futs = [
            self._pool.submit(_numpy_copy, dst, src, cl, int(a), int(b))
            for a, b in zip(bounds[:-1], bounds[1:], strict=False)
        ]
        for f in futs:
            f.result()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()


def _numpy_copy(dst: np.ndarray, src: np.ndarray, cl: CopyList, a: int, b: int) -> None:
    rows = zip(cl.src_off[a:b].tolist(), cl.dst_off[a:b].tolist(), cl.lengths[a:b].tolist(), strict=True)
    for so, do, n in rows:
        np.copyto(dst[do : do + n], src[so : so + n])


# --- ib_write_bw ---------------------------------------------------------------------

# perftest reports "MB/sec" with MB = 2^20 bytes (bench/baselines/ib_write_bw.sh copies
# that column as bw_MBps); --report_gbits would be decimal but is not used.
PERFTEST_MB = 1 << 20
_BW_RE = re.compile(r"bw_MBps=([0-9.]+)")


def find_ib_write_bw_script() -> Path | None:
    """bench/baselines/ib_write_bw.sh: $KVXFER_IB_WRITE_BW, next to the package in a
    source tree, or under the current directory."""
    cands = []
    if os.environ.get("KVXFER_IB_WRITE_BW"):
        cands.append(Path(os.environ["KVXFER_IB_WRITE_BW"]))
    cands.append(Path(__file__).resolve().parent.parent / "baselines" / "ib_write_bw.sh")
    cands.append(Path.cwd() / "bench" / "baselines" / "ib_write_bw.sh")
    for c in cands:
        if c.is_file():
            return c
    return None


class IbWriteBw:
    """Runs the perftest wrapper (ib_write_bw.sh, or ib_read_bw.sh for READ) once per
    message size and caches the result."""

    def __init__(self, script: Path, device: str = ""):
        self.script = script
        self.device = device.split(":")[0]
        self.cache: dict[tuple[str, int], float | None] = {}
        self.errors: list[str] = []

    def name(self, op: str) -> str:
        return "ib_read_bw" if op == "read" else "ib_write_bw"

    def gbps(self, size: int, op: str = "write") -> float | None:
        size = max(1, int(size))
        key = (op, size)
        if key not in self.cache:
            env = dict(os.environ)
            if self.device:
                env.setdefault("KVXFER_IB_DEVICE", self.device)
            args = ["bash", str(self.script)] + (["--read"] if op == "read" else []) + [str(size)]
            try:
                r = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env)
                m = _BW_RE.search(r.stdout)
                if r.returncode == 0 and m:
                    self.cache[key] = float(m.group(1)) * PERFTEST_MB / 1e9
                else:
                    self.errors.append(f"{' '.join(args[1:])}: rc={r.returncode} {r.stderr.strip()[:300]}")
                    self.cache[key] = None
            except (OSError, subprocess.TimeoutExpired) as e:
                self.errors.append(f"{' '.join(args[1:])}: {e}")
                self.cache[key] = None
        return self.cache[key]
