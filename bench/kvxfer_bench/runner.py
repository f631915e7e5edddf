"""The initiator: owns the local engine, drives the target and measures.

For each case (workload x op x coalescing): one or two warm-up rounds (the first faults
the pages in; the second sizes ``--iters auto``), then ``--repeat`` runs, each of
``iters`` rounds of posts with at most ``--queue-depth`` transfers in flight, alternating
with a run of the memcpy baseline over the same pieces. Figures are medians over runs.
Verification (outside the timed window) poisons the destination before every run and
compares per-group CRC-32s of the destination with the source's after it.
"""

from __future__ import annotations

import math
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import baselines, machine, proto, verify
from .engine_config import engine_config, local_host_towards
from .workloads import Case, Geometry, Selection


class BenchError(Exception):
    """A fatal, explained error (exit code 1)."""


@dataclass
class Options:
    backend: str = "shm"
    threads: int = 2
    device: str = ""
    queue_depth: int = 1
    iters: int = 0  # 0 = auto
    min_time: float = 0.25
    max_iters: int = 100000
    repeat: int = 3
    warmup: int = 1
    verify: bool = True
    verify_each: bool = False
    baseline: str = "auto"  # auto | memcpy | numpy | ib_write_bw | none
    baseline_buffer: str = "separate"  # separate | shared | auto
    memory: str = "auto"  # auto | numpy | kvxfer
    timeout: float = 120.0
    seed: int = 1
    target: str = ""  # HOST:PORT of a --listen target; "" = same host
    connect_timeout: float = 30.0
    corrupt_for_test: bool = False
    check_memory: bool = True


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(np.asarray(values), q))


class Bench:
    def __init__(self, opts: Options, log=None, progress=None):
        self.o = opts
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.progress = progress
        self.engine: Any = None
        self.peer: Any = None
        self.ch: proto.Channel | None = None
        self.proc: subprocess.Popen | None = None
        self.thread: threading.Thread | None = None
        self.mode = ""
        self.target_info: dict = {}
        self.local_machine = machine.info()
        self.memcpy: baselines.Memcpy | None = None
        self.ibbw: baselines.IbWriteBw | None = None
        self.baseline_note = ""
        self._corrupted = False
        self.memory = "numpy"
        self._case_no = 0
        self._trace = bool(os.environ.get("KVXFER_BENCH_TRACE"))
        self._t0 = time.perf_counter()

    def trace(self, what: str) -> None:
        """KVXFER_BENCH_TRACE=1: time stamps of the phases on stderr."""
        if self._trace:
            self.log(f"[{time.perf_counter() - self._t0:7.2f}s] {what}")

    # -- session ----------------------------------------------------------------------

    def open(self) -> None:
        import kvxfer

        o = self.o
        known = {b.name: b for b in kvxfer.list_backends()}
        if o.backend not in known:
            raise BenchError(
                f"backend '{o.backend}' is not in this build of kvxfer (known: {', '.join(known)})"
            )
        if not known[o.backend].available:
            raise BenchError(f"backend '{o.backend}' is unavailable here: {known[o.backend].reason}")
        self.engine = kvxfer.Engine(
            f"kvxfer-bench-{os.getpid()}",
            backends=[o.backend],
            config=engine_config(o.backend, o.device, self._local_host()),
            threads=o.threads,
            timeout=o.timeout,
        )
        if o.memory == "auto":
            self.memory = "kvxfer" if (o.backend == "shm" and hasattr(kvxfer, "empty")) else "numpy"
        elif o.memory == "kvxfer" and not hasattr(kvxfer, "empty"):
            raise BenchError("--memory kvxfer: this kvxfer has no kvxfer.empty()")
        else:
            self.memory = o.memory
        self._start_target()
        reply, blobs = self.ch.call(
            "setup",
            blobs=[self.engine.descriptor()],
            protocol=proto.PROTOCOL,
            backend=o.backend,
            threads=o.threads,
            device=o.device,
            timeout=o.timeout,
            name=f"kvxfer-bench-target-{os.getpid()}",
        )
        self.target_info = reply
        if reply.get("peer_warning"):
            self.log(f"warning: {reply['peer_warning']}")
        self._add_peer(blobs[0])
        self._setup_baseline()

    def _add_peer(self, blob: bytes) -> None:
        try:
            self.peer = self.engine.add_peer(blob)
        except Exception as e:  # noqa: BLE001
            hint = ""
            if self.o.backend == "shm" and self.mode == "remote":
                hint = (
                    " (shm needs both engines on one host and in one network namespace: its "
                    "notification socket is an abstract Unix socket, which is per network namespace)"
                )
            raise BenchError(f"cannot reach the target through {self.o.backend}: {e}{hint}") from e

    def _local_host(self) -> str:
        """Two-host mode: this host's address towards the target (tcp listens there)."""
        if not self.o.target:
            return ""
        host, port = proto.parse_hostport(self.o.target)
        return local_host_towards(host, port)

    def _start_target(self) -> None:
        o = self.o
        if o.target:
            self.mode = "remote"
            host, port = proto.parse_hostport(o.target)
            deadline = time.monotonic() + o.connect_timeout
            while True:
                try:
                    sock = socket.create_connection((host, port), timeout=5)
                    break
                except OSError as e:
                    if time.monotonic() > deadline:
                        raise BenchError(
                            f"cannot connect to the target at {o.target}: {e} "
                            "(is `kvxfer-bench --listen PORT` running there?)"
                        ) from e
                    time.sleep(0.2)
        elif self.engine.backend_caps()[o.backend]["same_process_only"]:
            # loopback, fault: engines of one process only, so the target runs in a thread.
            self.mode = "in-process"
            sock, theirs = socket.socketpair()
            from .target import TargetSession

            self.thread = threading.Thread(
                target=TargetSession(theirs).serve, name="kvxfer-bench-target", daemon=True
            )
            self.thread.start()
        else:
            self.mode = "spawned"
            srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            srv.bind(("127.0.0.1", 0))
            srv.listen(1)
            port = srv.getsockname()[1]
            from kvxfer.child_env import child_env

            # The child imports the kvxfer and kvxfer_bench this process imported.
            env = child_env()
            bench_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
            env["PYTHONPATH"] = bench_root + os.pathsep + env["PYTHONPATH"]
            cmd = [sys.executable, "-m", "kvxfer_bench.target", "--connect", f"127.0.0.1:{port}"]
            if o.device:
                cmd += ["--device", o.device]
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno())
            srv.settimeout(0.2)
            deadline = time.monotonic() + o.connect_timeout
            try:
                while True:
                    try:
                        sock, _ = srv.accept()
                        break
                    except TimeoutError:
                        if self.proc.poll() is not None:
                            raise BenchError(
                                f"the target process exited with status {self.proc.returncode} "
                                "before connecting"
                            ) from None
                        if time.monotonic() > deadline:
                            raise BenchError("the target process did not connect in time") from None
            finally:
                srv.close()
        sock.settimeout(None)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.ch = proto.Channel(sock)

    def _setup_baseline(self) -> None:
        b = self.o.baseline
        if b == "auto":
            b = "ib_write_bw" if self.o.backend == "ibverbs" else "memcpy"
        if b == "ib_write_bw":
            script = baselines.find_ib_write_bw_script()
            if script is None:
                self.baseline_note = "ib_write_bw baseline: bench/baselines/ib_write_bw.sh not found"
                self.log(f"warning: {self.baseline_note}; no baseline")
                return
            self.ibbw = baselines.IbWriteBw(script, self.o.device)
            self.baseline_note = f"perftest ib_write_bw via {script} (message size = mean run length)"
        elif b in ("memcpy", "numpy", "c"):
            self.memcpy = baselines.Memcpy(self.o.threads, prefer={"memcpy": "auto"}.get(b, b))
            self.baseline_note = self.memcpy.describe()
        elif b != "none":
            raise BenchError(f"unknown baseline {b!r}")

    def close(self) -> None:
        if self.ch is not None:
            try:
                self.ch.call("bye")
            except Exception:  # noqa: BLE001
                pass
            self.ch.close()
        if self.engine is not None:
            try:
                self.engine.close()
            except Exception:  # noqa: BLE001
                pass
        if self.proc is not None:
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.thread is not None:
            self.thread.join(timeout=20)
        if self.memcpy is not None:
            self.memcpy.close()

    def describe(self) -> str:
        return self.engine.describe_backends()

    # -- regions ----------------------------------------------------------------------

    def _memory_check(self, g: Geometry, shared: bool) -> None:
        if not self.o.check_memory:
            return
        parts = ["local region"]
        if self.mode in ("spawned", "in-process"):
            parts.append("target region")
        if self.memcpy is not None and not shared:
            parts.append("memcpy baseline destination")
        need = g.nbytes * len(parts)
        avail = machine.mem_available()
        if avail and need > avail * 0.9:
            raise BenchError(
                f"this workload needs {need / 2**30:.1f} GiB ({', '.join(parts)}: "
                f"{g.nbytes / 2**30:.2f} GiB each) but only {avail / 2**30:.1f} GiB is available; "
                "use a smaller --pool-blocks, --baseline none, "
                "or --no-memory-check"
            )

    def run(self, cases: list[Case], on_result) -> None:
        """Runs every case, calling ``on_result(record)`` as each finishes."""
        by_geom: dict[str, list[Case]] = {}
        for c in cases:
            by_geom.setdefault(c.selection.geometry.key, []).append(c)
        for key, group in by_geom.items():
            g = group[0].selection.geometry
            import kvxfer

            shared = False
            if self.memcpy is not None and self.o.baseline_buffer != "separate":
                rng = np.random.default_rng([self.o.seed, 4242])
                shared = all(c.selection.standin(rng, c.meta.get("pattern")) for c in group)
                if not shared and self.o.baseline_buffer == "shared":
                    raise BenchError(
                        f"--baseline-buffer shared: the baseline's destination pieces do not fit beside the "
                        f"source pieces in {key} (more than half of the pool moved?)"
                    )
            self._memory_check(g, shared)
            # The target allocates and pre-faults its region while this process does its own.
            self.ch.start("region", key=key, nbytes=g.nbytes, layout=g.layout, memory=self.memory)
            bufs: list = [None, None]

            def alloc(i: int, nbytes: int, out: list) -> None:
                out[i] = verify.allocate(nbytes, self.memory)

            faulting = [threading.Thread(target=alloc, args=(0, g.nbytes, bufs))]
            if self.memcpy and not shared:
                faulting.append(threading.Thread(target=alloc, args=(1, g.nbytes, bufs)))
            for t in faulting:
                t.start()
            for t in faulting:
                t.join()
            local, base_buf = bufs
            if local is None or (len(faulting) > 1 and base_buf is None):
                raise BenchError(f"could not allocate {g.nbytes} bytes of {self.memory} memory")
            region = self.engine.register(local, layout=kvxfer.KvLayout(**g.layout) if g.layout else None)
            reply, blobs = self.ch.finish("region")
            self._add_peer(blobs[0])
            remote_id = reply["region_id"]
            self.trace(f"regions of {key} ready" + (" (baseline inside the local buffer)" if shared else ""))
            ctx = _GeomCtx(g, local, region, remote_id, local if shared else base_buf)
            ctx.shared = shared
            failed = True
            try:
                for c in group:
                    on_result(self._run_case(ctx, c))
                failed = False
            finally:
                try:
                    self.engine.deregister(region)
                    _, blobs = self.ch.call("free", key=key)
                    self._add_peer(blobs[0])
                except Exception:
                    if not failed:  # else the first error is the one to report
                        raise
                del ctx, local, base_buf

    # -- one case ---------------------------------------------------------------------

    def _select(self, ctx: _GeomCtx, sel: Selection) -> None:
        if sel.sid in ctx.selected:
            return
        if sel.kind == "blocks":
            self.ch.call(
                "select",
                blobs=[proto.array_blob(sel.remote_ids)],
                sel=sel.sid,
                key=sel.geometry.key,
                kind="blocks",
            )
        else:
            self.ch.call(
                "select",
                blobs=[proto.array_blob(sel.extents)],
                sel=sel.sid,
                key=sel.geometry.key,
                kind="extents",
            )
        ctx.selected[sel.sid] = (sel.pieces("local"), sel.pieces("remote"))

    def _run_case(self, ctx: _GeomCtx, case: Case) -> dict:
        import kvxfer

        o = self.o
        sel = case.selection
        self._select(ctx, sel)
        local_p, remote_p = ctx.selected[sel.sid]
        write = case.op == "write"
        op = kvxfer.Op.WRITE if write else kvxfer.Op.READ
        requests = case.requests()
        post = self.engine.post
        peer, region, rid, timeout = self.peer, ctx.region, ctx.remote_id, o.timeout

        # What the engine will do: summed over the round's requests.
        plans = [self.engine.plan(op, peer, region, rid, **r) for r in requests]
        round_bytes = sum(int(p["bytes"]) for p in plans)
        pieces = sum(int(p["pieces"]) for p in plans)
        runs = sum(int(p["runs"]) for p in plans)
        if round_bytes != local_p.nbytes:
            raise BenchError(
                f"{case.workload}: the engine plans {round_bytes} bytes, the workload has {local_p.nbytes}"
            )

        # Baseline copy lists: the same pieces per request, coalesced like the transfer.
        copylists = []
        if self.memcpy is not None:
            for layers in case.request_layers():
                lp = sel.pieces("local", layers) if layers else local_p
                if ctx.shared:  # the remote pieces' stand-ins, beside the local ones
                    rp = sel.standin_pieces(layers)
                else:
                    rp = sel.pieces("remote", layers) if layers else remote_p
                sp, dp = (lp, rp) if write else (rp, lp)
                if case.coalesce:
                    so, do, ln = verify.merge_runs(sp, dp)
                else:
                    so, do, ln = sp.offsets, dp.offsets, sp.lengths
                copylists.append(baselines.CopyList(so, do, ln))
        base_src, base_dst = (ctx.local, ctx.base) if write else (ctx.base, ctx.local)

        def run_transfers(iters: int, notify_tag: bytes = b"", between=None):
            """Posts iters rounds; returns (seconds, latencies, post wall, post cpu)."""
            lat: list[float] = []
            pw: list[float] = []
            pc: list[float] = []
            inflight: deque = deque()
            total = iters * len(requests)
            k = 0
            elapsed = 0.0
            qd = 1 if between else o.queue_depth
            perf, tt = time.perf_counter, time.thread_time
            start = perf()
            for it in range(iters):
                for r in requests:
                    if len(inflight) >= qd:
                        t0, t = inflight.popleft()
                        t.wait(timeout)
                        lat.append(perf() - t0)
                    k += 1
                    c0 = tt()
                    t0 = perf()
                    if notify_tag and k == total:
                        t = post(op, peer, region, rid, notify=notify_tag, timeout=timeout, **r)
                    else:
                        t = post(op, peer, region, rid, timeout=timeout, **r)
                    t1 = perf()
                    pc.append(tt() - c0)
                    pw.append(t1 - t0)
                    inflight.append((t0, t))
                if between:
                    while inflight:
                        t0, t = inflight.popleft()
                        t.wait(timeout)
                        lat.append(perf() - t0)
                    elapsed += perf() - start
                    between(it)
                    start = perf()
            while inflight:
                t0, t = inflight.popleft()
                t.wait(timeout)
                lat.append(perf() - t0)
            elapsed += perf() - start
            return elapsed, lat, pw, pc

        base_threads = o.threads

        def run_baseline(iters: int, threads: int | None = None):
            lat: list[float] = []
            perf = time.perf_counter
            nthreads = base_threads if threads is None else threads
            start = perf()
            for _ in range(iters):
                for cl in copylists:
                    t0 = perf()
                    self.memcpy.copy(base_dst, base_src, cl, nthreads)
                    lat.append(perf() - t0)
            return perf() - start, lat

        # Verification plumbing.
        src_crc: np.ndarray | None = None
        dst_pieces = remote_p if write else local_p
        src_pieces = local_p if write else remote_p

        self._case_no += 1
        seed = (o.seed * 1_000_003 + self._case_no) & 0x7FFFFFFF
        stride = (
            verify.stamp_stride_for(int(case.meta["block_bytes"])) if case.meta.get("block_bytes") else 256
        )

        def source_checksums() -> np.ndarray:
            """Fills the source pieces with this case's pattern; returns their checksums."""
            if write:
                verify.fill_pieces(ctx.local, local_p, seed, stride)
                return verify.checksums(ctx.local, local_p)
            _, b = self.ch.call("fill", sel=sel.sid, seed=seed, stamp_stride=stride)
            return proto.blob_array(b[0], np.uint32)

        def poison(value: int) -> None:
            if write:
                self.ch.call("poison", sel=sel.sid, value=value)
            else:
                verify.poison(ctx.local, local_p, value)

        def dest_checksums(tag: str | None) -> np.ndarray:
            if write:
                _, b = self.ch.call("checksum", sel=sel.sid, wait_notify=tag, timeout=timeout)
                return proto.blob_array(b[0], np.uint32)
            return verify.checksums(ctx.local, local_p)

        def corrupt() -> None:
            if write:
                self.ch.call("corrupt", sel=sel.sid)
            else:
                verify.corrupt(ctx.local, local_p)

        what = f"{case.workload} {case.op} coalesce={'on' if case.coalesce else 'off'}"

        def check(run: int, tag: str | None, label: str) -> None:
            if o.corrupt_for_test and not self._corrupted:
                self._corrupted = True
                corrupt()
            got = dest_checksums(tag)
            verify.compare(src_crc, got, dst_pieces, f"{what} {label}")

        self.trace(f"{what}: start")
        if o.verify:
            # A case writes its destination side, which may hold another case's source.
            for k in [k for k in ctx.src_cache if k[1] != case.op]:
                del ctx.src_cache[k]
            src_crc = ctx.src_cache.get((sel.sid, case.op))
            if src_crc is None:
                ctx.src_cache.clear()  # filling may overwrite other selections' sources
                src_crc = ctx.src_cache[(sel.sid, case.op)] = source_checksums()
            assert src_pieces.count == dst_pieces.count
            self.trace(f"{what}: source filled and checksummed")

        # Warm-up: faults pages in on both sides; the last round sizes iters.
        # Warm-up: faults the pages in on both sides. With --iters auto, the last warm-up
        # round sizes the runs; one more round is taken when it was short (page faults
        # weigh most on small rounds).
        round_s = 0.0
        for _ in range(max(1, o.warmup)):
            round_s, _, _, _ = run_transfers(1)
            if copylists:
                run_baseline(1)
        if not o.iters and round_s < 0.05:
            round_s, _, _, _ = run_transfers(1)
        if copylists and o.threads > 1:
            # The baseline is the faster of one thread and all of them (see baselines.py).
            reps = max(1, min(5, math.ceil(0.05 / max(round_s, 1e-7))))
            multi = min(run_baseline(reps, o.threads)[0] for _ in range(2))
            single = min(run_baseline(reps, 1)[0] for _ in range(2))
            base_threads = 1 if single < multi else o.threads
        iters = o.iters or max(3, min(o.max_iters, math.ceil(o.min_time / max(round_s, 1e-7))))
        self.trace(f"{what}: warmed up, {iters} iters")

        gbps: list[float] = []
        tps: list[float] = []
        lat_all: list[float] = []
        post_w: list[float] = []
        post_c: list[float] = []
        base_gbps: list[float] = []
        base_lat: list[float] = []
        base_verified = False
        for run in range(o.repeat):
            if self.progress:
                self.progress.step(
                    f"{case.workload} {case.op} {'on' if case.coalesce else 'off'} run {run + 1}/{o.repeat}"
                )
            between = None
            if o.verify and o.verify_each:

                def between(it: int, run=run) -> None:  # noqa: ANN001
                    check(run, None, f"run {run + 1} transfer round {it + 1}")
                    poison((0xA5 + run + it + 1) & 0xFF)

            if o.verify:
                poison((0xA5 + run) & 0xFF)
            # The run's last WRITE carries a notification; the target checksums only after it
            # arrived (the engine delivers it after every byte of that transfer is visible).
            tag = (
                f"kvxfer-bench:{sel.sid}:{case.op}:{run}".encode()
                if (o.verify and write and not between)
                else b""
            )
            secs, lat, pw, pc = run_transfers(iters, tag, between)
            if o.verify and not between:
                check(run, tag.decode() if tag else None, f"run {run + 1}")
            self.trace(f"{what}: run {run + 1} done ({secs:.2f}s timed), verified")
            gbps.append(round_bytes * iters / secs / 1e9)
            tps.append(len(requests) * iters / secs)
            lat_all += lat
            post_w += pw
            post_c += pc
            if copylists:
                bsecs, blat = run_baseline(iters)
                base_gbps.append(round_bytes * iters / bsecs / 1e9)
                base_lat += blat
                if ctx.shared:  # the baseline wrote into the local buffer
                    for k in [k for k in ctx.src_cache if k[0] != sel.sid]:
                        del ctx.src_cache[k]
                if o.verify and not base_verified:
                    # The baseline copies from the local source (WRITE: its checksums are
                    # src_crc) or from its own buffer into the local region (READ).
                    standin = sel.standin_pieces() if ctx.shared else remote_p
                    sp = local_p if write else standin
                    dp = standin if write else local_p
                    expect = src_crc if write else verify.checksums(base_src, sp)
                    verify.compare(expect, verify.checksums(base_dst, dp), dp, f"{what} memcpy baseline")
                    base_verified = True
                self.trace(f"{what}: baseline run {run + 1} done ({bsecs:.2f}s)")

        g_med = statistics.median(gbps)
        baseline_name = "none"
        b_med: float | None = None
        if copylists:
            baseline_name = self.memcpy.name
            b_med = statistics.median(base_gbps)
        elif self.ibbw is not None:
            baseline_name = self.ibbw.name(case.op)
            b_med = self.ibbw.gbps(round(round_bytes / max(1, runs)), case.op)
        secs_med = round_bytes * iters / (g_med * 1e9)
        rec = {
            "backend": self.o.backend,
            "workload": case.workload,
            "kind": case.kind,
            "op": case.op,
            "coalesce": case.coalesce,
            "per_layer": case.per_layer,
            "bytes": round_bytes,
            "transfer_bytes": round_bytes // len(requests),
            "pieces": pieces,
            "runs": runs,
            "transfers_per_round": len(requests),
            "iters": iters,
            "repeat": o.repeat,
            "queue_depth": o.queue_depth,
            "threads": o.threads,
            "gbps": g_med,
            "gbps_runs": gbps,
            "ops_per_s": pieces * iters / secs_med,
            "transfers_per_s": statistics.median(tps),
            "p50_us": _us(_pct(lat_all, 50)),
            "p99_us": _us(_pct(lat_all, 99)),
            "post_us": _us(_pct(post_w, 50)),
            "post_cpu_us": _us(_pct(post_c, 50)),
            "post_p99_us": _us(_pct(post_w, 99)),
            "baseline": baseline_name,
            "baseline_gbps": b_med,
            "baseline_gbps_runs": base_gbps,
            "baseline_p50_us": _us(_pct(base_lat, 50)),
            "baseline_threads": base_threads if copylists else None,
            "ratio": (g_med / b_med) if b_med else None,
            "verified": bool(o.verify),
            "verify_mode": ("each-round" if o.verify_each else "each-run") if o.verify else "off",
            "seed": o.seed,
            "mode": self.mode,
            "memory": self.memory,
            **{
                k: case.meta.get(k)
                for k in ("model", "pattern", "blocks", "pool_blocks", "block_bytes", "layers", "num_kv")
            },
            "machine": self.local_machine,
        }
        if self.mode == "remote":
            rec["target_machine"] = self.target_info.get("machine")
        return rec


def _us(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e6


class _GeomCtx:
    def __init__(self, g: Geometry, local: np.ndarray, region: Any, remote_id: int, base: np.ndarray | None):
        self.g = g
        self.local = local
        self.region = region
        self.remote_id = remote_id
        self.base = base
        self.shared = False
        self.selected: dict[str, tuple[verify.Pieces, verify.Pieces]] = {}
        # (selection, op) -> checksums of its source pieces, while they are untouched
        self.src_cache: dict[tuple[str, str], np.ndarray] = {}
