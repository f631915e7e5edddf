"""``kvxfer experiment aggregated``: throughput of disaggregated vs aggregated serving on the
same number of worker instances [paper, P/D-Serve section 4.1: "6.7x over aggregated"].

Two deployments from :func:`kvxfer.serve.deployment.start_local`, both alive for the whole run
and measured in turn (interleaved repeats, medians):

* ``disaggregated``: ``--prefills`` prefill workers (``--b-p`` slots) + ``--decodes`` decode
  workers (batch ``--b-d``), KV moved by kvxfer (block-free);
* ``aggregated``: ``--prefills + --decodes`` aggregated workers (batch ``--b-d``), each running
  prefill and decode on one compute thread (a prefill stalls its running batch).

Every worker has one compute thread (``torch_threads=1``), so both use the same number of
instances and cores. Each deployment is fronted by its own reject-retry gateway process. The
load: ``--users`` closed-loop users replaying the Azure LLM inference trace 2023 (code and
conversation, in trace order; lengths scaled by ``--prompt-factor`` / ``--output-factor`` and
clamped to what the model holds; Patel et al., Splitwise, ISCA 2024, CC-BY 4.0).

JSON lines, one per (mode, repeat)::

  {"experiment":"aggregated","mode":"disaggregated"|"aggregated","instances":N,
   "layout":"1P+1D"|"2A","users":U,"repeat":i,"throughput_rps":..,"tokens_per_s":..,
   "ttft_p50_s":..,"ttft_p99_s":..,"tpot_p50_s":..,"e2e_p50_s":..,"requests":..,"errors":{..},
   "compute":"profiled"|"real","model":..,"machine":..}

then ``{"experiment":"aggregated","summary":true,"throughput_ratio":<disagg/agg median>,..}``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
from typing import Any

FULL = {"model": "smollm2", "prefills": 2, "decodes": 2, "users": 32, "duration": 60.0, "repeats": 3}
QUICK = {"model": "tiny", "prefills": 1, "decodes": 1, "users": 24, "duration": 6.0, "repeats": 1}


def log(msg: str) -> None:
    print(f"[aggregated] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment aggregated", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one short repeat (under a minute here)")
    p.add_argument("--json", action="store_true", help="JSON lines on stdout (else a table)")
    p.add_argument("--plot", metavar="FILE", help="bar chart of throughput to FILE")
    p.add_argument("--mode", choices=("profiled", "real"), default="profiled", help="compute mode")
    p.add_argument("--model", choices=("smollm2", "tiny"), help="smollm2 (--quick: tiny)")
    p.add_argument("--profile", default="", help="profiled mode: profile JSON (default: the model's)")
    p.add_argument("--prefills", type=int, help="prefill workers (2; --quick 1)")
    p.add_argument("--decodes", type=int, help="decode workers (2; --quick 1); aggregated: the sum")
    p.add_argument("--b-p", type=int, default=4)
    p.add_argument("--b-d", type=int, default=16)
    p.add_argument("--users", type=int, help="closed-loop users (32; --quick 24)")
    p.add_argument("--prompt-factor", type=float, default=1 / 8)
    p.add_argument("--max-prompt", type=int, default=512)
    p.add_argument("--output-factor", type=float, default=1 / 4)
    p.add_argument("--max-output", type=int, default=64)
    p.add_argument("--duration", type=float, help="seconds per measurement (60; --quick 6)")
    p.add_argument("--repeats", type=int, help="interleaved repeats (3; --quick 1)")
    p.add_argument("--backend", choices=("shm", "tcp"), default="shm")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for k, v in (QUICK if args.quick else FULL).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


async def _measure(url: str, replay: Any, users: int, duration: float) -> dict[str, Any]:
    """Closed loop: users ramp up over ``duration / 4`` s, then ``duration`` s are measured.
    Throughput counts the requests that complete inside the measured window."""
    from kvxfer.serve import loadgen

    ramp = duration / 4
    res = await loadgen.closed_loop(
        url, replay, users, ttft_slo_s=600.0, duration_s=ramp + duration, ramp_s=ramp
    )
    st = loadgen.summarize([r for r in res if r.start_s >= ramp])
    done = [r for r in res if r.error is None and ramp <= r.start_s + r.e2e_s < ramp + duration]
    st["throughput_rps"] = len(done) / duration
    st["tokens_per_s"] = sum(r.completion_tokens for r in done) / duration
    return st


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kvxfer.experiments.forwarding import default_profile, tokenizer_spec
    from kvxfer.serve.deployment import start_local
    from kvxfer.serve.gateway import GatewayProcess
    from kvxfer.serve.machine import machine
    from kvxfer.serve.workload import LengthScale, Replay, azure_trace_workload

    duration, repeats = args.duration, args.repeats
    tok, unit, _ = tokenizer_spec(args.model, args.mode)
    scale = LengthScale(
        prompt_factor=args.prompt_factor,
        max_prompt_tokens=args.max_prompt,
        output_factor=args.output_factor,
        max_output_tokens=args.max_output,
    )
    _, reqs = azure_trace_workload(scale, limit=2000, unit=unit)
    opts: dict[str, Any] = {
        "backend": args.backend,
        "model": args.model,
        "mode": args.mode,
        "b_p": args.b_p,
        "b_d": args.b_d,
        "gateway": False,
        "seed": args.seed,
        "max_prompt_tokens": args.max_prompt + 64,
        "max_new_tokens": args.max_output + 8,
        "pending": 4,
        "torch_threads": 1,
    }
    args.profile = args.profile or default_profile(args.model, args.mode)
    if args.profile:
        opts["profile"] = args.profile
    n = args.prefills + args.decodes
    layouts = {
        "disaggregated": (
            f"{args.prefills}P+{args.decodes}D",
            {"n_prefill": args.prefills, "n_decode": args.decodes},
        ),
        "aggregated": (f"{n}A", {"n_prefill": 0, "n_decode": 0, "n_aggregated": n}),
    }
    rows: list[dict[str, Any]] = []
    deps: dict[str, Any] = {}
    gws: dict[str, GatewayProcess] = {}
    try:
        for mode, (layout, counts) in layouts.items():
            log(f"starting {mode} ({layout}), {args.model} {args.mode}")
            deps[mode] = start_local(**counts, **opts)
            fronts = deps[mode].prefill_urls + deps[mode].aggregated_urls
            log_path = str(deps[mode].log_dir / "gateway.log")
            gws[mode] = GatewayProcess(
                fronts, policy="reject-retry", ttft_slo_s=600.0, tokenizer=tok, log_path=log_path
            )
            log(f"{mode}: worker and gateway logs in {deps[mode].log_dir}")
            gws[mode].start()
        for i in range(repeats):
            for mode, (layout, _) in layouts.items():
                st = asyncio.run(_measure(gws[mode].url, Replay(reqs), args.users, duration))
                row = {
                    "experiment": "aggregated",
                    "mode": mode,
                    "instances": n,
                    "layout": layout,
                    "users": args.users,
                    "repeat": i,
                    "throughput_rps": st["throughput_rps"],
                    "tokens_per_s": st["tokens_per_s"],
                    "ttft_p50_s": st["ttft_p50_s"],
                    "ttft_p99_s": st["ttft_p99_s"],
                    "tpot_p50_s": st["tpot_p50_s"],
                    "e2e_p50_s": st["e2e_p50_s"],
                    "requests": st["requests"],
                    "errors": st["errors"],
                    "compute": args.mode,
                    "model": args.model,
                    "b_p": args.b_p,
                    "b_d": args.b_d,
                    "duration_s": duration,
                    "profile": args.profile
                    or (f"{args.model} (default)" if args.mode == "profiled" else None),
                    "machine": machine(),
                }
                rows.append(row)
                log(f"{mode:>13} ({layout}) repeat {i}: {st['throughput_rps']:.2f} req/s, "
                    f"{st['tokens_per_s']:.0f} tok/s, TTFT p50 {st['ttft_p50_s']:.3f} s, "
                    f"TPOT p50 {st['tpot_p50_s'] or 0:.4f} s, {st['requests']} requests, "
                    f"errors {st['errors']}")  # fmt: skip
    finally:
        for g in gws.values():
            g.stop()
        for d in deps.values():
            d.stop()
    return rows


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    med = {
        m: statistics.median(r["throughput_rps"] for r in rows if r["mode"] == m)
        for m in ("disaggregated", "aggregated")
    }
    ratio = med["disaggregated"] / med["aggregated"] if med["aggregated"] else None
    return {
        "experiment": "aggregated",
        "summary": True,
        "throughput_rps_median": med,
        "throughput_ratio": ratio,
        "repeats": len(rows) // 2,
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = summary(rows)
    fig, ax = plt.subplots(figsize=(4, 3.2))
    modes = ["aggregated", "disaggregated"]
    labels = [f"{m}\n{next(r['layout'] for r in rows if r['mode'] == m)}" for m in modes]
    ax.bar(labels, [s["throughput_rps_median"][m] for m in modes], color=["#999", "#37c"])
    ax.set_ylabel("throughput (req/s, median)")
    r0 = rows[0]
    ax.set_title(
        f"{r0['compute']} {r0['model']}, {r0['users']} users: x{s['throughput_ratio']:.2f}", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    # SIGTERM unwinds like Ctrl-C, so the workers and gateways are stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = run(args)
    s = summary(rows)
    if args.json:
        for r in rows:
            print(json.dumps(r))
        print(json.dumps(s))
    else:
        for r in rows:
            print(f"{r['mode']:>13} {r['layout']:>6} rep {r['repeat']}: {r['throughput_rps']:7.2f} req/s "
                  f"{r['tokens_per_s']:8.0f} tok/s  TTFT p50 {r['ttft_p50_s']:.3f} s")  # fmt: skip
        print(f"disaggregated / aggregated throughput (medians): {s['throughput_ratio']:.2f}")
    if args.plot:
        plot(rows, args.plot)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
