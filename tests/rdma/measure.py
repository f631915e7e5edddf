#!/usr/bin/env python3
"""kvxfer ibverbs WRITE bandwidth next to perftest's ib_write_bw, as ratios. Prints JSON lines.

Run it where an RDMA device exists, e.g. inside the soft-RoCE VM from the repository root:

    tools/softroce/softroce-vm env PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 \\
        $(python3 -c 'import sys;print(sys.executable)') tests/rdma/measure.py

For each message size (64 KiB, 1 MiB, 32 KiB) it runs bench/baselines/ib_write_bw.sh (two
perftest processes, about 128 MiB of RDMA WRITEs of that size with perftest's default 128
outstanding) and then kvxfer moving the same bytes: transfers of one contiguous extent of
that size, 16 transfers in flight, to a target engine in another process. Then a paged
transfer: 32 KiB blocks of a KV layout, 64 random source blocks to 64 random destination
blocks per transfer (64 separate runs), 4 transfers in flight, against ib_write_bw at 32 KiB.

Units: MiB/s (2^20 bytes per second) everywhere; perftest's "MB/sec" is MiB/s (see the
baseline script). Under TCG (no KVM) absolute figures mean little; the ratios are the point.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
try:
    import kvxfer  # noqa: F401
except ImportError:
    sys.path.insert(0, ROOT)
import numpy as np  # noqa: E402
import rdma_helpers as h  # noqa: E402

import kvxfer  # noqa: E402

TOTAL = 128 << 20
BLOCK = 32 << 10
NBLOCKS = 1024  # 32 MiB target region


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def iters_for(size: int) -> int:
    return max(100, min(5000, TOTAL // size))  # the baseline script's default


def ib_write_bw(size: int) -> float | None:
    script = os.path.join(ROOT, "bench", "baselines", "ib_write_bw.sh")
    if not os.path.exists(script):
        emit(what="ib_write_bw", size=size, error=f"{script} missing")
        return None
    t0 = time.monotonic()
    p = subprocess.run(["bash", script, str(size)], capture_output=True, text=True, timeout=900)
    line = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
    if p.returncode != 0 or "bw_MBps" not in fields:
        emit(what="ib_write_bw", size=size, error=(p.stderr or p.stdout)[-2000:])
        return None
    bw = float(fields["bw_MBps"])
    emit(
        what="ib_write_bw",
        size=size,
        iters=int(fields["iters"]),
        MiBps=bw,
        wall_s=round(time.monotonic() - t0, 2),
    )
    return bw


def run_window(post, count: int, window: int) -> tuple[float, float]:
    """Posts `count` transfers keeping `window` in flight. Returns (seconds in all, seconds
    spent inside post() calls: the caller-side cost per transfer, Python included)."""
    inflight = []
    in_post = 0.0
    t0 = time.perf_counter()
    for i in range(count):
        if len(inflight) >= window:
            inflight.pop(0).wait(h.TIMEOUT)
        p0 = time.perf_counter()
        inflight.append(post(i))
        in_post += time.perf_counter() - p0
    for t in inflight:
        t.wait(h.TIMEOUT)
    return time.perf_counter() - t0, in_post


def main() -> int:
    if not h.rdma_devices():
        emit(error="no RDMA device")
        return 1
    emit(what="setup", device=h.rdma_devices()[0], python=sys.version.split()[0], kvxfer=kvxfer.__file__)
    baseline = {size: ib_write_bw(size) for size in (64 << 10, 1 << 20, 32 << 10)}

    lay_args = (1, 1, NBLOCKS, BLOCK)
    target = h.Target("bench-target", lay_args)
    try:
        eng = h.make_engine("bench-init")
        emit(what="kvxfer_backend", describe=eng.describe_backends())
        lay = h.layout(*lay_args)
        src = h.random_bytes(h.layout_bytes(lay), 60)
        region = eng.register(src, layout=lay)
        peer = eng.add_peer(target.descriptor)
        eng.write(peer, region, target.region_id, np.arange(NBLOCKS)).wait(h.TIMEOUT)  # warm-up

        for size in (64 << 10, 1 << 20, 32 << 10):
            count = iters_for(size)
            slots = h.layout_bytes(lay) // size
            ext = [np.array([[(i % slots) * size, size]], dtype=np.uint64) for i in range(slots)]

            def post(i, ext=ext, slots=slots):
                e = ext[i % slots]
                return eng.post(
                    kvxfer.Op.WRITE, peer, region, target.region_id, local_extents=e, remote_extents=e
                )

            secs, in_post = run_window(post, count, 16)
            bw = count * size / secs / (1 << 20)
            base = baseline.get(size)
            emit(
                what="kvxfer_write_contiguous",
                size=size,
                transfers=count,
                window=16,
                MiBps=round(bw, 1),
                us_per_transfer=round(secs / count * 1e6, 1),
                us_in_post_call=round(in_post / count * 1e6, 1),
                ib_write_bw_MiBps=base,
                ratio=round(bw / base, 3) if base else None,
            )

        # Batched: each transfer carries k separate messages of `size` (remote order reversed,
        # so nothing coalesces: k work requests of exactly `size`), 4 transfers in flight.
        # This is how kvxfer is used (many runs per post) and what perftest does (many
        # messages outstanding), without one Python post() per message.
        for size in (64 << 10, 1 << 20, 32 << 10):
            k = min(64, h.layout_bytes(lay) // size)
            idx = np.arange(k, dtype=np.uint64)
            local_e = np.stack([idx * size, np.full(k, size, np.uint64)], axis=1)
            remote_e = np.stack([(k - 1 - idx) * size, np.full(k, size, np.uint64)], axis=1)
            count = max(4, TOTAL // (k * size))
            assert (
                eng.plan(
                    kvxfer.Op.WRITE,
                    peer,
                    region,
                    target.region_id,
                    local_extents=local_e,
                    remote_extents=remote_e,
                )["runs"]
                == k
            )

            def post_batched(i, le=local_e, re=remote_e):
                return eng.post(
                    kvxfer.Op.WRITE, peer, region, target.region_id, local_extents=le, remote_extents=re
                )

            secs, in_post = run_window(post_batched, count, 4)
            bw = count * k * size / secs / (1 << 20)
            base = baseline.get(size)
            emit(
                what="kvxfer_write_contiguous_batched",
                size=size,
                messages_per_transfer=k,
                transfers=count,
                window=4,
                MiBps=round(bw, 1),
                ib_write_bw_MiBps=base,
                ratio=round(bw / base, 3) if base else None,
            )

        # Paged: 64 random 32 KiB blocks to 64 random blocks, each transfer 2 MiB in 64 runs.
        rng = np.random.default_rng(61)
        per = 64
        count = TOTAL // (per * BLOCK)
        maps = [(rng.permutation(NBLOCKS)[:per], rng.permutation(NBLOCKS)[:per]) for _ in range(count)]
        runs = eng.plan(
            kvxfer.Op.WRITE, peer, region, target.region_id, local_blocks=maps[0][0], remote_blocks=maps[0][1]
        )["runs"]

        def post_paged(i):
            s, d = maps[i]
            return eng.write(peer, region, target.region_id, s, remote_blocks=d)

        secs, in_post = run_window(post_paged, count, 4)
        bw = count * per * BLOCK / secs / (1 << 20)
        base = baseline.get(32 << 10)
        emit(
            what="kvxfer_write_paged_random_blocks",
            block_bytes=BLOCK,
            blocks_per_transfer=per,
            runs_per_transfer=runs,
            transfers=count,
            window=4,
            MiBps=round(bw, 1),
            us_per_transfer=round(secs / count * 1e6, 1),
            us_in_post_call=round(in_post / count * 1e6, 1),
            ib_write_bw_32KiB_MiBps=base,
            ratio=round(bw / base, 3) if base else None,
        )
        # Correctness of the last map, so a fast but wrong path cannot pass unnoticed.
        remote = target.dump()
        s, d = maps[-1]
        h.assert_blocks_equal(lay, src, s, remote, d)
        emit(what="verify", ok=True)
        eng.close()
    finally:
        target.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())
