"""Kernel-only sweep of kvxfer's copy kernel on the paged shape, GPU0 <-> GPU1 in one
process: which launch shape (loads in flight per thread, threads per CTA, CTAs per SM)
moves the paged KV fastest through peer access, pushing (kernel on the source GPU) and
pulling (kernel on the destination GPU), against the contiguous peer copy of the same
bytes. CUDA-event times, medians of 5. Each configuration runs in its own process (the
launch shape is read once per process from KVXFER_CUDA_COPY_*).

    python -m kvxfer_bench.gpu_sweep [--quick]
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

CONFIGS = [
    {"KVXFER_CUDA_COPY_UNROLL": u, "KVXFER_CUDA_COPY_THREADS": t, "KVXFER_CUDA_COPY_CTAS_PER_SM": c}
    for (u, t, c) in [
        ("4", "512", "4"),
        ("2", "512", "4"),
        ("8", "512", "4"),
        ("4", "256", "8"),
        ("8", "256", "8"),
        ("4", "1024", "2"),
        ("8", "1024", "2"),
        ("4", "512", "2"),
        ("8", "512", "2"),
        ("4", "512", "8"),
    ]
]


def child() -> int:
    import numpy as np
    import torch

    import kvxfer
    import kvxfer.gpu

    layers, kv, pool, nb, bb = 32, 2, 2048, 512, 32768
    rng = np.random.default_rng(1)
    ids_a = rng.choice(pool, nb, replace=False)
    ids_b = rng.choice(pool, nb, replace=False)
    lay = kvxfer.KvLayout(num_layers=layers, num_kv=kv, num_blocks=pool, block_bytes=bb)
    ra = kvxfer.gpu.block_runs(lay, ids_a)
    rb = kvxfer.gpu.block_runs(lay, ids_b)
    runs = np.stack([ra[:, 0], rb[:, 0], ra[:, 2]], axis=1)  # pool A offset -> pool B offset
    nbytes = layers * kv * pool * bb
    a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0").random_(0, 256)
    b = torch.zeros(nbytes, dtype=torch.uint8, device="cuda:1")
    moved = int(runs[:, 2].sum())
    c0 = torch.empty(moved, dtype=torch.uint8, device="cuda:0")
    c1 = torch.empty(moved, dtype=torch.uint8, device="cuda:1")
    c1.copy_(c0)
    c0.copy_(c1)  # peer access enabled both ways by torch
    torch.cuda.synchronize()

    def timed(device: int, fn, iters: int = 40) -> float:
        out = []
        with torch.cuda.device(device):
            for _ in range(5):
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize(device)
                s.record()
                for _ in range(iters):
                    fn()
                e.record()
                e.synchronize()
                out.append(s.elapsed_time(e) / 1000 / iters)
        return moved / statistics.median(out) / 1e9

    push = kvxfer._native.GpuCopyPlan(0, runs)
    pull = kvxfer._native.GpuCopyPlan(1, runs)
    s0 = torch.cuda.current_stream(0).cuda_stream
    s1 = torch.cuda.current_stream(1).cuda_stream
    rec = {k: os.environ.get(k) for k in CONFIGS[0]}
    rec["peer_copy_gbps"] = timed(0, lambda: c1.copy_(c0))
    rec["push_gbps"] = timed(0, lambda: push.launch(a.data_ptr(), nbytes, b.data_ptr(), nbytes, False, s0))
    rec["pull_gbps"] = timed(1, lambda: pull.launch(a.data_ptr(), nbytes, b.data_ptr(), nbytes, False, s1))
    torch.cuda.synchronize()
    ok = torch.equal(
        a.view(layers, kv, pool, bb)[:, :, torch.as_tensor(ids_a, device="cuda:0")].cpu(),
        b.view(layers, kv, pool, bb)[:, :, torch.as_tensor(ids_b, device="cuda:1")].cpu(),
    )
    rec["verified"] = bool(ok)
    print(json.dumps(rec), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--child" in argv:
        return child()
    configs = CONFIGS[:3] if "--quick" in argv else CONFIGS
    for cfg in configs:
        env = dict(os.environ, **cfg)
        p = subprocess.run(
            [sys.executable, "-m", "kvxfer_bench.gpu_sweep", "--child"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        line = (
            p.stdout.strip().splitlines()[-1]
            if p.stdout.strip()
            else json.dumps({**cfg, "error": p.stderr.strip()[-500:]})
        )
        print(line, flush=True)
        r = json.loads(line)
        if "error" not in r:
            print(
                f"unroll={r['KVXFER_CUDA_COPY_UNROLL']} threads={r['KVXFER_CUDA_COPY_THREADS']} "
                f"ctas/sm={r['KVXFER_CUDA_COPY_CTAS_PER_SM']}: "
                f"push {r['push_gbps']:.1f} pull {r['pull_gbps']:.1f} "
                f"GB/s (peer copy {r['peer_copy_gbps']:.1f}) verified={r['verified']}",
                file=sys.stderr,
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
