"""Measurement (docs/security.md, "Bounded resources"): the threads and memory a tcp target
engine spends per connected peer, with real kvxfer engines as the peers.

This process holds the target engine. `--processes` client processes each create
`--peers / --processes` engines (`kvxfer.Engine(backends=["tcp"])`); each engine adds the
target as a peer, writes its own 4 KiB pattern into its own block of the target's region
with a notification, and stays connected. The target checks every block byte for byte and
every notification, then reads its own thread count (/proc/self/task) and RSS, and finally
checks that a fresh peer's transfer still completes.

    python tests/adversarial/measure_peers.py                    # 1000 peers in 8 processes
    python tests/adversarial/measure_peers.py --peers 128 --processes 2 --json

`swarm()` is also what tests/adversarial/test_peer_swarm.py runs, at a smaller count.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import threading
import time

import numpy as np

import kvxfer
from kvxfer import Op

BLOCK = 4096


def rss_kib(pid: int | str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def threads(pid: int | str = "self") -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def pattern(i: int) -> np.ndarray:
    return np.random.default_rng(i).integers(0, 256, BLOCK, dtype=np.uint8)


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 16384 if hard == resource.RLIM_INFINITY else min(16384, hard)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _client(conn, descriptor: bytes, region_id: int, first: int, count: int) -> None:
    """A client process: `count` engines, one verified WRITE + notification each, kept connected."""
    _raise_fd_limit()
    held = []
    try:
        base_threads, base_rss = threads(), rss_kib()
        for i in range(first, first + count):
            eng = kvxfer.Engine(f"swarm-{i}", backends=["tcp"], timeout=120.0)
            src = pattern(i)
            region = eng.register(src)
            peer = eng.add_peer(descriptor)
            eng.post(
                Op.WRITE,
                peer,
                region,
                region_id,
                local_extents=[[0, BLOCK]],
                remote_extents=[[i * BLOCK, BLOCK]],
                notify=f"swarm {i}".encode(),
            ).wait(120)
            held.append((eng, region, src, peer))
        conn.send(("ok", (threads() - base_threads, rss_kib() - base_rss)))
        conn.recv()  # "exit": until then every engine stays connected
    except Exception as e:  # reported to the parent, which fails on it
        conn.send(("error", repr(e)))
    finally:
        for eng, *_ in held:
            eng.close()


def swarm(peers: int, processes: int, log=lambda s: None) -> dict:
    """Connects `peers` engines in `processes` processes to a tcp target engine in this
    process; returns the figures (threads, RSS, timing). Raises on any wrong byte or
    notification, or if a fresh peer cannot transfer with all of them connected."""
    _raise_fd_limit()
    target = kvxfer.Engine("swarm-target", backends=["tcp"], timeout=120.0)
    buf = np.zeros(peers * BLOCK, np.uint8)
    region = target.register(buf)
    descriptor = target.descriptor()
    time.sleep(0.2)
    idle_threads, idle_rss = threads(), rss_kib()

    # The thread count while peers connect and transfer (the pool may grow with busy peers).
    peak = [idle_threads]
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.wait(0.02):
            peak[0] = max(peak[0], threads() - 1)  # not counting this sampler

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    ctx = mp.get_context("spawn")
    clients = []
    share = [peers // processes + (1 if k < peers % processes else 0) for k in range(processes)]
    started = time.monotonic()
    first = 0
    try:
        for count in share:
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client, args=(child, descriptor, region.id, first, count), daemon=True)
            p.start()
            clients.append((p, parent, count))
            first += count
        per_engine = []
        for p, parent, count in clients:
            if not parent.poll(600):
                raise TimeoutError(f"client process {p.pid} did not connect its {count} engines in 600 s")
            status, value = parent.recv()
            if status != "ok":
                raise RuntimeError(f"client process {p.pid}: {value}")
            per_engine.append((value[0] / count, value[1] / count))
        connect_s = time.monotonic() - started
        sampling.set()
        sampler.join()
        log(f"{peers} peers connected and transferred in {connect_s:.1f} s")

        # Every block and every notification, exactly.
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < peers and time.monotonic() < deadline:
            got += [n.payload for n in target.notifications()]
            time.sleep(0.01)
        if sorted(got) != sorted(f"swarm {i}".encode() for i in range(peers)):
            raise AssertionError(f"{len(got)} notifications, expected one from each of {peers} peers")
        for i in range(peers):
            if not np.array_equal(buf[i * BLOCK : (i + 1) * BLOCK], pattern(i)):
                raise AssertionError(f"block {i} of the target's region is not peer {i}'s pattern")
        time.sleep(0.5)
        with_threads, with_rss = threads(), rss_kib()
        log(
            f"target: {idle_threads} threads idle, {with_threads} with {peers} peers "
            f"(peak {peak[0]} while they connected); RSS +{(with_rss - idle_rss) / 1024:.1f} MiB"
        )

        # A fresh peer still gets through, with every other peer connected.
        fresh = kvxfer.Engine("swarm-fresh", backends=["tcp"], timeout=30.0)
        try:
            src = np.full(BLOCK, 0xA5, np.uint8)
            peer = fresh.add_peer(descriptor)
            t0 = time.monotonic()
            fresh.post(
                Op.WRITE,
                peer,
                fresh.register(src),
                region.id,
                local_extents=[[0, BLOCK]],
                remote_extents=[[0, BLOCK]],
                notify=b"fresh",
            ).wait(30)
            fresh_ms = (time.monotonic() - t0) * 1e3
        finally:
            fresh.close()
        notes = []
        deadline = time.monotonic() + 10
        while not notes and time.monotonic() < deadline:
            notes = [n.payload for n in target.notifications()]
            time.sleep(0.01)
        if notes != [b"fresh"] or not (buf[:BLOCK] == 0xA5).all():
            raise AssertionError(f"the fresh peer's transfer did not land (notifications {notes})")
        return {
            "peers": peers,
            "processes": processes,
            "cores": os.cpu_count(),
            "target_threads_idle": idle_threads,
            "target_threads_with_peers": with_threads,
            "target_threads_peak": peak[0],
            "target_rss_idle_kib": idle_rss,
            "target_rss_with_peers_kib": with_rss,
            "target_rss_per_peer_kib": round((with_rss - idle_rss) / peers, 2),
            "connect_and_transfer_s": round(connect_s, 2),
            "fresh_peer_write_ms": round(fresh_ms, 2),
            "client_threads_per_engine": round(sum(t for t, _ in per_engine) / len(per_engine), 2),
            "client_rss_per_engine_kib": round(sum(r for _, r in per_engine) / len(per_engine), 1),
            "load_average": os.getloadavg()[0],
        }
    finally:
        sampling.set()
        for _p, parent, _ in clients:
            try:
                parent.send("exit")
            except (BrokenPipeError, OSError):
                pass
        for p, _, _ in clients:
            p.join(60)
            if p.is_alive():
                p.kill()
                p.join(5)
        target.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", type=int, default=1000)
    ap.add_argument("--processes", type=int, default=8)
    ap.add_argument("--json", action="store_true", help="one JSON line on stdout")
    args = ap.parse_args(argv)
    figures = swarm(args.peers, args.processes, log=lambda s: print(s, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(figures))
    else:
        for k, v in figures.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
