"""One side of the two-process C ABI test, driven through cffi: `decode DIR BACKEND` or
`prefill DIR BACKEND`. The decode publishes DIR/decode.kvx and checks what arrives; the
prefill writes one multi-region transfer (block parts and an extent part) with a
notification, then reads a region of the decode back. Each prints one JSON line and
exits 0 only if every byte matched."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # PYTHONSAFEPATH leaves it out

import numpy as np  # noqa: E402
from kvxfer_capi_testlib import (  # noqa: E402
    Parts,
    add_peer,
    check,
    descriptor,
    engine,
    ffi,
    load,
    post,
    register,
    remote_regions,
    wait_note,
)

LAYERS, BLOCKS, BLOCK = 3, 32, 2048
POOL = BLOCKS * BLOCK
FLAT = 65536  # a region without a layout, addressed by extents
PREFILL_IDS = [5, 6, 7, 8, 20, 0, 31]
DECODE_IDS = [10, 11, 12, 13, 2, 30, 31]
# Extents of the flat region: (prefill offset, decode offset, length).
EXTENTS = [(0, 4096, 1000), (5000, 100, 3000), (60000, 65000, 536)]
READBACK = [(1024, 7000), (40000, 2000)]  # decode's flat region, read into the prefill


def data(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def expected_flat() -> np.ndarray:
    """The decode's flat region after the prefill's extents landed in it."""
    out = data(99, FLAT)
    src = data(98, FLAT)
    for lo, ro, n in EXTENTS:
        out[ro : ro + n] = src[lo : lo + n]
    return out


def decode(root: Path, backend: str) -> int:
    lib = load()
    eng = engine(lib, f"name=decode\nbackends={backend}\ntcp.listen=127.0.0.1:0\ndefault_timeout_ms=20000")
    layout = {"num_layers": 1, "num_kv": 1, "num_blocks": BLOCKS, "block_bytes": BLOCK}
    pools, keep = [], []
    for _ in range(2 * LAYERS):
        p = ffi.new("void**")
        check(lib, lib.kvxfer_alloc_shareable(POOL, p))
        pools.append(np.frombuffer(ffi.buffer(p[0], POOL), dtype=np.uint8).reshape(BLOCKS, BLOCK))
        keep.append(register(lib, eng, p[0], POOL, layout))
    flat = data(99, FLAT)  # ordinary memory; what the prefill reads back
    keep.append(register(lib, eng, flat.ctypes.data, FLAT))
    tmp = root / "decode.kvx.tmp"
    tmp.write_bytes(descriptor(lib, eng))
    os.rename(tmp, root / "decode.kvx")

    got = wait_note(lib, eng, b"req-A", 30000)
    bad = 0 if got is not None else -1
    if got is not None:
        untouched = np.setdiff1d(np.arange(BLOCKS), DECODE_IDS)
        for r, pool in enumerate(pools):
            src = data(r, POOL).reshape(BLOCKS, BLOCK)
            bad += int((pool[DECODE_IDS] != src[PREFILL_IDS]).sum())
            bad += int((pool[untouched] != 0).sum())  # nothing landed elsewhere
        bad += int((flat != expected_flat()).sum())
    done = wait_note(lib, eng, b"done", 30000)  # the prefill has read back: safe to go
    print(
        json.dumps(
            {
                "role": "decode",
                "note": [got[0], got[1].decode()] if got else None,
                "bad_bytes": bad,
                "done": done is not None,
            }
        )
    )
    check(lib, lib.kvxfer_engine_destroy(eng))
    return 0 if bad == 0 and done is not None else 1


def prefill(root: Path, backend: str) -> int:
    lib = load()
    eng = engine(lib, f"name=prefill\nbackends={backend}\ntcp.listen=127.0.0.1:0\ndefault_timeout_ms=20000")
    layout = {"num_layers": 1, "num_kv": 1, "num_blocks": BLOCKS, "block_bytes": BLOCK}
    kv = [data(r, POOL) for r in range(2 * LAYERS)]
    regions = [register(lib, eng, a.ctypes.data, POOL, layout) for a in kv]
    flat = data(98, FLAT)
    flat_region = register(lib, eng, flat.ctypes.data, FLAT)
    dest = np.zeros(sum(n for _, n in READBACK), dtype=np.uint8)
    dest_region = register(lib, eng, dest.ctypes.data, dest.nbytes)

    path = root / "decode.kvx"
    deadline = time.monotonic() + 30
    while not path.exists():
        if time.monotonic() > deadline:
            print(json.dumps({"role": "prefill", "error": "no descriptor"}))
            return 1
        time.sleep(0.02)
    peer = add_peer(lib, eng, path.read_bytes())
    remote = remote_regions(lib, peer)
    assert len(remote) == 2 * LAYERS + 1, len(remote)

    parts = Parts()
    for r in range(2 * LAYERS):
        parts.add(regions[r], remote[r].id, {"blocks": PREFILL_IDS}, {"blocks": DECODE_IDS})
    parts.add(
        flat_region,
        remote[-1].id,
        {"extents": [(lo, n) for lo, _, n in EXTENTS]},
        {"extents": [(ro, n) for _, ro, n in EXTENTS]},
    )
    t = post(lib, eng, peer, lib.KVXFER_OP_WRITE, parts, notify=b"req-A", timeout_ms=15000)
    check(lib, lib.kvxfer_transfer_wait(t, 20000))
    nbytes = ffi.new("uint64_t*")
    check(lib, lib.kvxfer_transfer_bytes(t, nbytes))
    check(lib, lib.kvxfer_transfer_release(t))

    back = Parts()
    offsets, at = [], 0
    for _, n in READBACK:
        offsets.append((at, n))
        at += n
    back.add(dest_region, remote[-1].id, {"extents": offsets}, {"extents": READBACK})
    t = post(lib, eng, peer, lib.KVXFER_OP_READ, back, timeout_ms=15000)
    check(lib, lib.kvxfer_transfer_wait(t, 20000))
    check(lib, lib.kvxfer_transfer_release(t))
    want = expected_flat()
    read_bad = int((dest != np.concatenate([want[o : o + n] for o, n in READBACK])).sum())

    check(lib, lib.kvxfer_notify(eng, peer, b"done", 4, 10000))
    via = ffi.new("char[32]")
    n = ffi.new("size_t*")
    check(lib, lib.kvxfer_peer_backend(peer, via, 32, n))
    print(
        json.dumps(
            {
                "role": "prefill",
                "written": nbytes[0],
                "read_bad_bytes": read_bad,
                "via": ffi.string(via).decode(),
            }
        )
    )
    check(lib, lib.kvxfer_peer_release(peer))
    check(lib, lib.kvxfer_engine_destroy(eng))
    return 0 if read_bad == 0 else 1


if __name__ == "__main__":
    role, root, backend = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
    sys.exit(decode(root, backend) if role == "decode" else prefill(root, backend))
