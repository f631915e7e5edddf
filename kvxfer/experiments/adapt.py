"""``kvxfer experiment adapt``: the online ratio monitor under a workload shift (output length
+50% mid-run) at a fixed instance budget [paper, P/D-Serve section 3.4 and Fig. 12c].

Simulated (:mod:`kvxfer.serve.sim`, the SmolLM2 profile of this machine): one group of
``--budget`` instances starts at the Eq. 1 ratio for the first workload; closed-loop users keep
it saturated. At ``--shift-at`` the answers grow from ``--output`` to 1.5x. Every ``--period``
the controller feeds the period's finished requests (E2E, TTFT as T_p) to
:class:`~kvxfer.serve.control.ratio.RatioMonitor` [paper: E2E up with T_p/E2E up -> add
prefill, with T_p/E2E down -> add decode]; when the monitor fires, the controller re-plans by
Eq. 1 from the observed output length and moves ONE instance per period towards the plan
[inferred: the paper's monitor gives the direction, gradual steps; Eq. 1 gives where to stop].
A move is a drain and a rebuild (``--construct``: a worker's start-to-healthy time measured
by the recovery experiment, 6 s here).

Baseline: the best static split for the new workload (all splits simulated, same users).

JSON line: ``{"experiment":"adapt","converge_s":..,"throughput_vs_static":..,"dropped":..,
"mode":"sim","from":[n_p,n_d],"to":[n_p,n_d],"best_static":[n_p,n_d],...}``
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from typing import Any


def log(msg: str) -> None:
    print(f"[adapt] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment adapt", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE")
    p.add_argument("--budget", type=int, default=6)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--setting", type=int, default=16)
    p.add_argument("--output", type=int, default=8)
    p.add_argument("--growth", type=float, default=1.5, help="output length factor at the shift")
    p.add_argument("--b-d", type=int, default=4)
    p.add_argument("--pending", type=int, default=2)
    p.add_argument("--period", type=float, default=30.0, help="monitor period (simulated s)")
    p.add_argument("--shift-at", type=float, default=300.0)
    p.add_argument("--end", type=float, default=1200.0)
    p.add_argument("--construct", type=float, default=6.0, help="drain-to-joined rebuild time (s)")
    p.add_argument("--profile", default="smollm2")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _setup(args, prof, n_p, n_d, output_of):
    import numpy as np

    from kvxfer.serve.sim.model import SimConfig, SimRequest, Simulation

    cfg = SimConfig(prof, 1, n_p, n_d, 1, args.b_d, args.pending)
    sim = Simulation(cfg, seed=args.seed)
    ids = itertools.count()

    def make(u: int, now: float, _rng: np.random.Generator) -> SimRequest:
        return SimRequest(
            next(ids), 0, "s", args.prompt, args.setting, output_of(now), now, now + 1e6, user=u
        )

    sim.add_users(args.budget * (args.b_d + args.pending), make, ramp_s=5.0)
    return sim


def rate(sim, t0: float, t1: float) -> float:
    return sum(1 for r in sim.requests if r.done is not None and r.error is None and t0 <= r.done < t1) / (
        t1 - t0
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    from kvxfer.serve.control.ratio import RatioInputs, RatioMonitor, plan
    from kvxfer.serve.machine import machine
    from kvxfer.serve.profile import load_profile
    from kvxfer.serve.sim.model import convert

    prof = load_profile(args.profile)
    new_out = round(args.output * args.growth)

    def inputs(out: int) -> RatioInputs:
        return RatioInputs.from_profile(prof, args.prompt, out, args.b_d, args.setting)

    start = plan(inputs(args.output), args.budget)
    window = (args.end - 0.4 * (args.end - args.shift_at), args.end)  # the last 40% after the shift
    static = {}
    for n_p in range(1, args.budget):
        sim = _setup(args, prof, n_p, args.budget - n_p, lambda _t: new_out)
        sim.run(window[1] - window[0] + 60)
        static[n_p] = rate(sim, 60, window[1] - window[0] + 60)
    best_p = max(static, key=static.get)
    log(
        f"start {start[0]}P+{start[1]}D; best static for {new_out} output tokens: "
        f"{best_p}P+{args.budget - best_p}D "
        f"({static[best_p]:.3f} req/s)"
    )

    sim = _setup(args, prof, *start, lambda t: args.output if t < args.shift_at else new_out)
    mon = RatioMonitor(rise=0.1, cooldown=1)
    timeline = []
    seen = 0
    t = args.period
    while t <= args.end:
        sim.run(t)
        done = [r for r in sim.requests[seen:] if r.done is not None]
        seen = len(sim.requests)
        outs = [r.output_tokens for r in done] or [args.output]
        for r in done:
            mon.observe(r.done - r.arrival, r.ttft_s or 0.0)
        action = mon.decide()
        n_p, n_d = len(sim.group_prefills[0]), len(sim.group_decodes[0])
        target = plan(inputs(round(sum(outs) / len(outs))), args.budget)
        moved = None
        busy = any("joined" not in c for c in sim.conversions)
        if (action or (n_p, n_d) != target and sim.conversions) and not busy and (n_p, n_d) != target:
            moved = "decode" if target[0] < n_p else "prefill"
            convert(sim, 0, moved, args.construct)
        timeline.append(
            {
                "t": t,
                "n_p": n_p,
                "n_d": n_d,
                "monitor": action,
                "target": list(target),
                "moved": moved,
                "rps": rate(sim, t - args.period, t),
            }
        )
        t += args.period
    joined = [c["joined"] for c in sim.conversions if "joined" in c]
    converge = (max(joined) - args.shift_at) if joined else None
    final = (len(sim.group_prefills[0]), len(sim.group_decodes[0]))
    adaptive = rate(sim, *window)
    dropped = sum(1 for r in sim.requests if r.error)
    return {
        "experiment": "adapt",
        "converge_s": converge,
        "throughput_vs_static": adaptive / static[best_p],
        "dropped": dropped,
        "mode": "sim",
        "from": list(start),
        "to": list(final),
        "best_static": [best_p, args.budget - best_p],
        "throughput_rps": adaptive,
        "static_rps": {f"{p}P+{args.budget - p}D": v for p, v in static.items()},
        "output_tokens": [args.output, new_out],
        "moves": len(sim.conversions),
        "period_s": args.period,
        "construct_s": args.construct,
        "requests": len(sim.requests),
        "timeline": timeline,
        "profile": f"{prof.model} ({prof.machine})",
        "machine": machine(),
    }


def plot(row: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = row["timeline"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    ax.plot([x["t"] for x in tl], [x["rps"] for x in tl], "o-", ms=3, label="adaptive (req/s)")
    best = row["static_rps"][f"{row['best_static'][0]}P+{row['best_static'][1]}D"]
    ax.axhline(
        best, color="gray", ls=":", label=f"best static {row['best_static'][0]}P+{row['best_static'][1]}D"
    )
    ax2 = ax.twinx()
    ax2.step(
        [x["t"] for x in tl], [x["n_p"] for x in tl], where="post", color="green", alpha=0.5, label="n_p"
    )
    ax2.set_ylabel("prefill instances")
    ax.set_xlabel(
        f"simulated time (s); output x{row['output_tokens'][1] / row['output_tokens'][0]:g} "
        f"at {row.get('shift_at')} s"
    )
    ax.set_ylabel("throughput (req/s)")
    ax.legend(fontsize=7, loc="lower left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    row = run(args)
    row["shift_at"] = args.shift_at
    if args.json:
        print(json.dumps({k: v for k, v in row.items() if k != "timeline"}))
    else:
        print(
            f"converged in {row['converge_s']} s from {row['from']} to {row['to']} (best static "
            f"{row['best_static']}): {row['throughput_vs_static']:.3f} of its throughput, "
            f"dropped {row['dropped']}"
        )
    log(
        "timeline: "
        + ", ".join(
            f"{x['t']:.0f}s {x['n_p']}P{x['n_d']}D {x['rps']:.2f}"
            + (f" {x['monitor']}" if x["monitor"] else "")
            for x in row["timeline"]
        )
    )
    if args.plot:
        plot(row, args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
