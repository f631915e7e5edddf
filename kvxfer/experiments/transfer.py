"""``kvxfer experiment transfer``: block-free vs paged-coalesced vs block-by-block KV transfer.

Two processes on this host: a "prefill" child holding (a) one layer-major contiguous KV
buffer and (b) a paged KV pool, and this process as the "decode", holding a paged pool into
which it pulls a prompt's KV with each of the three paths of :mod:`kvxfer.serve.kv_transfer`.
KV sizes are those of a real model geometry (default SmolLM2-135M: 30 layers, 3 KV heads,
64 dims, float32 as the CPU runtime keeps them). Block ids on both paged sides are random
(fragmented pools; ``--placement contiguous``: ascending runs, as from a fresh pool).
Every (tokens, block size, mode) is verified byte for byte once, then
timed ``--repeats`` times, modes interleaved; the median is reported.

JSON lines: ``{"experiment":"transfer","mode":..,"tokens":..,"block_tokens":..,"seconds":..}``
plus backend, machine, GB/s, transfers posted; then one ``"ratio"`` line per configuration
(block-free / block-by-block).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

MODES = ("block-free", "paged-coalesced", "block-by-block")
SALT_CONTIG = np.uint32(0x5A5A0000)
SALT_PAGED = np.uint32(0x0000A5A5)


def _fill(arr: np.ndarray, salt: np.uint32) -> None:
    """arr (uint8, size % 4 == 0) := uint32 pattern index ^ salt, in chunks."""
    w = arr.view(np.uint32)
    step = 1 << 22
    for s in range(0, w.size, step):
        e = min(w.size, s + step)
        w[s:e] = np.arange(s, e, dtype=np.uint32) ^ salt


def _prefill_side(conn, backend: str, geom_t: tuple, max_tokens: int) -> None:
    """Child process: serves its memory; answers block-by-block confirmations."""
    import kvxfer
    from kvxfer.serve import kv_transfer as kt
    from kvxfer.serve.kv_transfer import make_engine

    geom = kt.KvGeometry(*geom_t)
    eng = make_engine("xfer-prefill", backend, timeout=120.0)
    router = kt.NotificationRouter(eng)
    kt.answer_block_acks(router, eng)
    contig = kvxfer.empty(geom.contiguous_bytes(max_tokens))
    _fill(contig, SALT_CONTIG)
    rc = eng.register(contig)
    paged = None
    conn.send(("ready", eng.descriptor(), rc.id))
    while True:
        try:
            msg = conn.recv()
        except EOFError:  # the parent is gone
            break
        if msg[0] == "peer":
            eng.add_peer(msg[1])
            conn.send(("ok",))
        elif msg[0] == "paged":  # ("paged", block_tokens, num_blocks): a fresh paged pool
            _, bt, nblocks = msg
            paged = None  # drop the previous region first (memory)
            mem = kvxfer.empty(nblocks * 2 * geom.num_layers * bt * geom.token_bytes)
            _fill(mem, SALT_PAGED)
            paged = eng.register(mem, geom.paged_layout(nblocks, bt))
            conn.send(("ok", eng.descriptor(), paged.id))
        elif msg[0] == "stop":
            break
    router.close()
    eng.close()
    try:
        conn.send(("bye",))
    except OSError:
        pass


def _check_block_free(pool4: np.ndarray, ids: np.ndarray, tokens: int, tb4: int) -> bool:
    """pool4: [L, 2, N, bt*tb4] uint32. The blocks ids hold the contiguous pattern."""
    n_layers = pool4.shape[0]
    plane = tokens * tb4
    for layer in range(n_layers):
        for kv in range(2):
            got = pool4[layer, kv, ids].reshape(-1)
            base = (layer * 2 + kv) * plane
            if not np.array_equal(got ^ SALT_CONTIG, np.arange(base, base + plane, dtype=np.uint32)):
                return False
    return True


def _check_paged(pool4: np.ndarray, ids: np.ndarray, rids: np.ndarray, n_remote: int) -> bool:
    n_layers, _, _, bb4 = pool4.shape
    x = np.arange(bb4, dtype=np.uint32)
    for layer in range(n_layers):
        for kv in range(2):
            got = pool4[layer, kv, ids]
            base = ((layer * 2 + kv) * n_remote + rids.astype(np.uint64)) * bb4
            want = (base[:, None].astype(np.uint32) + x[None, :]) ^ SALT_PAGED
            if not np.array_equal(got, want):
                return False
    return True


def run(args: argparse.Namespace, out) -> list[dict]:
    import kvxfer
    from kvxfer.serve import kv_transfer as kt
    from kvxfer.serve.kv_transfer import make_engine
    from kvxfer.serve.machine import machine

    geom = kt.KvGeometry(args.layers, args.kv_heads, args.head_dim, args.dtype_bytes)
    max_tokens = max(kt.padded_tokens(t, bt) for t in args.tokens for bt in args.block_tokens)
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    geom_t = tuple(geom.__dict__.values())
    proc = ctx.Process(target=_prefill_side, args=(child, args.backend, geom_t, max_tokens))
    proc.start()
    results: list[dict] = []
    try:
        deadline = time.monotonic() + 120
        while not parent.poll(0.2):
            if not proc.is_alive():
                raise RuntimeError(f"prefill side exited with code {proc.exitcode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError("prefill side did not start within 120 s")
        _, blob, contig_region = parent.recv()
        eng = make_engine("xfer-decode", args.backend, timeout=120.0)
        router = kt.NotificationRouter(eng)
        peer = eng.add_peer(blob)
        parent.send(("peer", eng.descriptor()))
        parent.recv()
        rng = np.random.default_rng(args.seed)
        for bt in args.block_tokens:
            n_need = -(-max_tokens // bt)
            n_pool = n_need + n_need // 4 + 1
            parent.send(("paged", bt, n_pool))
            _, blob, paged_region = parent.recv()
            peer = eng.add_peer(blob)  # refresh: the new region becomes addressable
            mem = kvxfer.empty(n_pool * 2 * geom.num_layers * bt * geom.token_bytes)
            local = eng.register(mem, geom.paged_layout(n_pool, bt))
            pool4 = mem.view(np.uint32).reshape(geom.num_layers, 2, n_pool, -1)
            for tokens in args.tokens:
                tp = kt.padded_tokens(tokens, bt)
                nb = tp // bt
                if args.placement == "random":  # fragmented pools: nothing coalesces
                    ids = rng.permutation(n_pool)[:nb].astype(np.int64)
                    rids = rng.permutation(n_pool)[:nb].astype(np.int64)
                else:  # fresh pools: ascending runs, as a new pool's free list hands them out
                    ids = np.arange(nb, dtype=np.int64)
                    rids = np.arange(n_pool - nb, n_pool, dtype=np.int64)

                def pull(mode: str, tag: str, c=(peer, local, paged_region, ids, rids, tp)) -> int:
                    peer_, local_, paged_, ids_, rids_, tp_ = c
                    if mode == "block-free":
                        return kt.pull_block_free(
                            eng, peer_, local_, contig_region, 0, tp_, ids_, geom, per_layer=args.per_layer
                        )
                    if mode == "paged-coalesced":
                        return kt.pull_paged_coalesced(eng, peer_, local_, paged_, ids_, rids_)
                    return kt.pull_block_by_block(
                        eng, peer_, router, local_, paged_, ids_, rids_, tag, timeout=600.0
                    )

                times: dict[str, list[float]] = {m: [] for m in args.modes}
                posted: dict[str, int] = {}
                for mode in args.modes:  # verification pass (not timed)
                    pool4[:, :, ids] = 0
                    pull(mode, f"v{tokens}-{bt}")
                    ok = (
                        _check_block_free(pool4, ids, tp, geom.token_bytes // 4)
                        if mode == "block-free"
                        else _check_paged(pool4, ids, rids, n_pool)
                    )
                    if not ok:
                        raise RuntimeError(f"{mode}: KV bytes differ ({tokens} tokens, {bt}-token blocks)")
                for rep in range(args.repeats):
                    for mode in args.modes:
                        t0 = time.perf_counter()
                        posted[mode] = pull(mode, f"r{rep}-{tokens}-{bt}")
                        times[mode].append(time.perf_counter() - t0)
                row_by_mode = {}
                for mode in args.modes:
                    sec = statistics.median(times[mode])
                    row = {
                        "experiment": "transfer",
                        "mode": mode,
                        "tokens": tokens,
                        "block_tokens": bt,
                        "seconds": sec,
                        "bytes": geom.contiguous_bytes(tp),
                        "gbps": geom.contiguous_bytes(tp) / sec / 1e9,
                        "transfers": posted[mode],
                        "per_layer": bool(args.per_layer) if mode == "block-free" else False,
                        "repeats": args.repeats,
                        "backend": args.backend,
                        "verified": True,
                        "placement": args.placement,
                        "machine": machine(),
                        "load_average_1min": round(os.getloadavg()[0], 2),  # others' jobs on this host
                    }
                    row_by_mode[mode] = row
                    results.append(row)
                    out(row)
                if "block-free" in row_by_mode and "block-by-block" in row_by_mode:
                    ratio = {
                        "experiment": "transfer",
                        "ratio": "block-free/block-by-block",
                        "tokens": tokens,
                        "block_tokens": bt,
                        "value": row_by_mode["block-free"]["seconds"]
                        / row_by_mode["block-by-block"]["seconds"],
                        "backend": args.backend,
                        "machine": machine(),
                    }
                    results.append(ratio)
                    out(ratio)
            del local
        router.close()
        eng.close()
        parent.send(("stop",))
        parent.poll(30)
    finally:
        parent.close()
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    return results


def plot(results: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results if "mode" in r]
    sizes = sorted({r["block_tokens"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, bt in zip(axes[0], sizes, strict=True):
        for mode in MODES:
            mine = [r for r in rows if r["block_tokens"] == bt and r["mode"] == mode]
            pts = sorted((r["tokens"], r["seconds"]) for r in mine)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("transfer time (ms, median)")
        ax.set_title(f"{bt}-token blocks")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    r0 = rows[0]
    fig.suptitle(f"KV transfer, {r0['backend']}, {r0['machine']}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer sizes and repeats (< 60 s)")
    p.add_argument("--json", action="store_true", help="JSON lines only on stdout")
    p.add_argument("--plot", metavar="FILE", help="write a PNG plot")
    p.add_argument("--backend", default="shm", choices=["shm", "tcp"])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--block-tokens", type=int, nargs="+", default=[16, 32, 128])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--per-layer", action="store_true", help="block-free: one READ per layer")
    p.add_argument("--layers", type=int, default=30)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype-bytes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--placement",
        choices=["random", "contiguous"],
        default="random",
        help="paged block ids: random (fragmented pools, the default) or ascending runs",
    )
    a = p.parse_args(argv)
    if a.quick:
        a.tokens, a.block_tokens, a.repeats = [1024, 8192], [16, 128], 3
    bad_dtype = a.dtype_bytes % 4 and a.dtype_bytes != 2
    if a.repeats < 1 or min(a.tokens) < 1 or min(a.block_tokens) < 1 or bad_dtype:
        p.error("repeats, tokens and block sizes must be positive; dtype-bytes 2 or a multiple of 4")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    t0 = time.monotonic()

    def out(row: dict) -> None:
        if args.json:
            print(json.dumps(row), flush=True)
        elif "mode" in row:
            print(
                f"{row['mode']:>16} tokens={row['tokens']:>5} block={row['block_tokens']:>3} "
                f"{row['seconds'] * 1e3:9.2f} ms {row['gbps']:6.2f} GB/s transfers={row['transfers']}",
                flush=True,
            )
        else:
            print(f"{'':>16} block-free / block-by-block = {row['value']:.3f}", flush=True)

    results = run(args, out)
    if args.plot:
        plot(results, args.plot)
        print(f"plot written to {args.plot}", file=sys.stderr)
    print(f"transfer experiment done in {time.monotonic() - t0:.1f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
