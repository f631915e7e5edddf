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

``--mode real``: the same loop over a registry group of profiled worker processes; a move is
``remove_member`` (route and order first, drain, stop) then ``add_member`` (a new process of
the other role joins by the setup workflow); the baseline is a static run of the Eq. 1 split
for the new answers (and of the starting split). Minutes, not part of ``--quick``.

JSON line: ``{"experiment":"adapt","converge_s":..,"throughput_vs_static":..,"dropped":..,
"mode":"sim","from":[n_p,n_d],"to":[n_p,n_d],"best_static":[n_p,n_d],...}``
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
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
    p.add_argument(
        "--mode",
        choices=("sim", "real"),
        nargs="+",
        default=["sim"],
        help="real: worker processes (profiled) in a registry group; minutes, not --quick",
    )
    p.add_argument("--real-shift-at", type=float, default=40.0, help="real mode: seconds before the shift")
    p.add_argument("--real-end", type=float, default=150.0, help="real mode: run length (s)")
    p.add_argument("--real-period", type=float, default=10.0, help="real mode: monitor period (s)")
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


def _real_load(url: str, args: argparse.Namespace, users: int, out_of, stop, results: list) -> Any:
    """Closed-loop users; a request's output length is ``out_of(seconds since start)``."""
    import asyncio

    import numpy as np

    from kvxfer.serve import loadgen
    from kvxfer.serve.workload import Fixed, Scenario, Workload

    wl = Workload(
        [Scenario("s", args.setting, Fixed(args.prompt - args.setting), Fixed(args.output))], unit="char"
    )

    async def main() -> None:
        client = loadgen._client(url, 120.0)
        t0 = time.monotonic()
        ids = itertools.count()

        async def user(u: int) -> None:
            rng = np.random.default_rng([args.seed, u])
            await asyncio.sleep(u * 2.0 / users)
            while not stop.is_set():
                req = wl.make(
                    "s", args.prompt - args.setting, out_of(time.monotonic() - t0), rng, f"u{u}-{next(ids)}"
                )
                r = await loadgen.send(client, req, ttft_slo_s=60.0, t0=t0, user=u)
                results.append((time.monotonic() - t0, r))

        try:
            await asyncio.gather(*(user(u) for u in range(users)))
        finally:
            await client.close()

    return asyncio.run(main())


def _real_rate(results: list, t0: float, t1: float) -> float:
    return sum(1 for t, r in results if r.error is None and t0 <= t < t1) / (t1 - t0)


def run_real(args: argparse.Namespace) -> dict[str, Any]:
    """The same controller loop over real worker processes in a registry group: a move is
    ``remove_member`` (route and order first, drain, stop) then ``add_member`` (a new process
    of the other role joins by the setup workflow)."""
    import threading

    from kvxfer.serve.control.ratio import RatioInputs, RatioMonitor, plan
    from kvxfer.serve.deployment import start_local
    from kvxfer.serve.machine import machine
    from kvxfer.serve.profile import load_profile

    prof = load_profile(args.profile)
    new_out = round(args.output * args.growth)

    def inputs(out: int) -> RatioInputs:
        return RatioInputs.from_profile(prof, args.prompt, out, args.b_d, args.setting)

    start = plan(inputs(args.output), args.budget)
    users = args.budget * (args.b_d + args.pending)
    opts = dict(
        mode="profiled",
        model="smollm2",
        b_p=1,
        b_d=args.b_d,
        pending=args.pending,
        tokenizer="bytes:49152",
        max_prompt_tokens=args.prompt + 16,
        max_new_tokens=new_out + 8,
        ttft_slo_s=60.0,
        prefix_min_tokens=min(16, args.setting),
        registry="sqlite",
    )
    window = (args.real_end - 0.35 * (args.real_end - args.real_shift_at), args.real_end)

    def measure_static(n_p: int) -> float:
        results: list = []
        stop = threading.Event()
        with start_local(n_p, args.budget - n_p, **opts) as dep:
            th = threading.Thread(
                target=_real_load, args=(dep.gateway_url, args, users, lambda _t: new_out, stop, results)
            )
            th.start()
            time.sleep(window[1] - window[0] + 15.0)
            stop.set()
            th.join(180)
        return _real_rate(results, 15.0, window[1] - window[0] + 15.0)

    static = {n_p: measure_static(n_p) for n_p in sorted({start[0], plan(inputs(new_out), args.budget)[0]})}
    log(
        f"real static for {new_out} output tokens: "
        + ", ".join(f"{p}P+{args.budget - p}D {v:.3f} req/s" for p, v in static.items())
    )
    results: list = []
    stop = threading.Event()
    moves: list[dict[str, Any]] = []
    timeline = []
    with start_local(*start, **opts) as dep:
        ctl = dep.controllers["g0"]
        th = threading.Thread(
            target=_real_load,
            args=(
                dep.gateway_url,
                args,
                users,
                lambda t: args.output if t < args.real_shift_at else new_out,
                stop,
                results,
            ),
        )
        t_begin = time.monotonic()
        th.start()
        mon = RatioMonitor(rise=0.1, cooldown=1)
        mover: threading.Thread | None = None
        seen = 0
        t = args.real_period
        while t <= args.real_end:
            time.sleep(max(0.0, t_begin + t - time.monotonic()))
            done = [r for _, r in results[seen:] if r.error is None]
            seen = len(results)
            for r in done:
                mon.observe(r.e2e_s, r.ttft_s or 0.0)
            action = mon.decide()
            outs = [r.completion_tokens for r in done] or [args.output]
            target = plan(inputs(round(sum(outs) / len(outs))), args.budget)
            n_p = sum(1 for r in ctl.members.values() if r == "prefill")
            n_d = len(ctl.members) - n_p
            moved = None
            if (action or moves) and (n_p, n_d) != target and (mover is None or not mover.is_alive()):
                frm, to = ("prefill", "decode") if target[0] < n_p else ("decode", "prefill")
                victim = sorted(n for n, r in ctl.members.items() if r == frm)[0]
                rec = {"start": time.monotonic() - t_begin, "from": frm, "to": to, "victim": victim}

                def move(rec=rec, victim=victim, to=to) -> None:
                    ctl.remove_member(victim, drain=lambda name: dep.drain([name]))
                    rec["new"] = ctl.add_member(to)
                    rec["joined"] = time.monotonic() - t_begin

                mover = threading.Thread(target=move)
                mover.start()
                moves.append(rec)
                moved = to
            timeline.append(
                {
                    "t": t,
                    "n_p": n_p,
                    "n_d": n_d,
                    "monitor": action,
                    "target": list(target),
                    "moved": moved,
                    "rps": _real_rate(results, t - args.real_period, t),
                }
            )
            log(
                f"real t={t:.0f}s {n_p}P+{n_d}D monitor {action} target {target} moved {moved} "
                f"{timeline[-1]['rps']:.2f} req/s"
            )
            t += args.real_period
        if mover is not None:
            mover.join(120)
        stop.set()
        th.join(180)
        final = (
            sum(1 for r in ctl.members.values() if r == "prefill"),
            sum(1 for r in ctl.members.values() if r == "decode"),
        )
    joined = [m["joined"] for m in moves if "joined" in m]
    best_p = max(static, key=static.get)
    return {
        "experiment": "adapt",
        "converge_s": (max(joined) - args.real_shift_at) if joined else None,
        "throughput_vs_static": _real_rate(results, *window) / static[best_p],
        "dropped": sum(1 for _, r in results if r.error),
        "mode": "real",
        "from": list(start),
        "to": list(final),
        "best_static": [best_p, args.budget - best_p],
        "throughput_rps": _real_rate(results, *window),
        "static_rps": {f"{p}P+{args.budget - p}D": v for p, v in static.items()},
        "output_tokens": [args.output, new_out],
        "moves": len(moves),
        "period_s": args.real_period,
        "requests": len(results),
        "errors": sorted({r.error for _, r in results if r.error}),
        "timeline": timeline,
        "profile": f"{prof.model} ({prof.machine})",
        "machine": machine(),
        "shift_at": args.real_shift_at,
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
    if "real" in args.mode:
        real = run_real(args)
        print(
            json.dumps({k: v for k, v in real.items() if k != "timeline"})
            if args.json
            else f"real: converged in {real['converge_s']} s from {real['from']} to {real['to']}: "
            f"{real['throughput_vs_static']:.3f} of the best static, dropped {real['dropped']}",
            flush=True,
        )
        if "sim" not in args.mode:
            return 0
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
