"""Two-process WRITE (and READ) throughput of the kvxfer TCP backend over loopback.

The target engine runs in a child process (multiprocessing "spawn"); descriptors travel
through a Pipe. Each iteration moves one extent of SIZE bytes between pre-faulted numpy
buffers and waits for DONE (for a WRITE: the target has ACKed, the bytes are in its
memory). The bytes are verified (SHA-256) after the timed loop.

    PYTHONPATH=$PWD python3 bench/tcp/tcp_bench.py [MiB=256] [iterations=10]
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import sys
import time

import numpy as np


def target(conn, nbytes: int) -> None:
    import kvxfer

    eng = kvxfer.Engine("bench-target", backends=["tcp"])
    buf = np.zeros(nbytes, np.uint8)
    reg = eng.register(buf)
    conn.send((eng.descriptor(), reg.id))
    conn.recv()  # "check"
    conn.send(hashlib.sha256(buf).hexdigest())
    conn.recv()  # "exit"
    eng.close()


def main() -> None:
    import kvxfer

    mib = int(sys.argv[1]) if len(sys.argv) > 1 else 256
    iters = int(sys.argv[2]) if len(sys.argv) > 2 else 10
    nbytes = mib << 20
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=target, args=(child, nbytes))
    proc.start()
    desc, region_id = parent.recv()
    eng = kvxfer.Engine("bench-initiator", backends=["tcp"])
    src = np.random.default_rng(0).integers(0, 256, nbytes, dtype=np.uint8)
    reg = eng.register(src)
    peer = eng.add_peer(desc)
    ext = np.array([[0, nbytes]], np.uint64)
    results = {}
    for op in (kvxfer.Op.WRITE, kvxfer.Op.READ):
        if op == kvxfer.Op.READ:
            src_copy = src.copy()
        rates = []
        for _ in range(iters):
            t0 = time.perf_counter()
            eng.post(op, peer, reg, region_id, local_extents=ext, remote_extents=ext, timeout=60).wait()
            rates.append(nbytes / (time.perf_counter() - t0) / 1e9)
        rates.sort()
        results[op.name] = (rates[-1], rates[len(rates) // 2])
        if op == kvxfer.Op.WRITE:
            parent.send("check")
            got = parent.recv()
            assert got == hashlib.sha256(src).hexdigest(), "WRITE bytes differ"
        else:
            assert np.array_equal(src, src_copy), "READ bytes differ"
    parent.send("exit")
    proc.join(30)
    for name, (best, median) in results.items():
        rates = f"best {best:.2f} GB/s, median {median:.2f} GB/s"
        print(f"kvxfer tcp {name} two processes, {mib} MiB x {iters}: {rates}")


if __name__ == "__main__":
    main()
