"""Time of ``add_peer`` (shm) to a peer process holding N GiB of ``kvxfer.empty`` memory.

    python bench/add_peer_cost.py [GIB=5]

A target process allocates and registers ``kvxfer.empty(N GiB)`` and prints its
descriptor; this process times ``add_peer`` of it 5 times (a new engine each time) and
prints the median and the runs in ms. Needs N GiB of free memory.
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import time


def _target(gib: float) -> int:
    import kvxfer

    eng = kvxfer.Engine("big", backends=["shm"])
    mem = kvxfer.empty(int(gib * (1 << 30)))
    region = eng.register(mem)  # kept: a dropped Region is deregistered
    print(eng.descriptor().hex(), flush=True)
    sys.stdin.read()
    del region
    eng.close()
    return 0


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--target":
        return _target(float(argv[1]))
    gib = float(argv[0]) if argv else 5.0
    import kvxfer

    proc = subprocess.Popen(
        [sys.executable, __file__, "--target", str(gib)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    desc = bytes.fromhex(proc.stdout.readline().strip())
    times = []
    for i in range(5):
        eng = kvxfer.Engine(f"a{i}", backends=["shm"])
        t = time.perf_counter()
        peer = eng.add_peer(desc)
        times.append((time.perf_counter() - t) * 1e3)
        assert peer.regions and peer.regions[0].nbytes >= gib * (1 << 30)
        eng.close()
    proc.stdin.close()
    proc.wait()
    runs = ", ".join(f"{x:.2f}" for x in times)
    median = statistics.median(times)
    print(f"add_peer of a peer with {gib:g} GiB of kvxfer.empty memory: median {median:.2f} ms [{runs}]")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
