"""``kvxfer experiment ratio``: throughput at the Eq. 1 P/D ratio vs every other ratio of the
same instance budget [paper, P/D-Serve Fig. 12a-b: "at least +60%"].

One scenario (prompt ``--prompt`` tokens of which ``--setting`` are a shared setting part,
``--output`` tokens out). The planner (:mod:`kvxfer.serve.control.ratio`) takes T_p, r_pre and
TPOT(b_d) from the worker profile (default SmolLM2-135M measured on this machine), xi from
the KV size over ``--kv-gbps``, and splits ``--budget`` instances by Eq. 1. Then, for every
split n_p + n_d = budget (at least one of each):

* ``sim``: the discrete-event simulator (same workers model, same gateway policy object);
* ``real``: a local deployment of real worker processes in ``profiled`` mode (they sleep for
  the profile's TTFT/TPOT and move real KV bytes) behind a real gateway.

Throughput = requests completed per second by closed-loop users enough to keep every
prefill slot and every decode slot busy (``n_p b_p + n_d (b_d + pending)`` users); in real
mode a request that waits at the gateway longer than ``--slo`` (30 s) is dropped there and
not counted (it only bounds the run's end).

JSON lines: ``{"experiment":"ratio","n_p":..,"n_d":..,"planned":true|false,
"throughput_rps":..,"mode":"real"|"sim","eq1_rps":..,...}`` and a ``"summary"`` line per mode
with planned / worst, the best split and whether the planned one is within one instance.
``--quick``: every split simulated, the planned and the worst split real at the same time (6 s windows).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[ratio] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment ratio", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE")
    p.add_argument("--budget", type=int, default=6, help="instances (prefill + decode)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--setting", type=int, default=16)
    p.add_argument("--output", type=int, default=8)
    p.add_argument("--b-d", type=int, default=4)
    p.add_argument("--pending", type=int, default=2)
    p.add_argument("--kv-gbps", type=float, default=6.0, help="KV retrieval bandwidth (GB/s) for xi")
    p.add_argument("--profile", default="smollm2")
    p.add_argument("--modes", nargs="+", choices=("sim", "real"), default=["sim", "real"])
    p.add_argument(
        "--splits", default="", help="real mode: n_p values to run (default: all; --quick: planned and worst)"
    )
    p.add_argument("--duration", type=float, help="measured seconds per real split (40; --quick 12)")
    p.add_argument("--slo", type=float, help="real mode: TTFT deadline at the gateway (30 s; --quick 6 s)")
    p.add_argument("--sim-duration", type=float, default=600.0)
    p.add_argument("--backend", choices=("shm", "tcp"), default="shm")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.duration = a.duration or (6.0 if a.quick else 40.0)
    a.slo = a.slo or (6.0 if a.quick else 30.0)
    if a.quick and a.sim_duration == 600.0:
        a.sim_duration = 200.0
    return a


def inputs(args: argparse.Namespace):
    from kvxfer.serve.control.ratio import RatioInputs
    from kvxfer.serve.profile import load_profile
    from kvxfer.serve.sim.model import SimConfig

    prof = load_profile(args.profile)
    xi = SimConfig(prof, kv_bytes_per_s=args.kv_gbps * 1e9).xi(args.prompt)
    return prof, RatioInputs.from_profile(prof, args.prompt, args.output, args.b_d, args.setting, xi=xi)


def users_for(n_p: int, n_d: int, args: argparse.Namespace) -> int:
    return n_p + n_d * (args.b_d + args.pending)


def run_sim(args: argparse.Namespace, prof, ri, planned: tuple[int, int]) -> list[dict[str, Any]]:
    import numpy as np

    from kvxfer.serve.sim.model import SimConfig
    from kvxfer.serve.sim.runs import Mix, closed_loop

    def draw(_g: int, _rng: np.random.Generator) -> tuple[str, int, int, int]:
        return "s", args.prompt, args.setting, args.output

    mix = Mix("fixed", draw, {"s": args.prompt}, {"s": args.setting})
    rows = []
    for n_p in range(1, args.budget):
        n_d = args.budget - n_p
        cfg = SimConfig(prof, 1, n_p, n_d, 1, args.b_d, args.pending, kv_bytes_per_s=args.kv_gbps * 1e9)
        st = closed_loop(cfg, mix, users_for(n_p, n_d, args), args.sim_duration, slack=1e6, seed=args.seed)
        rows.append(_row(args, "sim", n_p, n_d, planned, st["throughput_rps"], ri, st["requests"]))
    return rows


def _row(args, mode, n_p, n_d, planned, rps, ri, requests) -> dict[str, Any]:
    from kvxfer.serve.machine import machine

    return {
        "experiment": "ratio",
        "n_p": n_p,
        "n_d": n_d,
        "planned": (n_p, n_d) == planned,
        "throughput_rps": rps,
        "mode": mode,
        "eq1_rps": ri.throughput(n_p, n_d),
        "budget": args.budget,
        "requests": requests,
        "prompt": args.prompt,
        "output": args.output,
        "b_d": args.b_d,
        "t_p_s": ri.t_p,
        "t_d_s": ri.t_d,
        "r_pre": ri.r_pre,
        "xi_s": ri.xi,
        "profile": args.profile,
        "machine": machine(),
    }


async def _measure(url: str, args: argparse.Namespace, users: int) -> tuple[float, int]:
    from kvxfer.serve import loadgen
    from kvxfer.serve.workload import Fixed, Scenario, Workload

    scen = Scenario("s", args.setting, Fixed(args.prompt - args.setting), Fixed(args.output))
    wl = Workload([scen], seed=args.seed, unit="char")
    warm = 0.5 * args.duration
    # a request still waiting at the gateway after slo_s is dropped there (not counted): it
    # bounds how long the run waits for the users' last requests
    res = await loadgen.closed_loop(url, wl, users, ttft_slo_s=args.slo, duration_s=warm + args.duration)
    # completions per second inside the window after the warm-up
    done = [r for r in res if r.error is None and warm <= r.start_s + r.e2e_s <= warm + args.duration]
    errors = [r.error for r in res if r.error]
    if errors:
        log(f"errors: {errors[:5]} ({len(errors)})")
    return len(done) / args.duration, len(res)


def run_real(
    args: argparse.Namespace, ri, planned: tuple[int, int], splits: list[int]
) -> list[dict[str, Any]]:
    """One deployment per split; ``--quick`` runs the splits at the same time (threads)."""
    from concurrent.futures import ThreadPoolExecutor

    from kvxfer.serve.deployment import start_local

    def one(n_p: int) -> dict[str, Any]:
        n_d = args.budget - n_p
        t0 = time.monotonic()
        with start_local(
            n_p,
            n_d,
            backend=args.backend,
            model="smollm2" if args.profile == "smollm2" else "tiny",
            mode="profiled",
            b_p=1,
            b_d=args.b_d,
            pending=args.pending,
            tokenizer="bytes:49152",
            max_prompt_tokens=args.prompt + 16,
            max_new_tokens=args.output + 8,
            ttft_slo_s=600.0,
            prefix_min_tokens=min(16, args.setting),
        ) as dep:
            rps, n = asyncio.run(_measure(dep.gateway_url, args, users_for(n_p, n_d, args)))
        log(
            f"real {n_p}P+{n_d}D: {rps:.3f} req/s (Eq. 1: {ri.throughput(n_p, n_d):.3f}), "
            f"{time.monotonic() - t0:.0f} s"
        )
        return _row(args, "real", n_p, n_d, planned, rps, ri, n)

    if args.quick:
        with ThreadPoolExecutor(len(splits)) as ex:
            return list(ex.map(one, splits))
    return [one(n_p) for n_p in splits]


def summary(rows: list[dict[str, Any]], mode: str) -> dict[str, Any] | None:
    rs = [r for r in rows if r["mode"] == mode]
    plan = [r for r in rs if r["planned"]]
    if not rs or not plan:
        return None
    best = max(rs, key=lambda r: r["throughput_rps"])
    worst = min(rs, key=lambda r: r["throughput_rps"])
    p = plan[0]
    return {
        "experiment": "ratio",
        "summary": True,
        "mode": mode,
        "planned": [p["n_p"], p["n_d"]],
        "planned_vs_worst": p["throughput_rps"] / worst["throughput_rps"]
        if worst["throughput_rps"]
        else None,
        "worst": [worst["n_p"], worst["n_d"]],
        "best": [best["n_p"], best["n_d"]],
        "planned_vs_best": p["throughput_rps"] / best["throughput_rps"] if best["throughput_rps"] else None,
        "within_one_of_best": abs(best["n_p"] - p["n_p"]) <= 1,
        "splits": len(rs),
    }


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for mode, style in (("sim", "o-"), ("real", "s--")):
        pts = sorted((r["n_p"], r["throughput_rps"]) for r in rows if r["mode"] == mode)
        if pts:
            ax.plot([x for x, _ in pts], [y for _, y in pts], style, label=mode)
    eq = sorted({(r["n_p"], r["eq1_rps"]) for r in rows})
    ax.plot([x for x, _ in eq], [y for _, y in eq], ":", color="gray", label="Eq. 1 min(P, D) capacity")
    planned = [r for r in rows if r["planned"]]
    if planned:
        ax.axvline(planned[0]["n_p"], color="green", alpha=0.4, label="planned")
    ax.set_xlabel(f"prefill instances n_p (n_d = {rows[0]['budget']} - n_p)")
    ax.set_ylabel("throughput (requests/s)")
    ax.set_title("ratio: throughput by P/D split", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    from kvxfer.serve.control.ratio import brute_force, plan

    args = parse(list(sys.argv[1:] if argv is None else argv))
    prof, ri = inputs(args)
    planned = plan(ri, args.budget)
    log(
        f"T_p {ri.t_p:.3f} s (r_pre {ri.r_pre:.2f}), T_d {ri.t_d:.3f} s (xi {ri.xi * 1e3:.1f} ms), "
        f"b_d {args.b_d}: "
        f"Eq. 1 plans {planned[0]}P+{planned[1]}D of {args.budget}"
    )
    rows: list[dict[str, Any]] = []
    if "sim" in args.modes:
        rows += run_sim(args, prof, ri, planned)
    if "real" in args.modes:
        if args.splits:
            splits = [int(x) for x in args.splits.split(",")]
        elif args.quick:
            worst = min(brute_force(ri, args.budget), key=lambda r: r[2])[0]
            splits = sorted({planned[0], worst})
        else:
            splits = list(range(1, args.budget))
        rows += run_real(args, ri, planned, splits)
    sums = [s for s in (summary(rows, m) for m in ("sim", "real")) if s]
    for r in rows + sums:
        if args.json:
            print(json.dumps(r))
        elif r.get("summary"):
            print(
                f"{r['mode']}: planned {r['planned']} = {r['planned_vs_worst']:.2f}x the worst {r['worst']}, "
                f"{r['planned_vs_best']:.2f}x the best {r['best']}"
            )
        else:
            print(
                f"{r['mode']:>4} {r['n_p']}P+{r['n_d']}D{' (planned)' if r['planned'] else '':<10} "
                f"{r['throughput_rps']:.3f} req/s  (Eq. 1 {r['eq1_rps']:.3f})"
            )
    if args.plot and rows:
        plot(rows, args.plot)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
