"""kvxfer-bench with GPU memory: ``--memory cuda:0 --target-memory cuda:1``.

Two processes (this one and a spawned target, each holding its KV on its own GPU) move a
paged KV transfer through the cuda_ipc backend, WRITE and READ, with the KV held as one
region or as one region per layer and K/V (vLLM's layout). Each case is verified byte for
byte (sha256 of the moved blocks on both sides) and measured against baselines run in
the same invocation, by this process, on the same two GPUs:

* ``peer-copy``: one contiguous copy of the same number of bytes GPU -> GPU (torch
  ``copy_``, i.e. cudaMemcpyPeerAsync on the copy engines): the link's practical limit;
* ``per-block``: one copy call per block and layer (what a per-block connector does).

``--gpu-pack`` adds pack/unpack (kvxfer.gpu.PackPlan) against a same-GPU device-to-device
copy of the same bytes. Figures are medians of ``--repeat`` runs; transfer times are wall
clock from post to completion at queue depth ``--queue-depth``; kernel-only figures
(pack/unpack, baselines) are CUDA-event times.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

import numpy as np

from .gpu_common import TargetProcess, choose_blocks, gpu_digest, paged_shape

GiB = 1 << 30


def parse_cuda(text: str) -> int:
    if not text.startswith("cuda"):
        raise ValueError(f"expected cuda:N, got {text!r}")
    _, _, n = text.partition(":")
    return int(n or 0)


def gpu_machine() -> dict:
    out: dict[str, Any] = {"host": platform.node(), "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    except Exception as e:  # noqa: BLE001
        out["torch"] = f"unavailable: {e}"
    for key, cmd in {
        "nvidia_smi": [
            "nvidia-smi",
            "--query-gpu=name,driver_version,memory.total,pci.bus_id",
            "--format=csv,noheader",
        ],
        "topology": ["nvidia-smi", "topo", "-m"],
    }.items():
        try:
            out[key] = subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
        except Exception as e:  # noqa: BLE001
            out[key] = f"unavailable: {e}"
    try:
        with open("/proc/cpuinfo") as f:
            out["cpu"] = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "?")
    except OSError:
        pass
    out["cores"] = os.cpu_count()
    out["env"] = {k: v for k, v in os.environ.items() if k.startswith("KVXFER_CUDA")}
    return out


def _target(conn, device: int) -> None:
    """The spawned target: allocates pools on its GPU, registers them, answers digests."""
    import torch

    import kvxfer
    import kvxfer.gpu

    torch.cuda.set_device(device)
    engine = kvxfer.Engine(f"kvxfer-bench-gpu-target-{os.getpid()}", backends=["cuda_ipc"], timeout=120.0)
    pools: list = []
    regions: list = []
    lay: dict = {}
    while True:
        try:
            cmd, args = conn.recv()
        except EOFError:
            return
        try:
            if cmd == "setup":
                for r in regions:
                    engine.deregister(r)
                pools, regions = [], []
                torch.cuda.empty_cache()
                lay = args["layout"]
                nbytes = lay["num_layers"] * lay["num_kv"] * lay["num_blocks"] * lay["block_bytes"]
                g = torch.Generator(device=f"cuda:{device}").manual_seed(args["seed"])
                pools = [
                    torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=f"cuda:{device}", generator=g)
                    for _ in range(args["pools"])
                ]
                layout = kvxfer.KvLayout(**lay)
                regions = [engine.register(p, layout) for p in pools]
                reply: Any = (engine.descriptor(), [r.id for r in regions])
            elif cmd == "digest":
                torch.cuda.synchronize(device)
                reply = gpu_digest(pools, lay, args["ids"])
            elif cmd == "poison":
                for p in pools:
                    p.fill_(args["value"])
                torch.cuda.synchronize(device)
                reply = None
            elif cmd == "exit":
                conn.send(("ok", None))
                engine.close()
                return
            else:
                raise ValueError(cmd)
            conn.send(("ok", reply))
        except Exception as e:  # noqa: BLE001
            conn.send(("error", f"{type(e).__name__}: {e}"))


class _Target(TargetProcess):
    """The cuda_ipc target (_target) on GPU `device`."""

    def __init__(self, device: int):
        super().__init__(_target, device)


def _median_rate(nbytes: int, seconds: list[float]) -> float:
    return nbytes / statistics.median(seconds) / 1e9


def _time_wall(fn, iters: int, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn(iters)
        out.append((time.perf_counter() - t0) / iters)
    return out


def _time_events(torch, fn, iters: int, repeat: int, device: int) -> list[float]:
    out = []
    for _ in range(repeat):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        s.record()
        for _ in range(iters):
            fn()
        e.record()
        e.synchronize()
        out.append(s.elapsed_time(e) / 1000 / iters)
    return out


def _poster(engine, op, peer, local, remote, req: dict):
    """post_n(n, qd): n transfers, at most qd in flight, all waited for."""

    def post_n(n: int, qd: int) -> None:
        inflight = []
        for _ in range(n):
            if len(inflight) >= qd:
                inflight.pop(0).wait(120)
            inflight.append(engine.post(op, peer, local, remote, **req))
        for t in inflight:
            t.wait(120)

    return post_n


def _verify(torch, target, pools, lay, ids_l, ids_r, op_name, post_n, device) -> bool:
    """Fresh data on the source, the destination poisoned, one transfer, both sides hash
    the moved blocks (sha256, stream order)."""
    if op_name == "write":
        for p in pools:
            p.random_(0, 256)
        torch.cuda.synchronize(device)
        target.call("poison", value=0xA5)
    else:
        for p in pools:
            p.fill_(0x5A)
        torch.cuda.synchronize(device)
    post_n(1, 1)
    torch.cuda.synchronize(device)
    return gpu_digest(pools, lay, ids_l) == target.call("digest", ids=list(np.asarray(ids_r).tolist()))


def run(opts: dict, emit) -> int:
    """Runs the GPU cases; ``emit(record)`` for each result. Returns an exit code."""
    import torch

    import kvxfer
    import kvxfer.gpu

    d0, d1 = opts["device"], opts["target_device"]
    layers, kv, pool_blocks, nblocks, bb = paged_shape(opts)
    repeat, qds = opts["repeat"], opts["queue_depths"]
    status = kvxfer.gpu.cuda_status()
    if status:
        raise RuntimeError(f"CUDA is not usable here: {status}")
    if max(d0, d1) >= torch.cuda.device_count():
        raise RuntimeError(f"cuda:{max(d0, d1)} does not exist (torch sees {torch.cuda.device_count()} GPUs)")
    emit({"type": "machine", **gpu_machine()})
    torch.cuda.set_device(d0)
    rng, ids_l, ids_r = choose_blocks(opts["seed"], pool_blocks, nblocks)
    moved = layers * kv * nblocks * bb
    dev0, dev1 = f"cuda:{d0}", f"cuda:{d1}"

    # --- baselines, this process, same bytes --------------------------------------------
    src = torch.empty(moved, dtype=torch.uint8, device=dev0).random_(0, 256)
    dst = torch.empty(moved, dtype=torch.uint8, device=dev1)
    iters = max(3, int(0.25 * 300e9 / moved))
    peer_w = _time_events(torch, lambda: dst.copy_(src), iters, repeat, d0)
    peer_r = _time_events(torch, lambda: src.copy_(dst), iters, repeat, d0)
    base = {"write": _median_rate(moved, peer_w), "read": _median_rate(moved, peer_r)}
    emit(
        {
            "type": "baseline",
            "what": "peer-copy",
            "direction": f"{dev0}->{dev1}",
            "bytes": moved,
            "gbps": base["write"],
            "runs_s": peer_w,
        }
    )
    emit(
        {
            "type": "baseline",
            "what": "peer-copy",
            "direction": f"{dev1}->{dev0}",
            "bytes": moved,
            "gbps": base["read"],
            "runs_s": peer_r,
        }
    )
    src = dst = None  # free before the transfer cases
    # One copy call per block and layer (a per-block connector), on a smaller pool.
    pb_pool_blocks = min(pool_blocks, 2 * nblocks)
    psrc = torch.empty(layers * kv * pb_pool_blocks * bb, dtype=torch.uint8, device=dev0)
    pdst = torch.empty_like(psrc, device=dev1)
    pv_s = psrc.view(layers * kv, pb_pool_blocks, bb)
    pv_d = pdst.view(layers * kv, pb_pool_blocks, bb)
    pid_l = rng.choice(pb_pool_blocks, nblocks, replace=False).tolist()
    pid_r = rng.choice(pb_pool_blocks, nblocks, replace=False).tolist()

    def per_block():
        for p in range(layers * kv):
            for a, b in zip(pid_l, pid_r, strict=True):
                pv_d[p, b].copy_(pv_s[p, a], non_blocking=True)

    pb = _time_events(torch, per_block, 1, max(1, min(repeat, 3)), d0)
    emit(
        {
            "type": "baseline",
            "what": "per-block",
            "direction": f"{dev0}->{dev1}",
            "bytes": moved,
            "copies": layers * kv * nblocks,
            "gbps": _median_rate(moved, pb),
            "runs_s": pb,
        }
    )
    psrc = pdst = pv_s = pv_d = None

    # --- kvxfer cuda_ipc, two processes --------------------------------------------------
    target = _Target(d1)
    engine = kvxfer.Engine(f"kvxfer-bench-gpu-{os.getpid()}", backends=["cuda_ipc"], timeout=120.0)
    rc = 0
    try:
        layouts = []
        if "one-region" in opts["gpu_layouts"]:
            layouts.append(
                (
                    "one-region",
                    {"num_layers": layers, "num_kv": kv, "num_blocks": pool_blocks, "block_bytes": bb},
                    1,
                )
            )
        if "per-layer" in opts["gpu_layouts"]:
            layouts.append(
                (
                    "per-layer",
                    {"num_layers": 1, "num_kv": 1, "num_blocks": pool_blocks, "block_bytes": bb},
                    layers * kv,
                )
            )
        for name, lay, npools in layouts:
            descriptor, rids = target.call("setup", layout=lay, pools=npools, seed=opts["seed"] + 1)
            nbytes = lay["num_layers"] * lay["num_kv"] * pool_blocks * bb
            g = torch.Generator(device=dev0).manual_seed(opts["seed"] + 2)
            pools = [
                torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=dev0, generator=g)
                for _ in range(npools)
            ]
            layout = kvxfer.KvLayout(**lay)
            group = engine.register_group(pools, layout)
            peer = engine.add_peer(descriptor)
            for op_name in opts["ops"]:
                op = kvxfer.Op.WRITE if op_name == "write" else kvxfer.Op.READ
                plan = engine.plan(op, peer, group, rids, local_blocks=ids_l, remote_blocks=ids_r)
                req = {"local_blocks": ids_l, "remote_blocks": ids_r}
                post_n = _poster(engine, op, peer, group, rids, req)
                post_n(3, 1)  # warm-up: maps the peer's memory, JIT of the kernel
                ok = _verify(torch, target, pools, lay, ids_l, ids_r, op_name, post_n, d0)
                for qd in qds:
                    kiters = max(5, int(0.3 * 350e9 / moved))
                    runs = _time_wall(lambda n, qd=qd, f=post_n: f(n, qd), kiters, repeat)
                    gbps = _median_rate(moved, runs)
                    emit(
                        {
                            "type": "result",
                            "workload": f"paged-random:{name}",
                            "backend": "cuda_ipc",
                            "op": op_name,
                            "from": dev0 if op_name == "write" else dev1,
                            "to": dev1 if op_name == "write" else dev0,
                            "regions": npools,
                            "bytes": moved,
                            "pieces": int(plan["pieces"]),
                            "runs": int(plan["runs"]),
                            "queue_depth": qd,
                            "iters": kiters,
                            "gbps": gbps,
                            "runs_s": runs,
                            "peer_copy_gbps": base[op_name],
                            "ratio_vs_peer_copy": gbps / base[op_name],
                            "verified": ok,
                        }
                    )
                if not ok:
                    rc = 3
            for r in group:
                engine.deregister(r)
            del pools, group
            torch.cuda.empty_cache()
        # Contiguous: the same bytes as one extent.
        if opts["contiguous"]:
            lay = {"num_layers": 1, "num_kv": 1, "num_blocks": 1, "block_bytes": moved}
            descriptor, rids = target.call("setup", layout=lay, pools=1, seed=3)
            local = torch.empty(moved, dtype=torch.uint8, device=dev0).random_(0, 256)
            region = engine.register(local, kvxfer.KvLayout(**lay))
            peer = engine.add_peer(descriptor)
            for op_name in opts["ops"]:
                op = kvxfer.Op.WRITE if op_name == "write" else kvxfer.Op.READ
                post_c = _poster(
                    engine, op, peer, region, rids[0], {"local_blocks": [0], "remote_blocks": [0]}
                )
                post_c(3, 1)
                ok = _verify(torch, target, [local], lay, [0], [0], op_name, post_c, d0)
                for qd in qds:
                    kiters = max(5, int(0.3 * 350e9 / moved))
                    runs = _time_wall(lambda n, qd=qd, f=post_c: f(n, qd), kiters, repeat)
                    gbps = _median_rate(moved, runs)
                    emit(
                        {
                            "type": "result",
                            "workload": "contiguous",
                            "backend": "cuda_ipc",
                            "op": op_name,
                            "from": dev0 if op_name == "write" else dev1,
                            "to": dev1 if op_name == "write" else dev0,
                            "regions": 1,
                            "bytes": moved,
                            "pieces": 1,
                            "runs": 1,
                            "queue_depth": qd,
                            "iters": kiters,
                            "gbps": gbps,
                            "runs_s": runs,
                            "peer_copy_gbps": base[op_name],
                            "ratio_vs_peer_copy": gbps / base[op_name],
                            "verified": ok,
                        }
                    )
                if not ok:
                    rc = 3
            engine.deregister(region)
            del local
    finally:
        engine.close()
        target.close()

    # --- pack / unpack on one GPU ----------------------------------------------------------
    if opts["pack"]:
        lay = kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=pool_blocks, block_bytes=bb)
        pool = torch.empty(layers * kv * pool_blocks * bb, dtype=torch.uint8, device=dev0).random_(0, 256)
        plan = kvxfer.gpu.PackPlan(lay, ids_l, device=d0)
        packed = torch.empty(plan.nbytes, dtype=torch.uint8, device=dev0)
        other = torch.empty_like(packed)
        iters = max(5, int(0.25 * 1500e9 / moved))
        d2d = _time_events(torch, lambda: other.copy_(packed), iters, repeat, d0)
        d2d_gbps = _median_rate(moved, d2d)
        emit(
            {
                "type": "baseline",
                "what": "d2d-copy",
                "direction": f"{dev0}->{dev0}",
                "bytes": moved,
                "gbps": d2d_gbps,
                "runs_s": d2d,
            }
        )
        stream = torch.cuda.current_stream(d0)
        pk = _time_events(torch, lambda: plan.pack(pool, packed, stream=stream), iters, repeat, d0)
        ref = pool.view(layers, kv, pool_blocks, bb)[:, :, torch.as_tensor(ids_l, device=dev0)].reshape(-1)
        ok_p = bool(torch.equal(packed, ref))
        pool2 = torch.zeros_like(pool)
        up = _time_events(torch, lambda: plan.unpack(packed, pool2, stream=stream), iters, repeat, d0)
        v2 = pool2.view(layers, kv, pool_blocks, bb)[:, :, torch.as_tensor(ids_l, device=dev0)].reshape(-1)
        ok_u = bool(torch.equal(v2, ref))
        for what, t, ok in (("pack", pk, ok_p), ("unpack", up, ok_u)):
            g = _median_rate(moved, t)
            emit(
                {
                    "type": "result",
                    "workload": f"{what}:paged-random",
                    "backend": "kernel",
                    "op": what,
                    "from": dev0,
                    "to": dev0,
                    "bytes": moved,
                    "runs": plan.num_runs,
                    "gbps": g,
                    "runs_s": t,
                    "d2d_gbps": d2d_gbps,
                    "ratio_vs_d2d": g / d2d_gbps,
                    "verified": ok,
                }
            )
            if not ok:
                rc = 3
    return rc


def table_line(rec: dict) -> str:
    if rec["type"] == "machine":
        head = f"machine: {rec.get('host')} gpus={rec.get('gpus')} torch={rec.get('torch')}"
        return f"{head}\n{rec.get('nvidia_smi')}"
    if rec["type"] == "baseline":
        extra = f" ({rec['copies']} copies)" if "copies" in rec else ""
        return (
            f"baseline {rec['what']:<10} {rec['direction']:<16} {rec['bytes'] / GiB:6.2f} GiB "
            f"{rec['gbps']:8.1f} GB/s{extra}"
        )
    vs = next(k for k in ("peer-copy", "d2d", "tcp-host") if f"ratio_vs_{k.replace('-', '_')}" in rec)
    ratio = rec[f"ratio_vs_{vs.replace('-', '_')}"]
    return (
        f"{rec['workload']:<26} {rec['op']:<6} {rec['from']}->{rec['to']} {rec['bytes'] / GiB:5.2f} GiB "
        f"runs={rec.get('runs', '-'):<6} {rec['gbps']:8.1f} GB/s  {ratio * 100:5.1f}% of {vs}  "
        f"verified={'yes' if rec['verified'] else 'NO'}"
    )


def main_from_args(a, json_out: bool) -> int:
    opts = {
        "device": parse_cuda(a.memory),
        "target_device": parse_cuda(a.target_memory or a.memory),
        "layers": a.layers or 32,
        "kv": a.kv or 2,
        "pool_blocks": a.pool_blocks,
        "blocks": int(a.blocks.split(",")[0]),
        "block_bytes": _size(a.block_bytes) if a.block_bytes else 32768,
        "repeat": max(a.repeat, 1),
        "queue_depths": [int(x) for x in a.gpu_queue_depths.split(",")],
        "seed": a.seed,
        "ops": ["write", "read"] if a.op == "both" else [a.op],
        "gpu_layouts": a.gpu_layouts.split(","),
        "contiguous": not a.no_contiguous,
        "pack": a.gpu_pack,
    }

    def emit(rec: dict) -> None:
        print(table_line(rec), file=sys.stderr if json_out else sys.stdout, flush=True)
        if json_out:
            print(json.dumps(rec), flush=True)

    if a.backend == "tcp":
        import kvxfer.gpu

        from . import gpu_staged

        if kvxfer.gpu.cuda_status():
            raise RuntimeError(f"CUDA is not usable here: {kvxfer.gpu.cuda_status()}")
        emit({"type": "machine", **gpu_machine()})
        return gpu_staged.run(opts, emit)
    return run(opts, emit)


def _size(text: str) -> int:
    from .units import parse_size

    return parse_size(text)
