"""``kvxfer-bench``: throughput of kvxfer transfers against a baseline, in one command.

Same host (default): ``kvxfer-bench`` spawns its own target process (or, with
``--backend loopback``, a target engine in its own process). Two hosts:
``kvxfer-bench --listen PORT`` on the target, ``kvxfer-bench HOST:PORT ...`` on the
initiator; descriptors, workload parameters and checksums travel over that connection.

Default run (no arguments): shm backend; the llama3-8b paged KV shape (32 layers, K and
V, 32 KiB blocks), 512 random blocks of 2048 on each side = 1 GiB, coalesced and
block-by-block; plus 1 GiB contiguous; each against memcpy of the same bytes with the
same number of threads, measured in the same run. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__, models
from .units import parse_counts, parse_size, parse_sizes

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_VERIFY = 0, 1, 2, 3


def _default_threads() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(4, n))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kvxfer-bench",
        description="Measure kvxfer transfer throughput against memcpy (or ib_write_bw) in the same run.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  kvxfer-bench                                   # the default paged + contiguous run (shm)\n"
        "  kvxfer-bench --sizes                           # contiguous sweep 4K..1G (powers of 4)\n"
        "  kvxfer-bench --model llama3-70b --pool-blocks 1024 --pattern random,runs:16 --per-layer\n"
        "  kvxfer-bench --model none --block-bytes 4096 --blocks 1024 --iters 2000   # descriptors/s\n"
        "  kvxfer-bench --listen 7000                     # on the target host\n"
        "  kvxfer-bench 10.0.0.2:7000 --backend tcp       # on the initiator host\n",
    )
    p.add_argument(
        "target", nargs="?", metavar="HOST:PORT", help="a `kvxfer-bench --listen` target on another host"
    )
    p.add_argument("--version", action="version", version=f"kvxfer-bench {__version__}")
    g = p.add_argument_group("session")
    g.add_argument("--listen", metavar="[HOST:]PORT", help="be the target of a two-host run")
    g.add_argument("--once", action="store_true", help="with --listen: exit after one session")
    g.add_argument(
        "--backend",
        default="shm",
        help="shm | loopback | tcp | ibverbs | any backend kvxfer lists (default shm)",
    )
    g.add_argument(
        "--device", default="", help="backend device (e.g. an RDMA device); default: the backend's choice"
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help=f"engine copy/worker threads, and memcpy baseline threads (default {_default_threads()}: "
        "min(4, usable cores))",
    )
    g.add_argument(
        "--memory",
        default="auto",
        help="how the regions (and the baseline's buffer) are allocated: numpy (np.empty) or kvxfer "
        "(kvxfer.empty: memfd-backed, which shm copies with memcpy instead of cross-memory attach). "
        "auto = kvxfer for shm, numpy otherwise. cuda:N = GPU memory (torch) through cuda_ipc: "
        "see --target-memory and bench/kvxfer_bench/gpu.py",
    )
    g.add_argument(
        "--target-memory",
        default=None,
        help="with --memory cuda:N: the target's GPU, cuda:M (default the same)",
    )
    g.add_argument(
        "--gpu-layouts",
        default="one-region,per-layer",
        help="with --memory cuda:N: one-region (one KV pool), per-layer (one region per layer and K/V), "
        "or both",
    )
    g.add_argument("--gpu-pack", action="store_true", help="with --memory cuda:N: also pack/unpack kernels")
    g.add_argument(
        "--gpu-queue-depths", default="1,2", help="with --memory cuda:N: transfers in flight, a comma list"
    )
    g.add_argument(
        "--no-contiguous", action="store_true", help="with --memory cuda:N: skip the contiguous case"
    )
    g.add_argument(
        "--timeout", type=float, default=120.0, help="per-transfer deadline in seconds (default 120)"
    )
    g.add_argument(
        "--connect-timeout", type=float, default=30.0, help="seconds to reach the target (default 30)"
    )

    w = p.add_argument_group("workloads")
    w.add_argument(
        "--workloads",
        default=None,
        help="paged,contiguous (default: inferred: --sizes => contiguous, --model/--block-bytes => "
        "paged, neither => both)",
    )
    w.add_argument(
        "--sizes",
        nargs="?",
        const="4K..1G",
        default=None,
        help="contiguous sizes: 4K..1G (powers of 4; the default when --sizes has no value), "
        "4K..1G*2 (factor 2), or 4K,1M,1G. Without --sizes: 1G",
    )
    w.add_argument(
        "--model",
        default=None,
        help=f"paged KV geometry: {', '.join(models.MODELS)}, a comma list, or none (with --block-bytes). "
        "Default llama3-8b",
    )
    w.add_argument(
        "--block-bytes",
        default=None,
        help="bytes of one block of one layer and one of K/V (overrides the model's)",
    )
    w.add_argument("--layers", type=int, default=None, help="override the model's layer count")
    w.add_argument("--kv", type=int, default=None, choices=[1, 2], help="2 = separate K and V, 1 = fused")
    w.add_argument("--tokens-per-block", type=int, default=16, help="tokens per KV block (default 16)")
    w.add_argument(
        "--kv-dtype",
        default=None,
        choices=sorted(models.DTYPE_BYTES),
        help="KV cache dtype (default: the model's, bf16)",
    )
    w.add_argument(
        "--pattern", default="random", help="random | runs:N | seq, or a comma list (default random)"
    )
    w.add_argument("--pool-blocks", type=int, default=2048, help="blocks in each side's pool (default 2048)")
    w.add_argument(
        "--blocks", default="512", help="blocks moved: 512, 64,512, or 16..1024 (powers of 2); default 512"
    )
    w.add_argument(
        "--coalesce",
        choices=["on", "off", "both"],
        default="both",
        help="paged: coalesced runs, block-by-block, or both (default both)",
    )
    w.add_argument(
        "--per-layer",
        nargs="?",
        const="both",
        default="off",
        choices=["off", "both", "only"],
        help="also (both, the default of the bare flag) or only (only) post one transfer per layer",
    )
    w.add_argument("--op", choices=["write", "read", "both"], default="write", help="default write")

    m = p.add_argument_group("measurement")
    m.add_argument("--queue-depth", type=int, default=1, help="transfers in flight (default 1)")
    m.add_argument(
        "--iters", default="auto", help="transfer rounds per run, or auto (>= --min-time per run, at least 3)"
    )
    m.add_argument(
        "--min-time", type=float, default=0.25, help="seconds per run for --iters auto (default 0.25)"
    )
    m.add_argument("--repeat", type=int, default=3, help="runs per case; figures are medians (default 3)")
    m.add_argument("--warmup", type=int, default=1, help="untimed warm-up rounds (default 1)")
    m.add_argument(
        "--baseline",
        default="auto",
        choices=["auto", "memcpy", "numpy", "ib_write_bw", "none"],
        help="auto = ib_write_bw for ibverbs, memcpy otherwise (numpy = the slower pure-numpy memcpy)",
    )
    m.add_argument(
        "--baseline-buffer",
        choices=["separate", "shared", "auto"],
        default="separate",
        help="memcpy baseline destination: a second buffer shaped like the target's (separate, the default), "
        "or stand-in pieces beside the source pieces in the local buffer (shared: same piece sizes and "
        "pattern, no extra memory); auto = shared when it fits",
    )
    m.add_argument("--no-verify", action="store_true", help="skip checksum verification")
    m.add_argument(
        "--verify-each",
        action="store_true",
        help="verify after every round instead of every run (queue depth 1, slow)",
    )
    m.add_argument("--seed", type=int, default=1, help="seed of block choices and data patterns (default 1)")
    m.add_argument(
        "--no-memory-check", action="store_true", help="do not refuse workloads larger than free memory"
    )

    o = p.add_argument_group("output")
    o.add_argument(
        "--json",
        action="store_true",
        help="one JSON object per line on stdout (schema: bench/schema.json); the table goes to stderr",
    )
    o.add_argument("--plot", metavar="FILE.png", help="bandwidth vs size plot (needs matplotlib)")
    o.add_argument(
        "--replot",
        nargs="+",
        metavar="FILE.jsonl",
        help="with --plot: plot saved --json output instead of measuring (several files of the same "
        "command: medians per case)",
    )
    o.add_argument(
        "--progress", action="store_true", help="progress bar on stderr even when it is not a terminal"
    )
    lt = p.add_argument_group("latency (small requests; docs/benchmarks.md, Latency)")
    lt.add_argument(
        "--latency",
        action="store_true",
        help="small requests one at a time and at --latency-depths: p50/p99 and request rate against "
        "a same-run baseline (socket ping-pong for tcp, wake-up ping-pong + memcpy otherwise)",
    )
    lt.add_argument("--latency-bytes", default="4K", help="bytes of one request (default 4K)")
    lt.add_argument("--latency-depths", default="1,4,16,64", help="queue depths (default 1,4,16,64)")
    lt.add_argument("--requests", type=int, default=20000, help="requests per depth and run (default 20000)")
    o.add_argument("--list-models", action="store_true", help="print the model table and exit")
    o.add_argument("--list-backends", action="store_true", help="print kvxfer's backends and exit")
    o.add_argument("--corrupt-for-test", action="store_true", help=argparse.SUPPRESS)
    return p


def _cases_from_args(a: argparse.Namespace):
    from . import workloads

    if a.workloads:
        kinds = {k.strip() for k in a.workloads.split(",") if k.strip()}
        bad = kinds - {"paged", "contiguous"}
        if bad:
            raise ValueError(f"unknown workloads {', '.join(sorted(bad))} (paged, contiguous)")
    else:
        kinds = set()
        if a.sizes is not None:
            kinds.add("contiguous")
        if a.model is not None or a.block_bytes is not None:
            kinds.add("paged")
        if not kinds:
            kinds = {"paged", "contiguous"}
    block_bytes = parse_size(a.block_bytes) if a.block_bytes else None
    paged = []
    if "paged" in kinds:
        model = a.model if a.model is not None else ("none" if block_bytes else "llama3-8b")
        paged = workloads.paged_specs(model, block_bytes, a.layers, a.kv, a.tokens_per_block, a.kv_dtype)
    sizes = parse_sizes(a.sizes or "1G") if "contiguous" in kinds else []
    patterns = [workloads.check_pattern(x.strip()) for x in a.pattern.split(",") if x.strip()]
    ops = ["write", "read"] if a.op == "both" else [a.op]
    coalesce = {"on": [True], "off": [False], "both": [True, False]}[a.coalesce]
    if a.pool_blocks < 1:
        raise ValueError("--pool-blocks must be >= 1")
    return workloads.build_cases(
        paged=paged,
        blocks=parse_counts(a.blocks),
        pool_blocks=a.pool_blocks,
        patterns=patterns,
        per_layer=a.per_layer,
        contiguous_sizes=sizes,
        ops=ops,
        coalesce=coalesce,
        seed=a.seed,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)

    if a.list_models:
        print(models.table())
        return EXIT_OK
    if a.list_backends:
        import kvxfer

        for b in kvxfer.list_backends():
            print(f"{b.name:<10} {'available' if b.available else 'unavailable':<12} {b.reason}")
        return EXIT_OK
    if a.replot:
        import json

        from . import plot

        if not a.plot:
            parser.error("--replot needs --plot FILE.png")
        recs = [json.loads(line) for f in a.replot for line in open(f) if line.strip()]
        plot.plot(plot.median_records(recs), a.plot)
        print(f"kvxfer-bench: wrote {a.plot} from {len(recs)} records", file=sys.stderr)
        return EXIT_OK
    if a.listen:
        from . import proto, target

        try:
            host, port = proto.parse_hostport(a.listen)
        except ValueError as e:
            parser.error(str(e))
        return target.listen(port, host, a.once, a.device)

    if a.latency:
        return _latency(a, parser)
    if a.memory.startswith("cuda"):
        from . import gpu

        if a.backend not in ("shm", "cuda_ipc", "tcp"):
            parser.error("--memory cuda:N runs through cuda_ipc, or tcp with host staging (--backend tcp)")
        try:
            gpu.parse_cuda(a.memory)
            gpu.parse_cuda(a.target_memory or a.memory)
        except ValueError as e:
            parser.error(str(e))
        try:
            return gpu.main_from_args(a, a.json)
        except Exception as e:  # noqa: BLE001 - one explained line
            print(f"kvxfer-bench: error: {type(e).__name__}: {e}", file=sys.stderr)
            return EXIT_ERROR
    if a.memory not in ("auto", "numpy", "kvxfer"):
        parser.error(f"--memory must be auto, numpy, kvxfer or cuda:N (got {a.memory!r})")

    from . import report, runner, verify

    try:
        cases = _cases_from_args(a)
        iters = 0 if str(a.iters).lower() == "auto" else int(a.iters)
        if iters < 0 or a.repeat < 1 or a.queue_depth < 1:
            raise ValueError("--iters, --repeat and --queue-depth must be positive")
        if a.target:
            from .proto import parse_hostport

            parse_hostport(a.target)
            if a.backend == "loopback":
                raise ValueError("--backend loopback reaches engines of one process only (no HOST:PORT)")
    except ValueError as e:
        parser.error(str(e))
        return EXIT_USAGE  # not reached

    threads = a.threads if a.threads is not None else _default_threads()
    opts = runner.Options(
        backend=a.backend,
        threads=threads,
        device=a.device,
        queue_depth=a.queue_depth,
        iters=iters,
        min_time=a.min_time,
        repeat=a.repeat,
        warmup=a.warmup,
        verify=not a.no_verify,
        verify_each=a.verify_each,
        baseline=a.baseline,
        baseline_buffer=a.baseline_buffer,
        memory=a.memory,
        timeout=a.timeout,
        seed=a.seed,
        target=a.target or "",
        connect_timeout=a.connect_timeout,
        corrupt_for_test=a.corrupt_for_test,
        check_memory=not a.no_memory_check,
    )

    table_stream = sys.stderr if a.json else sys.stdout
    progress = report.Progress(len(cases) * a.repeat, a.progress or sys.stderr.isatty())
    rep = report.Reporter(table_stream, sys.stdout if a.json else None, progress)
    records: list[dict] = []

    def on_result(rec: dict) -> None:
        records.append(rec)
        rep.result(rec)

    bench = runner.Bench(opts, log=lambda msg: rep.note(f"kvxfer-bench: {msg}"), progress=progress)
    rc = EXIT_OK
    try:
        bench.open()
        rep.text(
            report.banner(
                backend=a.backend,
                describe=bench.describe(),
                target_describe=bench.target_info.get("describe", "?"),
                mode=bench.mode,
                threads=threads,
                queue_depth=a.queue_depth,
                coalesce=a.coalesce,
                iters=("auto" if not iters else str(iters)),
                repeat=a.repeat,
                verify=("off" if a.no_verify else ("every round" if a.verify_each else "every run")),
                baseline=bench.baseline_note or "none",
                memory=bench.memory,
                local=bench.local_machine,
                target_machine=bench.target_info.get("machine") if bench.mode == "remote" else None,
                target_pid=bench.target_info.get("pid"),
            )
        )
        bench.run(cases, on_result)
    except verify.VerifyError as e:
        rep.note(f"kvxfer-bench: VERIFICATION FAILED: {e}")
        rc = EXIT_VERIFY
    except KeyboardInterrupt:
        rep.note("kvxfer-bench: interrupted")
        rc = 130
    except Exception as e:  # noqa: BLE001 - every failure ends in one explained line
        if os.environ.get("KVXFER_BENCH_DEBUG"):
            import traceback

            traceback.print_exc()
        rep.note(f"kvxfer-bench: error: {type(e).__name__}: {e}")
        rc = EXIT_ERROR
    finally:
        progress.clear()
        bench.close()
    if records and a.plot:
        try:
            from . import plot

            plot.plot(records, a.plot)
            rep.note(f"kvxfer-bench: wrote {a.plot}")
        except Exception as e:  # noqa: BLE001
            rep.note(f"kvxfer-bench: --plot failed: {type(e).__name__}: {e}")
            rc = rc or EXIT_ERROR
    if bench.ibbw is not None and bench.ibbw.errors:
        for err in bench.ibbw.errors:
            rep.note(f"kvxfer-bench: ib_write_bw: {err}")
    return rc


def _latency(a: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    import json

    from . import latency

    try:
        nbytes = parse_size(a.latency_bytes)
        depths = [int(d) for d in a.latency_depths.split(",")]
        if nbytes < 1 or a.requests < 1 or a.repeat < 1 or any(d < 1 for d in depths):
            raise ValueError("--latency-bytes, --requests, --repeat and --latency-depths must be positive")
    except ValueError as e:
        parser.error(str(e))
        return EXIT_USAGE  # not reached
    if a.target:
        parser.error("--latency runs on one host (it spawns its target)")
    if a.backend == "loopback":
        parser.error("--latency spawns a target process: use shm or tcp (bench/cpp/latency.cc: loopback)")
    table = sys.stderr if a.json else sys.stdout

    def emit(rec: dict) -> None:
        print(latency.table_row(rec), file=table, flush=True)
        if a.json:
            print(json.dumps(rec), flush=True)

    try:
        return latency.run(
            a.backend, nbytes, depths, a.requests, a.repeat, emit, log=lambda m: print(m, file=sys.stderr)
        )
    except Exception as e:  # noqa: BLE001 - every failure ends in one explained line
        print(f"kvxfer-bench: error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
