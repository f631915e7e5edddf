"""Loads libkvxfer.so through cffi (ABI mode) from native/include/kvxfer.h itself, so the
tests exercise the header a C user compiles against, not a hand-written copy of it.

The library: $KVXFER_CAPI_LIB, else build/cpp/native/libkvxfer.so of this checkout.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import cffi

ROOT = Path(__file__).resolve().parents[2]
HEADER = ROOT / "native" / "include" / "kvxfer.h"
DEFAULT_LIB = ROOT / "build" / "cpp" / "native" / "libkvxfer.so"


def library_path() -> Path:
    return Path(os.environ.get("KVXFER_CAPI_LIB", DEFAULT_LIB))


def cdef_source() -> str:
    """The header with what cffi's parser does not take removed: comments, include
    guards, #include, extern "C" and the export macro. Integer #defines stay (cffi reads
    them as constants)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    text = re.sub(r"//[^\n]*", "", text)
    keep = []
    skipping = 0
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#if defined") or s.startswith("#ifdef __cplusplus"):
            skipping += 1
            continue
        if skipping:
            if s.startswith("#endif"):
                skipping -= 1
            continue
        if s.startswith("#"):
            if re.match(r"#define\s+KVXFER_\w+\s+\d+u?\s*$", s):
                keep.append(s.rstrip("u"))
            continue
        keep.append(line.replace("KVXFER_API ", ""))
    return "\n".join(keep)


ffi = cffi.FFI()
ffi.cdef(cdef_source())


def load():
    return ffi.dlopen(str(library_path()))


class CapiError(Exception):
    def __init__(self, lib, code: int) -> None:
        self.code = code
        self.name = ffi.string(lib.kvxfer_status_name(code)).decode()
        self.message = ffi.string(lib.kvxfer_last_error()).decode()
        super().__init__(f"{self.name}: {self.message}")


def check(lib, code: int) -> None:
    if code != lib.KVXFER_OK:
        raise CapiError(lib, code)


def engine(lib, config: str):
    out = ffi.new("kvxfer_engine**")
    check(lib, lib.kvxfer_engine_create(config.encode(), out))
    return out[0]


def descriptor(lib, eng) -> bytes:
    n = ffi.new("size_t*")
    check(lib, lib.kvxfer_engine_descriptor(eng, ffi.NULL, 0, n))
    buf = ffi.new("uint8_t[]", n[0])
    check(lib, lib.kvxfer_engine_descriptor(eng, buf, n[0], n))
    return bytes(ffi.buffer(buf, n[0]))


def add_peer(lib, eng, desc: bytes):
    out = ffi.new("kvxfer_peer**")
    check(lib, lib.kvxfer_add_peer(eng, desc, len(desc), out))
    return out[0]


def register(lib, eng, buf, nbytes: int, layout: dict | None = None):
    """Registers cffi/numpy memory at `buf` (a cdata pointer or an int address)."""
    lay = ffi.NULL
    if layout is not None:
        lay = ffi.new("kvxfer_kv_layout*", layout)
    ptr = ffi.cast("void*", buf)
    out = ffi.new("kvxfer_region**")
    check(lib, lib.kvxfer_register(eng, ptr, nbytes, lay, out))
    return out[0]


def remote_regions(lib, peer) -> list:
    n = ffi.new("size_t*")
    check(lib, lib.kvxfer_peer_regions(peer, ffi.NULL, 0, n))
    arr = ffi.new("kvxfer_remote_region[]", n[0])
    check(lib, lib.kvxfer_peer_regions(peer, arr, n[0], n))
    return [
        SimpleNamespace(id=arr[i].id, nbytes=arr[i].nbytes, has_layout=bool(arr[i].has_layout))
        for i in range(n[0])
    ]


class Parts:
    """Builds a kvxfer_part array and keeps the id/extent arrays it points at alive."""

    def __init__(self) -> None:
        self._keep: list = []
        self._parts: list[dict] = []

    def _side(self, blocks=None, extents=None, layers=(0, 0)) -> dict:
        if blocks is not None:
            ids = ffi.new("int64_t[]", [int(b) for b in blocks])
            self._keep.append(ids)
            return {
                "kind": 0,
                "block_ids": ids,
                "num_block_ids": len(blocks),
                "layer_begin": layers[0],
                "layer_end": layers[1],
            }
        ext = ffi.new("kvxfer_extent[]", [(int(o), int(n)) for o, n in extents])
        self._keep.append(ext)
        return {"kind": 1, "extents": ext, "num_extents": len(extents)}

    def add(self, local, remote_id: int, local_side: dict, remote_side: dict) -> None:
        self._parts.append(
            {
                "local": local,
                "remote_region": remote_id,
                "local_side": self._side(**local_side),
                "remote_side": self._side(**remote_side),
            }
        )

    def array(self):
        arr = ffi.new("kvxfer_part[]", self._parts)
        self._keep.append(arr)
        return arr, len(self._parts)


def post(lib, eng, peer, op: int, parts: Parts, notify: bytes = b"", timeout_ms: int = 10000, flags: int = 0):
    arr, n = parts.array()
    out = ffi.new("kvxfer_transfer**")
    note = notify if notify else ffi.NULL
    check(
        lib,
        lib.kvxfer_post(eng, peer, op, arr if n else ffi.NULL, n, note, len(notify), timeout_ms, flags, out),
    )
    return out[0]


def wait_note(lib, eng, key: bytes | None, timeout_ms: int) -> tuple[str, bytes] | None:
    note = ffi.new("kvxfer_notification*")
    k = key if key is not None else ffi.NULL
    code = lib.kvxfer_wait_notification(eng, k, len(key or b""), timeout_ms, note)
    if code == lib.KVXFER_PENDING:
        return None
    check(lib, code)
    try:
        return ffi.string(note.peer_name).decode(), bytes(ffi.buffer(note.payload, note.payload_len))
    finally:
        lib.kvxfer_notification_free(note)
