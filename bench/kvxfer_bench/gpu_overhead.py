"""Where one cuda_ipc transfer's time goes at queue depth 1 (issue 10's paged shape).

``PYTHONPATH=bench python -m kvxfer_bench.gpu_overhead [--n 40] [--device 0 --target-device 1]``

Two processes as in kvxfer-bench (this one and a spawned target holding the remote KV on
its GPU). For each layout (one region; one region per layer and K/V) and op, ``--n``
transfers one at a time, each split by the transfer's own telemetry into:

* ``py_post_us``: the Python ``post()`` call (argument handling + the native post);
* ``post_cpu_us``: the core's part of it (validation, planning, submission);
* ``pre_core_us``: ``py_post_us - post_cpu_us``, mostly Python and the binding turning
  the arguments (one tuple per region) into a request before the core starts;
* ``data_ms``: the core's post to data done (the progress thread saw the copy's event);
* ``notify_us``: data done to terminal (notification to the peer, finish);
* ``wake_us``: terminal to ``wait()`` returning in Python (``wall - pre_core - total``);
* ``wall_ms``: post to ``wait()`` returning: what kvxfer-bench times at depth 1;

and ``gpu_ms``, the time per transfer with two in flight (the copy kernels back to back),
which is the floor a transfer's wall time could reach. Every figure is a median. JSON
lines on stdout, a table on stderr. Not a pass/fail benchmark: it says where to look.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import numpy as np
    import torch

    import kvxfer

    from .gpu import _Target, gpu_machine

    p = argparse.ArgumentParser(prog="kvxfer_bench.gpu_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=40, help="transfers per case (after 3 warm-ups)")
    p.add_argument("--device", type=int, default=0)
    p.add_argument("--target-device", type=int, default=1)
    p.add_argument("--layouts", default="one-region,per-layer")
    a = p.parse_args(argv)
    layers, kv, pool_blocks, nblocks, bb = 32, 2, 2048, 512, 32768
    rng = np.random.default_rng(0)
    ids_l = rng.choice(pool_blocks, nblocks, replace=False)
    ids_r = rng.choice(pool_blocks, nblocks, replace=False)
    moved = layers * kv * nblocks * bb
    torch.cuda.set_device(a.device)
    print(json.dumps({"type": "machine", **gpu_machine()}), flush=True)
    target = _Target(a.target_device)
    engine = kvxfer.Engine("gpu-overhead", backends=["cuda_ipc"], timeout=120.0)
    one = {"num_layers": layers, "num_kv": kv, "num_blocks": pool_blocks, "block_bytes": bb}
    shapes = {"one-region": (one, 1), "per-layer": ({**one, "num_layers": 1, "num_kv": 1}, layers * kv)}
    try:
        for name in a.layouts.split(","):
            lay, npools = shapes[name]
            descriptor, rids = target.call("setup", layout=lay, pools=npools, seed=1)
            nbytes = lay["num_layers"] * lay["num_kv"] * pool_blocks * bb
            pools = [torch.zeros(nbytes, dtype=torch.uint8, device=f"cuda:{a.device}") for _ in range(npools)]
            layout = kvxfer.KvLayout(**lay)
            if npools == 1:
                local, remote = engine.register(pools[0], layout), rids[0]
            else:
                local, remote = engine.register_group(pools, layout), rids
            peer = engine.add_peer(descriptor)
            for op in (kvxfer.Op.WRITE, kvxfer.Op.READ):
                req = {"local_blocks": ids_l, "remote_blocks": ids_r}
                for _ in range(3):
                    engine.post(op, peer, local, remote, **req).wait(60)
                rows = []
                for _ in range(a.n):
                    t0 = time.perf_counter()
                    t = engine.post(op, peer, local, remote, **req)
                    t1 = time.perf_counter()
                    t.wait(60)
                    t2 = time.perf_counter()
                    tel = t.telemetry
                    rows.append((t1 - t0, tel["post_cpu_us"], tel["data_s"], tel["total_s"], t2 - t0))
                # Two in flight: the kernels run back to back; time per transfer = GPU floor.
                gpu = []
                for _ in range(3):
                    inflight = []
                    t0 = time.perf_counter()
                    for _ in range(a.n):
                        if len(inflight) >= 2:
                            inflight.pop(0).wait(60)
                        inflight.append(engine.post(op, peer, local, remote, **req))
                    for t in inflight:
                        t.wait(60)
                    gpu.append((time.perf_counter() - t0) / a.n)

                def med(i: int, rows: list = rows) -> float:
                    return statistics.median(r[i] for r in rows)

                rec = {
                    "type": "overhead",
                    "layout": name,
                    "regions": npools,
                    "op": op.name.lower(),
                    "bytes": moved,
                    "n": a.n,
                    "py_post_us": med(0) * 1e6,
                    "post_cpu_us": med(1),
                    "data_ms": med(2) * 1e3,
                    "pre_core_us": statistics.median(r[0] * 1e6 - r[1] for r in rows),
                    "notify_us": statistics.median((r[3] - r[2]) for r in rows) * 1e6,
                    "wake_us": statistics.median((r[4] - (r[0] - r[1] / 1e6) - r[3]) for r in rows) * 1e6,
                    "wall_ms": med(4) * 1e3,
                    "gpu_ms": statistics.median(gpu) * 1e3,
                }
                rec["overhead_us"] = (rec["wall_ms"] - rec["gpu_ms"]) * 1e3
                rec["depth1_gbps"] = moved / (rec["wall_ms"] / 1e3) / 1e9
                rec["depth2_gbps"] = moved / (rec["gpu_ms"] / 1e3) / 1e9
                print(json.dumps(rec), flush=True)
                print(
                    f"{name:10} {rec['op']:5} post {rec['py_post_us']:6.1f} us"
                    f" (core {rec['post_cpu_us']:5.1f}) data {rec['data_ms']:.3f} ms"
                    f" notify {rec['notify_us']:5.1f} us wake {rec['wake_us']:5.1f} us"
                    f" wall {rec['wall_ms']:.3f} ms gpu {rec['gpu_ms']:.3f} ms -> overhead"
                    f" {rec['overhead_us']:.0f} us; {rec['depth1_gbps']:.1f} / {rec['depth2_gbps']:.1f} GB/s",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        target.close()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
