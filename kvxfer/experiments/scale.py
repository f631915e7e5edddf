"""``kvxfer experiment scale``: TTFT-SLO success of reject-retry vs local-queue as users grow,
simulated at hundreds to 1000 instances [paper, P/D-Serve Fig. 14a at cluster scale].

The discrete-event simulator (:mod:`kvxfer.serve.sim`) runs ``--instances`` instances as
groups of ``--group-prefills`` prefills + ``--group-decodes`` decodes, calibrated from a
worker profile (default: SmolLM2-135M measured on this machine), with the gateway's own
:class:`~kvxfer.serve.policy.ForwardingPolicy`. As in the ``forwarding`` experiment, A is the
most users per group at which local-queue meets every request's SLO; ``load`` = users / (A x
groups). Workloads: ``paper`` (one 8k prompt per three 2k ones, scaled) and ``azure`` (the
Azure LLM inference trace 2023, code and conversation groups).

``--validate`` first runs the real ``forwarding --quick`` experiment (8 processes: 4 prefill +
2 decode workers, 2 gateways; profiled mode) and the simulator with the same configuration,
and prints one ``"validation"`` line per (policy, load) with both success rates and TTFT p50s.

JSON lines::

  {"experiment":"scale","policy":..,"instances":..,"load":x,"success_rate":..,"mode":"sim",
   "workload":..,"users":..,"A_per_group":..,"groups":..,"ttft_p50_s":..,"ttft_p99_s":..,..}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from typing import Any


def log(msg: str) -> None:
    print(f"[scale] {msg}", file=sys.stderr, flush=True)


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvxfer experiment scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1000 instances, loads 1 and 4, 30 s simulated")
    p.add_argument("--json", action="store_true")
    p.add_argument("--plot", metavar="FILE")
    p.add_argument("--instances", type=int, nargs="+", help="default 100 1000 (--quick: 1000)")
    p.add_argument("--group-prefills", type=int, default=8)
    p.add_argument("--group-decodes", type=int, default=2)
    p.add_argument("--b-p", type=int, default=1)
    p.add_argument("--b-d", type=int, default=16)
    p.add_argument("--pending", type=int, default=4)
    p.add_argument("--workload", choices=("paper", "azure"), nargs="+", default=["paper", "azure"])
    p.add_argument("--scale", type=float, default=1 / 16, help="prompt lengths times this")
    p.add_argument("--output-tokens", type=int, default=16, help="paper mix: tokens per answer")
    p.add_argument("--slack", type=float, default=0.5)
    p.add_argument("--loads", default="", help="default 1,2,3,4,5 (--quick: 1,4)")
    p.add_argument("--duration", type=float, help="simulated seconds per point (120; --quick 30)")
    p.add_argument("--profile", default="smollm2", help="profile name or JSON path")
    p.add_argument("--gateways", type=int, default=1, help="uncoordinated gateways")
    p.add_argument("--validate", action="store_true", help="compare with a real 8-process run first")
    p.add_argument("--real-json", help="--validate against this saved forwarding run (JSON lines)")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    a.instances = a.instances or ([1000] if a.quick else [100, 1000])
    a.loads = [float(x) for x in (a.loads or ("1,4" if a.quick else "1,2,3,4,5")).split(",")]
    a.duration = a.duration or (30.0 if a.quick else 120.0)
    if a.quick and "azure" in a.workload and len(a.workload) == 2:
        a.workload = ["paper"]
    return a


def _profile(spec: str):
    from kvxfer.serve.profile import load_profile

    return load_profile(spec)


def simulate(args: argparse.Namespace) -> list[dict[str, Any]]:
    from kvxfer.serve.machine import machine
    from kvxfer.serve.sim.model import SimConfig
    from kvxfer.serve.sim.runs import azure_mix, closed_loop, find_a, paper_mix

    prof = _profile(args.profile)
    rows = []
    per_group = args.group_prefills + args.group_decodes
    for wl in args.workload:
        mix = paper_mix(args.scale, args.output_tokens) if wl == "paper" else azure_mix(args.scale)
        base = SimConfig(prof, 1, args.group_prefills, args.group_decodes, args.b_p, args.b_d, args.pending)
        a = find_a(base, mix, 4 * max(args.duration, 120.0), slack=args.slack, seed=args.seed)
        log(f"{wl}: A = {a} users per group of {args.group_prefills}P+{args.group_decodes}D")
        for inst in args.instances:
            groups = max(1, inst // per_group)
            for load in args.loads:
                users = max(1, round(load * a * groups))
                for pol in ("local-queue", "reject-retry"):
                    t0 = time.monotonic()
                    cfg = dataclasses.replace(base, groups=groups, policy=pol)
                    st = closed_loop(
                        cfg,
                        mix,
                        users,
                        args.duration,
                        slack=args.slack,
                        seed=args.seed,
                        gateways=args.gateways,
                    )
                    row = {
                        "experiment": "scale",
                        "policy": pol,
                        "instances": groups * per_group,
                        "load": load,
                        "success_rate": st["success_rate"],
                        "mode": "sim",
                        "workload": wl,
                        "users": users,
                        "A_per_group": a,
                        "groups": groups,
                        "group": f"{args.group_prefills}P+{args.group_decodes}D",
                        "ttft_p50_s": st["ttft_p50_s"],
                        "ttft_p99_s": st["ttft_p99_s"],
                        "retries_p99": st["retries_p99"],
                        "requests": st["requests"],
                        "errors": st["errors"],
                        "throughput_rps": st["throughput_rps"],
                        "sim_events": st["events"],
                        "wall_s": round(time.monotonic() - t0, 2),
                        "profile": f"{prof.model} ({prof.machine})",
                        "machine": machine(),
                    }
                    rows.append(row)
                    log(
                        f"{wl} {row['instances']} instances load {load:g} {pol}: success "
                        f"{st['success_rate']:.3f} ({st['requests']} requests, {row['wall_s']} s)"
                    )
    return rows


VALIDATE_ARGS = ["--prefills", "4", "--decodes", "2", "--loads", "1,2,4", "--duration", "40"]


def validate(args: argparse.Namespace) -> list[dict[str, Any]]:
    """A real ``forwarding`` run (``--real-json FILE``: its saved JSON lines; else run now with
    ``VALIDATE_ARGS``: 4 prefill + 2 decode workers and 2 gateways, 8 processes, profiled
    SmolLM2), then the simulator on the same configuration, users and SLO rule."""
    from kvxfer.experiments import forwarding
    from kvxfer.serve.sim.model import SimConfig
    from kvxfer.serve.sim.runs import closed_loop, paper_mix

    if args.real_json:
        real = [json.loads(x) for x in open(args.real_json) if x.strip()]
        real = [r for r in real if r.get("experiment") == "forwarding" and not r.get("summary")]
        fargs = forwarding.parse(["--model", real[0]["model"]])
    else:
        fargs = forwarding.parse(VALIDATE_ARGS)
        real = forwarding.run(fargs)
    r0 = real[0]
    prof = _profile(r0.get("profile", "").split(" ")[0] if r0.get("profile", "").endswith(".json")
                    else r0["model"])  # fmt: skip
    long_n, short_n = r0["prompt_tokens"]
    mix = paper_mix(long_n / 8192, fargs.output_tokens)
    cfg = SimConfig(prof, 1, r0["prefills"], r0["decodes"], r0["b_p"], fargs.b_d, pending=4)
    # the real run's SLO floor (its calibration's timing noise, unless --slo-floor was given)
    floor = fargs.slo_floor if fargs.slo_floor is not None else r0.get("slo_floor_s", 0.05)
    out = []
    for r in real:
        sim = closed_loop(
            dataclasses.replace(cfg, policy=r["policy"]), mix, r["users"], max(120.0, r["duration_s"]),
            slack=fargs.slack, floor=floor, seed=args.seed,
        )  # fmt: skip
        row = {
            "experiment": "scale", "validation": True, "policy": r["policy"], "load": r["load"],
            "users": r["users"], "real_success_rate": r["success_rate"],
            "sim_success_rate": sim["success_rate"],
            "success_error": sim["success_rate"] - r["success_rate"], "real_ttft_p50_s": r["ttft_p50_s"],
            "sim_ttft_p50_s": sim["ttft_p50_s"], "real_throughput_rps": r.get("throughput_rps"),
            "sim_throughput_rps": sim["throughput_rps"], "real_requests": r["requests"],
            "sim_requests": sim["requests"], "processes": r0["prefills"] + r0["decodes"] + 2,
            "mode": "real vs sim", "model": r0["model"], "machine": r["machine"],
        }  # fmt: skip
        log(
            f"validation {r['policy']} load {r['load']:g}: success real {r['success_rate']:.3f} "
            f"sim {sim['success_rate']:.3f}; TTFT p50 real {_f(r['ttft_p50_s'])} sim {_f(sim['ttft_p50_s'])}"
        )
        out.append(row)
    return out


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}"


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted({(r["workload"], r["instances"]) for r in rows if not r.get("validation")})
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for wl, inst in keys:
        for pol, style in (("reject-retry", "o-"), ("local-queue", "s--")):
            pts = sorted(
                (r["load"], r["success_rate"])
                for r in rows
                if r.get("workload") == wl and r.get("instances") == inst and r["policy"] == pol
            )
            ax.plot([x for x, _ in pts], [y * 100 for _, y in pts], style, label=f"{pol}, {wl}, {inst} inst.")
    ax.set_xlabel("closed-loop users / A")
    ax.set_ylabel("TTFT-SLO success (%)")
    ax.set_title("scale (simulated)", fontsize=9)
    ax.set_ylim(0, 105)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    args = parse(list(sys.argv[1:] if argv is None else argv))
    rows = validate(args) if (args.validate or args.real_json) else []
    rows += simulate(args)
    for r in rows:
        if args.json:
            print(json.dumps(r))
        elif r.get("validation"):
            print(
                f"validation {r['policy']:>12} load {r['load']:g}: real {r['real_success_rate']:.3f} "
                f"sim {r['sim_success_rate']:.3f}"
            )
        else:
            print(
                f"{r['workload']:>6} {r['instances']:>5} {r['policy']:>12} load {r['load']:>4g} "
                f"success {r['success_rate']:.3f}"
            )
    if args.plot:
        plot([r for r in rows if not r.get("validation")], args.plot)
        log(f"plot written to {args.plot}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
