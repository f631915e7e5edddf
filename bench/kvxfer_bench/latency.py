"""``kvxfer-bench --latency``: small requests one at a time and at queue depths 1..64.

Two processes on this host: this one posts, a spawned target process owns the remote
region (kvxfer.empty memory, so shm takes its mapped fast path). For each queue depth the
initiator keeps that many requests of ``--latency-bytes`` in flight (``post_extent``,
each to its own slot), waits for the oldest, and records per-request latency (post to
wait's return) and the request rate. Same-run baselines of the same bytes, one at a time:

- tcp: a plain TCP ping-pong with the target process (header + bytes one way, a 32-byte
  answer back, TCP_NODELAY), what any transport must pay for one round trip: once from one
  buffer to one buffer (``baseline``: the same cache-hot bytes every time) and once from
  and into the slots kvxfer's requests use (``slot_baseline``: the same memory moved);
- shm, loopback: a same-host wake-up ping-pong with the target process (a Unix socket,
  one byte each way) plus a memcpy of the bytes, what a copy thread with a wake-up costs.

Every run ends by reading the target's slots back and comparing them byte for byte.
Figures are medians over ``--repeat`` runs; ``loadavg_1m`` says how busy the machine was.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np

SLOTS = 64


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# --- target process ------------------------------------------------------------------


def _target_main(backend: str, nbytes: int) -> int:
    """Target: an engine with one region of SLOTS slots, a ping-pong socket and a wake-up
    socket; prints one JSON line (descriptor hex, ports) and serves until stdin closes."""
    import kvxfer

    eng = kvxfer.Engine("latency-target", backends=[backend])
    mem = kvxfer.empty(SLOTS * nbytes)
    region = eng.register(mem)
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(1)
    wake = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    wake_path = f"\0kvxfer-bench-latency-{os.getpid()}"
    wake.bind(wake_path)
    wake.listen(1)

    def serve_tcp() -> None:
        frame = nbytes + 32
        buf = bytearray(SLOTS * frame)
        view = memoryview(buf)
        ack = bytes(32)
        while True:  # one connection per run; its first byte: b"h" one buffer, b"s" slots
            c, _ = tcp.accept()
            c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with c:
                slots = c.recv(1) == b"s"
                i = 0
                while True:
                    base = (i % SLOTS) * frame if slots else 0
                    i += 1
                    got = 0
                    while got < frame:
                        k = c.recv_into(view[base + got : base + frame])
                        if k == 0:
                            break
                        got += k
                    if got < frame:
                        break
                    c.sendall(ack)

    def serve_wake() -> None:
        while True:  # one connection per run
            c, _ = wake.accept()
            with c:
                while c.recv(1):
                    c.send(b"\1")

    for fn in (serve_tcp, serve_wake):
        threading.Thread(target=fn, daemon=True).start()
    info = {
        "descriptor": eng.descriptor().hex(),
        "region": region.id,
        "tcp_port": tcp.getsockname()[1],
        "wake": wake_path[1:],
        "pid": os.getpid(),
    }
    print(json.dumps(info), flush=True)
    sys.stdin.read()  # until the initiator closes our stdin
    eng.close()
    return 0


# --- initiator ---------------------------------------------------------------------------


class _Target:
    def __init__(self, backend: str, nbytes: int):
        from kvxfer.child_env import child_env

        env = child_env()
        bench_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = bench_root + os.pathsep + env["PYTHONPATH"]
        cmd = [sys.executable, "-m", "kvxfer_bench.latency", "--target", backend, str(nbytes)]
        self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"latency target exited with {self.proc.wait()}")
        self.info = json.loads(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _cpu_s(target_pid: int) -> float:
    """CPU seconds used so far by this process and the target process (user + system, every
    thread): a busy-poll trades CPU for latency, so each run reports what it used."""
    try:
        with open(f"/proc/{target_pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        target = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    except (OSError, IndexError, ValueError):
        target = 0.0
    return time.process_time() + target


def _timed(target_pid: int, requests: int, fn, *args) -> dict:
    """fn(*args) (a run's dict) plus cpu_us_per_req: both processes' CPU per request."""
    c0 = _cpu_s(target_pid)
    out = fn(*args)
    out["cpu_us_per_req"] = (_cpu_s(target_pid) - c0) / requests * 1e6
    return out


def _run_kvxfer(eng, peer, region, remote, src, nbytes: int, depth: int, requests: int) -> dict:
    import kvxfer

    W = kvxfer.Op.WRITE
    post = eng.post_extent
    lat: list[float] = []
    window: list[tuple[Any, float]] = []
    clock = time.perf_counter
    t0 = clock()
    if depth == 1:
        # One at a time: the loop has the baselines' shape (time, request, record), so the
        # harness adds the same work to both and the queue below adds none.
        for i in range(requests):
            off = (i % SLOTS) * nbytes
            s = clock()
            post(W, peer, region, remote, off, off, nbytes).wait()
            lat.append(clock() - s)
        secs = clock() - t0
        return {"req_per_s": requests / secs, "p50_us": _pct(lat, 0.5) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6}
    for i in range(requests):
        if len(window) == depth:
            t, s = window.pop(0)
            t.wait()
            lat.append(clock() - s)
        off = (i % SLOTS) * nbytes
        s = clock()
        window.append((post(W, peer, region, remote, off, off, nbytes), s))
    for t, s in window:
        t.wait()
        lat.append(clock() - s)
    secs = clock() - t0
    return {"req_per_s": requests / secs, "p50_us": _pct(lat, 0.5) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6}


def _run_tcp_baseline(port: int, nbytes: int, requests: int, src: np.ndarray | None = None) -> dict:
    """A plain TCP ping-pong: 32 header bytes + `nbytes` one way, 32 bytes back. With `src`,
    request i sends slot i % SLOTS of `src` and the target receives it into its slot i % SLOTS
    (the memory kvxfer's requests move: "socket-pingpong-slots"); without, one buffer each
    side, the same bytes every time (cache-hot: "socket-pingpong")."""
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    c.sendall(b"s" if src is not None else b"h")
    payload = bytes(nbytes + 32)
    head = bytes(32)
    slots = memoryview(src) if src is not None else None
    ack = bytearray(32)
    view = memoryview(ack)
    lat: list[float] = []
    clock = time.perf_counter
    t0 = clock()
    for i in range(requests):
        if slots is not None:
            off = (i % SLOTS) * nbytes
            s = clock()
            sent = c.sendmsg([head, slots[off : off + nbytes]])
            if sent < nbytes + 32:  # a short send: the rest, in order
                rest = (head + bytes(slots[off : off + nbytes]))[sent:]
                c.sendall(rest)
        else:
            s = clock()
            c.sendall(payload)
        got = 0
        while got < 32:
            got += c.recv_into(view[got:])
        lat.append(clock() - s)
    secs = clock() - t0
    c.close()
    return {"req_per_s": requests / secs, "p50_us": _pct(lat, 0.5) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6}


def _run_wake_baseline(name: str, src: np.ndarray, nbytes: int, requests: int) -> dict:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.settimeout(60)  # a baseline must never hang the bench
    c.connect("\0" + name)
    dst = np.empty_like(src)
    lat: list[float] = []
    clock = time.perf_counter
    t0 = clock()
    for i in range(requests):
        s = clock()
        off = (i % SLOTS) * nbytes
        np.copyto(dst[off : off + nbytes], src[off : off + nbytes])
        c.send(b"\1")
        c.recv(1)
        lat.append(clock() - s)
    secs = clock() - t0
    c.close()
    return {"req_per_s": requests / secs, "p50_us": _pct(lat, 0.5) * 1e6, "p99_us": _pct(lat, 0.99) * 1e6}


def run(
    backend: str,
    nbytes: int,
    depths: list[int],
    requests: int,
    repeat: int,
    emit,
    log=lambda msg: None,
) -> int:
    """Measures every depth `repeat` times; calls emit(record) per depth. 0, or 3 when a
    verification failed."""
    import kvxfer

    from . import machine

    target = _Target(backend, nbytes)
    eng = kvxfer.Engine("latency-initiator", backends=[backend])
    try:
        src = kvxfer.empty(SLOTS * nbytes)
        src[:] = np.random.default_rng(1).integers(0, 256, src.size, dtype=np.uint8)
        region = eng.register(src)
        peer = eng.add_peer(bytes.fromhex(target.info["descriptor"]))
        remote = target.info["region"]
        base_name = "socket-pingpong" if backend == "tcp" else "wake-pingpong+memcpy"
        _run_kvxfer(eng, peer, region, remote, src, nbytes, 1, min(requests, 2000))  # warm-up
        runs: dict[int, list[dict]] = {d: [] for d in depths}
        base: list[dict] = []
        slot_base: list[dict] = []  # tcp: the ping-pong over kvxfer's slots
        for r in range(repeat):
            log(f"latency: run {r + 1}/{repeat}")
            pid = target.proc.pid
            if backend == "tcp":
                port = target.info["tcp_port"]
                base.append(_timed(pid, requests, _run_tcp_baseline, port, nbytes, requests))
                slot_base.append(_timed(pid, requests, _run_tcp_baseline, port, nbytes, requests, src))
            else:
                base.append(
                    _timed(pid, requests, _run_wake_baseline, target.info["wake"], src, nbytes, requests)
                )
            for d in depths:
                runs[d].append(
                    _timed(pid, requests, _run_kvxfer, eng, peer, region, remote, src, nbytes, d, requests)
                )
        # Byte-exact check: read every slot back.
        back = np.zeros_like(src)
        rback = eng.register(back)
        extent = [[0, back.size]]
        eng.post(kvxfer.Op.READ, peer, rback, remote, local_extents=extent, remote_extents=extent).wait()
        verified = bool(np.array_equal(back, src))
        mach = machine.info()

        def med(rows: list[dict], key: str) -> float:
            return statistics.median(row[key] for row in rows)

        for d in depths:
            rec = {
                "mode": "latency",
                "backend": backend,
                "bytes": nbytes,
                "queue_depth": d,
                "requests": requests,
                "repeat": repeat,
                "req_per_s": round(med(runs[d], "req_per_s")),
                "p50_us": round(med(runs[d], "p50_us"), 2),
                "p99_us": round(med(runs[d], "p99_us"), 2),
                "req_per_s_runs": [round(x["req_per_s"]) for x in runs[d]],
                "baseline": base_name,
                "baseline_req_per_s": round(med(base, "req_per_s")),
                "baseline_p50_us": round(med(base, "p50_us"), 2),
                "baseline_p99_us": round(med(base, "p99_us"), 2),
                "ratio_to_baseline": round(med(runs[d], "req_per_s") / med(base, "req_per_s"), 3),
                "cpu_us_per_req": round(med(runs[d], "cpu_us_per_req"), 2),
                "baseline_cpu_us_per_req": round(med(base, "cpu_us_per_req"), 2),
                "verified": verified,
                "machine": mach,
            }
            if slot_base:
                rec["slot_baseline"] = "socket-pingpong-slots"
                rec["slot_baseline_req_per_s"] = round(med(slot_base, "req_per_s"))
                rec["slot_baseline_p50_us"] = round(med(slot_base, "p50_us"), 2)
                slot_rate = med(slot_base, "req_per_s")
                rec["ratio_to_slot_baseline"] = round(med(runs[d], "req_per_s") / slot_rate, 3)
                rec["slot_baseline_cpu_us_per_req"] = round(med(slot_base, "cpu_us_per_req"), 2)
            emit(rec)
        return 0 if verified else 3
    finally:
        eng.close()
        target.close()


def table_row(rec: dict) -> str:
    return (
        f"{rec['backend']:<9} {rec['bytes']:>7} B  qd {rec['queue_depth']:>3}  "
        f"{rec['req_per_s']:>9,} req/s  p50 {rec['p50_us']:>8.2f} us  p99 {rec['p99_us']:>8.2f} us  | "
        f"{rec['baseline']} {rec['baseline_req_per_s']:>9,} req/s  p50 {rec['baseline_p50_us']:.2f} us  "
        f"x{rec['ratio_to_baseline']:.2f}{'' if rec['verified'] else '  VERIFY FAILED'}"
    )


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) == 3 and args[0] == "--target":
        return _target_main(args[1], int(args[2]))
    usage = "usage: python -m kvxfer_bench.latency --target BACKEND BYTES (kvxfer-bench starts it)"
    print(usage, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
