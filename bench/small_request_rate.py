"""One 4 KiB request at a time through the Python API, in one process (two engines):
requests/s and thread CPU per request for the ways of posting it.

    python bench/small_request_rate.py [BACKEND=shm] [REQUESTS=50000]

Works with older kvxfer versions too (``post_extent`` is skipped where it is missing), so
the same command measures before and after a change in the same conditions.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import kvxfer


def main(argv: list[str]) -> int:
    backend = argv[0] if argv else "shm"
    n = int(argv[1]) if len(argv) > 1 else 50000
    a = kvxfer.Engine("pa", backends=[backend])
    b = kvxfer.Engine("pb", backends=[backend])
    src, dst = kvxfer.empty(4096 * 64), kvxfer.empty(4096 * 64)
    src[:] = 7
    layout = kvxfer.KvLayout(num_blocks=64, block_bytes=4096)
    ra, rb = a.register(src, layout), b.register(dst, layout)
    peer = a.add_peer(b.descriptor())
    w = kvxfer.Op.WRITE
    ids = np.array([5])
    cases = {
        "post(local_blocks=ndarray)": lambda: a.post(w, peer, ra, rb.id, local_blocks=ids).wait(),
        "write(blocks=[5])": lambda: a.write(peer, ra, rb.id, [5]).wait(),
        "post(extents=[(0, 4096)])": lambda: a.post(
            w, peer, ra, rb.id, local_extents=[(0, 4096)], remote_extents=[(0, 4096)]
        ).wait(),
    }
    if hasattr(a, "post_extent"):
        cases["post_extent"] = lambda: a.post_extent(w, peer, ra, rb.id, 0, 0, 4096).wait()
    for label, f in cases.items():
        for _ in range(min(n, 1000)):
            f()
        t, c = time.perf_counter(), time.thread_time()
        for _ in range(n):
            f()
        dt, dc = time.perf_counter() - t, time.thread_time() - c
        print(
            f"{backend} {label}: {n / dt:,.0f} req/s, {dt / n * 1e6:.2f} us wall, {dc / n * 1e6:.2f} us CPU"
        )
    assert np.array_equal(src[:4096], dst[:4096]) and np.array_equal(
        src[5 * 4096 : 6 * 4096], dst[5 * 4096 : 6 * 4096]
    )
    a.close()
    b.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
