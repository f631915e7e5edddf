"""Measurement, not a test (docs/security.md, "Bounded resources"): the threads and memory a
tcp target engine spends per connected peer. Opens N authenticated peer connections (raw
sockets through the real handshake, hostile.py) and reads the target's thread count and RSS.

    python tests/adversarial/measure_peers.py        # from a checkout with kvxfer built
"""

from __future__ import annotations

import os
import resource
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from hostile import HostileClient, tcp_port  # noqa: E402

import kvxfer  # noqa: E402


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def threads() -> int:
    return len(os.listdir("/proc/self/task"))


def main() -> int:
    resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
    eng = kvxfer.Engine("target", backends=["tcp"])
    buf = np.zeros(1 << 20, np.uint8)
    eng.register(buf)
    desc = eng.descriptor()
    port = tcp_port(desc)
    base_threads, base_rss = threads(), rss_kib()
    clients: list[HostileClient] = []
    for n in (128, 512, 1000):
        while len(clients) < n:
            c = HostileClient(port, timeout=30)
            assert c.authenticate(desc, initiator=len(clients) + 1, link=len(clients) + 1) == 0
            clients.append(c)
        time.sleep(0.5)
        grown = rss_kib() - base_rss
        print(
            f"{n} peers: threads {threads()} (idle engine {base_threads}), "
            f"RSS +{grown / 1024:.1f} MiB = {grown / n:.0f} KiB per peer",
            flush=True,
        )
    for c in clients:
        c.close()
    eng.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
