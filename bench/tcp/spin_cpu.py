"""CPU per request of 4 KiB tcp writes spaced GAP_US apart: what the busy-poll
(TcpConfig.spin_us, docs/benchmarks.md "tcp, third pass") costs when requests are sparse.

Two engines in this process (the CPU of both sides is this process's), one request at a
time, a time.sleep(GAP) after each; prints CPU and wall time per request.

    PYTHONPATH=$PWD python bench/tcp/spin_cpu.py GAP_US [REQUESTS=3000]
    KVXFER_TCP_SPIN_US=0 PYTHONPATH=$PWD python bench/tcp/spin_cpu.py GAP_US   # without the spin
"""

from __future__ import annotations

import sys
import time

import numpy as np

import kvxfer
from kvxfer import Op


def main(argv: list[str]) -> int:
    gap = float(argv[0]) * 1e-6 if argv else 0.0
    n = int(argv[1]) if len(argv) > 1 else 3000
    a = kvxfer.Engine("a", backends=["tcp"])
    b = kvxfer.Engine("b", backends=["tcp"])
    try:
        src = np.random.default_rng(1).integers(0, 256, 64 * 4096, dtype=np.uint8)
        dst = np.zeros_like(src)
        ra, rb = a.register(src), b.register(dst)
        peer = a.add_peer(b.descriptor())
        for _ in range(200):  # warm-up
            a.post_extent(Op.WRITE, peer, ra, rb.id, 0, 0, 4096).wait()
        c0, t0 = time.process_time(), time.perf_counter()
        for i in range(n):
            off = (i % 64) * 4096
            a.post_extent(Op.WRITE, peer, ra, rb.id, off, off, 4096).wait()
            if gap:
                time.sleep(gap)
        cpu, wall = time.process_time() - c0, time.perf_counter() - t0
        if not np.array_equal(src, dst):
            print("bytes differ", file=sys.stderr)
            return 1
        print(f"gap {gap * 1e6:.0f} us: cpu/req {cpu / n * 1e6:.1f} us, wall/req {wall / n * 1e6:.1f} us")
        return 0
    finally:
        a.close()
        b.close()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
